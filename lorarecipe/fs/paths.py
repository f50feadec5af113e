"""Where a build may read and write: the one confinement every path from an input goes through.

Reads: a recipe-relative input path -> its real path inside the recipe's folder (or a
``--allow-read`` folder) (``resolve_input``); an input file or folder -> checked before anything
reads it: regular files and folders only, every symlink resolving inside the input's allowed roots
(``check_input_file``, ``check_input_tree``; the roots of an input: ``input_roots``); a path named
by an untrusted file (a lock, a manifest) -> inside the folder it is relative to
(``confined_path``). Writes: an output path -> a normalized relative path (``normalize_output_path``)
and a final path inside the output root reached through no symlink (``resolve_output``); the output
root's own state is never a symlink (``check_output_root``); no output may replace, contain or live
inside an input of the same build (``check_outputs_apart``). Pickle suffixes are refused before any
file is opened. Refusals are ``UnsafeInputError``s. Torch-free.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from ..errors import UnsafeInputError

__all__ = [
    "PICKLE_SUFFIXES",
    "RESERVED_OUTPUTS",
    "check_input",
    "check_input_file",
    "check_input_tree",
    "check_output_root",
    "check_outputs_apart",
    "confined_path",
    "input_roots",
    "normalize_output_path",
    "resolve_input",
    "resolve_output",
]

#: System folders nothing is ever read from, whatever a symlink or a --allow-read says.
_SYSTEM = tuple(Path(p) for p in ("/proc", "/dev", "/sys"))
#: The output root's own files: lorarecipe's state folder and the manifest.
_STATE_ENTRIES = (".lorarecipe", "manifest.json")

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
RESERVED_OUTPUTS = ("manifest.json", ".lorarecipe")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _system(real: Path) -> bool:
    return any(_inside(real, folder) for folder in _SYSTEM)


def input_roots(kind: str, recipe_root: Path, allow_read: Sequence[Path] = ()) -> tuple[Path, ...]:
    """The folders an input of ``kind`` ("local" | "hub" | "builtin") may resolve into, real paths:
    the recipe's folder and ``--allow-read`` folders; the Hugging Face hub cache (snapshots link into
    its ``blobs``); lorarecipe's built-in folder."""
    if kind == "hub":
        from .hubcache import hub_cache_dir

        return (_real(hub_cache_dir()),)
    if kind == "builtin":
        from ..builtin.catalog import builtin_root

        return (_real(builtin_root()),)
    return (_real(recipe_root), *(_real(a) for a in allow_read))


def _refuse_outside(path: Path, real: Path, roots: Sequence[Path], what: str) -> None:
    if _system(real) or not any(_inside(real, root) for root in roots):
        shown = ", ".join(str(r) for r in roots)
        raise UnsafeInputError(
            f"{what}: {path} resolves to {real}, outside the folders it may be read from ({shown}); "
            "symlinks may only point inside them (pass --allow-read DIR to allow another folder)"
        )


def check_input_file(path: Path, roots: Sequence[Path], what: str) -> Path:
    """An input file -> its real path, refused unless it is a regular file inside ``roots``."""
    real = _real(path)
    _refuse_outside(path, real, roots, what)
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:
        raise UnsafeInputError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise UnsafeInputError(f"{what}: {path} is not a regular file")
    return real


def check_input_tree(folder: Path, roots: Sequence[Path], what: str) -> None:
    """Refuse an input folder holding anything but regular files and folders inside ``roots``.

    Walked without following symlinks; each symlink must resolve inside ``roots`` to a regular file
    or a folder (then walked too, once). A FIFO, socket or device is refused: reading it could hang
    or read another process's data. Run before any library reads the folder.
    """
    real_folder = _real(folder)
    _refuse_outside(folder, real_folder, roots, what)
    seen: set[Path] = set()
    pending = [real_folder]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            entries = list(os.scandir(current))
        except OSError as exc:
            raise UnsafeInputError(f"{what}: cannot list {current}: {exc.strerror or exc}") from None
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                real = _real(path)
                _refuse_outside(path, real, roots, what)
                path = real
            try:
                mode = os.stat(path).st_mode
            except OSError as exc:
                raise UnsafeInputError(f"{what}: {entry.path}: {exc.strerror or exc}") from None
            if stat.S_ISDIR(mode):
                pending.append(path)
            elif not stat.S_ISREG(mode):
                raise UnsafeInputError(f"{what}: {entry.path} is not a regular file or folder")


def check_input(path: Path, kind: str, recipe_root: Path, allow_read: Sequence[Path], what: str) -> None:
    """An input file or folder of a source of ``kind``, checked against that kind's roots: the one
    check every input passes before it is read, at compile time and again when a build resolves it."""
    roots = input_roots(kind, recipe_root, allow_read)
    if path.is_dir():
        check_input_tree(path, roots, what)
    else:
        check_input_file(path, roots, what)


def confined_path(base: Path, rel: object, what: str, within: Sequence[Path] = ()) -> Path:
    """A relative path named by an untrusted file (a lock, a manifest) -> ``base / rel``, refused unless
    it is a plain relative path (no ``..``, not absolute) that resolves inside ``base`` or one of
    ``within`` (an input's roots: a hub snapshot's files link into the cache's blobs)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise UnsafeInputError(f"{what}: path {str(rel)[:80]!r} is not a relative file path")
    parts = PurePosixPath(rel).parts
    if rel.startswith(("/", "\\")) or ".." in parts or (len(rel) > 1 and rel[1] == ":"):
        raise UnsafeInputError(f"{what}: path {rel[:200]!r} leaves {base}")
    path = base.joinpath(*parts)
    real = _real(path)
    if _system(real) or not any(_inside(real, _real(folder)) for folder in (base, *within)):
        raise UnsafeInputError(f"{what}: path {rel[:200]!r} resolves outside {base} (a symlink)")
    return path


def resolve_input(ref: str, root: Path, allowed: Sequence[Path] = ()) -> Path:
    """A recipe-relative input path -> its real absolute path, confined to ``root`` or ``allowed``."""
    if "\x00" in ref:
        raise UnsafeInputError(f"path {ref!r} contains a NUL byte")
    if ref.lower().endswith(PICKLE_SUFFIXES):
        raise UnsafeInputError(
            f"{ref}: pickle-based checkpoints ({', '.join(PICKLE_SUFFIXES)}) can run code when loaded; "
            "lorarecipe only reads .safetensors (convert the file first)"
        )
    candidate = Path(ref).expanduser() if ref.startswith("~") else Path(ref)
    real_root = root.resolve()
    full = candidate if candidate.is_absolute() else real_root / candidate
    real = Path(os.path.realpath(full))
    folders = [real_root, *(Path(os.path.realpath(a)) for a in allowed)]
    if not any(_inside(real, folder) for folder in folders):
        why = "is absolute" if candidate.is_absolute() else "leaves the recipe's folder"
        if not candidate.is_absolute() and real != Path(os.path.normpath(full)):
            why = "is a symlink that leaves the recipe's folder"
        raise UnsafeInputError(
            f"input path {ref!r} {why} ({real}); recipes may only read inside {real_root}. "
            "Pass --allow-read DIR to allow another directory"
        )
    return real


def normalize_output_path(rel: str) -> str:
    """Validate an output path relative to the output root; return it in normalized POSIX form."""
    if not rel or "\x00" in rel:
        raise ValueError("output path is empty")
    if rel.startswith(("/", "\\", "~")) or (len(rel) > 1 and rel[1] == ":"):
        raise ValueError(f"output path {rel!r} is absolute; outputs are written inside the output root")
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if ".." in parts:
        raise ValueError(f"output path {rel!r} leaves the output root ('..')")
    clean = [p for p in parts if p not in (".", "")]
    if not clean:
        raise ValueError(f"output path {rel!r} is the output root itself")
    if clean[0] in RESERVED_OUTPUTS:
        raise ValueError(f"output path {rel!r} is reserved for lorarecipe's own files")
    if any(p.startswith(".lorarecipe") for p in clean):
        raise ValueError(f"output path {rel!r} uses a name reserved for lorarecipe's temporary files")
    return "/".join(clean)


def resolve_output(out_root: Path, rel: str) -> Path:
    """Output root + relative path -> absolute path; refuses symlinks that lead out of the root."""
    norm = normalize_output_path(rel)
    real_root = Path(os.path.realpath(out_root))
    target = real_root / norm
    probe = real_root
    for part in PurePosixPath(norm).parts:
        probe = probe / part
        if probe.is_symlink():
            raise UnsafeInputError(
                f"output path {rel!r} goes through a symlink ({probe}); lorarecipe never writes through "
                "symlinks in the output root"
            )
    return target


def check_output_root(out_root: Path) -> None:
    """Refuse an output root whose own state (``.lorarecipe/``, ``manifest.json``, the files in the
    state folder) is a symlink: lorarecipe would read or write through it, outside the root. Also
    refuses a symlink among the root's path components below the working directory (a folder such as
    ``build/`` committed as a symlink by a pull request), as the default ``build/<name>`` lives there."""
    cwd = Path.cwd()
    absolute = out_root if out_root.is_absolute() else cwd / out_root
    if _inside(Path(os.path.normpath(absolute)), cwd):
        probe = cwd
        for part in Path(os.path.normpath(absolute)).relative_to(cwd).parts:
            probe = probe / part
            if probe.is_symlink():
                raise UnsafeInputError(
                    f"the output root {out_root} goes through a symlink ({probe}); lorarecipe never "
                    "writes through symlinks: pass --out with a real folder"
                )
    state = [out_root / name for name in _STATE_ENTRIES]
    if (out_root / ".lorarecipe").is_dir() and not (out_root / ".lorarecipe").is_symlink():
        state += list((out_root / ".lorarecipe").iterdir())
    for path in state:
        if path.is_symlink():
            raise UnsafeInputError(
                f"{path} is a symlink; lorarecipe's state in the output root is never read or written "
                "through a symlink (remove it, or build into another --out)"
            )


def check_outputs_apart(targets: Iterable[Path], inputs: Iterable[Path]) -> None:
    """Refuse outputs that would replace, contain or be written inside an input of the same build
    (a LoRA file, the base, the recipe, its lock), whatever ``--out`` is."""
    real_inputs = [(p, _real(p)) for p in inputs]
    for target in targets:
        real = _real(target)
        for shown, source in real_inputs:
            if real == source or _inside(source, real) or _inside(real, source):
                raise UnsafeInputError(
                    f"output {target} would overwrite or be written inside the input {shown}; "
                    "build into another --out"
                )
