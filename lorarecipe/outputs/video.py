"""Video cells of a grid: frames <-> one frame strip, and an animated WebP (Pillow, torch-free).

A clip of ``n`` frames of ``w × h`` is kept as one ``(n·w) × h`` strip (frames left to right): a plain
image, so the grid-cell cache and PNG writer need nothing new, and lossless, so the frames come back
exactly. ``webp_bytes`` encodes the frames as a looping lossless animated WebP; Pillow's WebP encoder
gives the same bytes for the same frames and settings (no timestamps), so a rebuild is byte-identical.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image

__all__ = ["FRAME_MS", "frame_strip", "strip_frames", "webp_bytes"]

FRAME_MS = 125  # 8 frames per second: slow enough to follow a 9-frame clip
_MIN_FRAME = 128


def strip_frames(strip: Image.Image, frames: int) -> list[Image.Image]:
    """A frame strip -> its ``frames`` frames, left to right."""
    width = strip.width // frames
    if width * frames != strip.width:
        raise ValueError(f"a strip {strip.width} px wide does not hold {frames} frames")
    return [strip.crop((i * width, 0, (i + 1) * width, strip.height)) for i in range(frames)]


def frame_strip(frames: Sequence[Image.Image]) -> Image.Image:
    """Frames -> the strip a grid shows: side by side, enlarged (nearest) to at least 128 px tall."""
    factor = max(1, -(-_MIN_FRAME // frames[0].height))
    width, height = frames[0].width * factor, frames[0].height * factor
    strip = Image.new("RGB", (width * len(frames), height))
    for index, frame in enumerate(frames):
        strip.paste(frame.resize((width, height), Image.Resampling.NEAREST), (index * width, 0))
    return strip


def webp_bytes(frames: Sequence[Image.Image], frame_ms: int = FRAME_MS) -> bytes:
    """Frames -> a looping, lossless animated WebP (deterministic bytes)."""
    buffer = io.BytesIO()
    first, *rest = [frame.convert("RGB") for frame in frames]
    first.save(
        buffer,
        format="WEBP",
        save_all=True,
        append_images=rest,
        duration=frame_ms,
        loop=0,
        lossless=True,
        quality=100,
        method=4,
    )
    return buffer.getvalue()
