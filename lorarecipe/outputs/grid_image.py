"""Cells of images -> one labelled grid PNG with provenance text chunks (Pillow, torch-free).

Rows are labelled on the left (prompt, seed), columns on top (variant). Output bytes are
deterministic for the same input pixels: Pillow's built-in font, no timestamps, fixed zlib level.
Text chunks carry the recipe name, plan fingerprint and a JSON description of the layout, so a
grid that travels alone still says what it shows.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

__all__ = ["compose_grid", "png_bytes"]

_PAD = 6
_MIN_CELL = 128
_BG = (255, 255, 255)
_FG = (20, 20, 20)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def _text_block(draw: ImageDraw.ImageDraw, text: str, width_px: int, font: object) -> list[str]:
    chars = max(8, width_px // 7)
    lines: list[str] = []
    for paragraph in text.split("\n"):
        lines.extend(textwrap.wrap(paragraph, chars) or [""])
    return lines[:6]


def png_bytes(image: Image.Image, text: Mapping[str, str]) -> bytes:
    """Encode ``image`` as PNG with tEXt/iTXt chunks, deterministically."""
    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value) if not value.isascii() else info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=6, optimize=False)
    return buffer.getvalue()


def compose_grid(
    cells: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    title: str = "",
) -> Image.Image:
    """Lay out ``cells[row][column]`` with row/column headers and an optional title line."""
    if not cells or not cells[0]:
        raise ValueError("a grid needs at least one cell")
    small = max(im.width for row in cells for im in row)
    if small < _MIN_CELL:  # tiny test models render 64 px: enlarge (nearest) so labels fit and pixels show
        factor = -(-_MIN_CELL // small)
        cells = [
            [im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST) for im in row]
            for row in cells
        ]
    cell_w = max(im.width for row in cells for im in row)
    cell_h = max(im.height for row in cells for im in row)
    font_size = max(10, min(16, cell_w // 10))
    font = _font(font_size)
    line_h = font_size + 4
    label_w = max(120, min(320, cell_w))
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    col_lines = [_text_block(scratch, c, cell_w, font) for c in column_labels]
    header_h = _PAD * 2 + line_h * max(len(lines) for lines in col_lines)
    title_h = line_h + _PAD if title else 0
    width = label_w + len(cells[0]) * (cell_w + _PAD) + _PAD
    height = title_h + header_h + len(cells) * (cell_h + _PAD) + _PAD
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_PAD, _PAD // 2), title, fill=_FG, font=font)
    for c, lines in enumerate(col_lines):
        x = label_w + c * (cell_w + _PAD) + _PAD
        for i, line in enumerate(lines):
            draw.text((x, title_h + _PAD + i * line_h), line, fill=_FG, font=font)
    for r, row in enumerate(cells):
        y = title_h + header_h + r * (cell_h + _PAD)
        for i, line in enumerate(_text_block(scratch, row_labels[r], label_w - _PAD, font)):
            draw.text((_PAD, y + i * line_h), line, fill=_FG, font=font)
        for c, image in enumerate(row):
            canvas.paste(image.convert("RGB"), (label_w + c * (cell_w + _PAD) + _PAD, y))
    return canvas
