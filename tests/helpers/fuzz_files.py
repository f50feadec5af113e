"""Hypothesis strategies for hostile JSON files and base-folder layouts, shared by tests and ``fuzz/run.py``.

Seeds are real files lorarecipe wrote (a lock file, a manifest) or reads (the built-in tiny SD base
folder); each example mutates one: a node replaced by random JSON, deep nesting, a huge string, a
wrong type, a key dropped or added, the text truncated or replaced by bytes; for base folders also
files deleted, truncated, turned into folders, and components added under hostile names. The
property: ``lorarecipe`` exits 0 or 1, never 3, and prints no traceback and no ``RecursionError``.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from lorarecipe.cli import main

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
_hostile_leaves = st.sampled_from(
    [
        "[" * 3000 + "]" * 3000,
        '{"a":' * 200 + "1" + "}" * 200,
        "x" * 300_000,
        "../../etc/passwd",
        "/etc/passwd",
        "\x1b[2J\n::error::pwned",
        -1,
        2**70,
        1e308,
        True,
        None,
        [],
        {},
    ]
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _paths(value, (*prefix, index))


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


@st.composite
def mutated_json(draw: st.DrawFn, seed: Any) -> bytes:
    """One hostile variant of the JSON document ``seed``, as the bytes of a file."""
    doc = copy.deepcopy(seed)
    op = draw(
        st.sampled_from(["replace", "hostile", "drop", "add", "wrap", "truncate", "bytes", "deep-text"])
    )
    path = draw(st.sampled_from(list(_paths(doc))))
    if op == "bytes":
        return draw(st.binary(max_size=200))
    if op == "deep-text":
        return ("[" * draw(st.integers(50, 200_000))).encode()
    if op == "replace":
        doc = _set(doc, path, draw(json_values))
    elif op == "hostile":
        leaf = draw(_hostile_leaves)
        if isinstance(leaf, str) and leaf.startswith(("[", "{")):
            doc = _set(doc, path, "__RAW__")
            return json.dumps(doc).replace('"__RAW__"', leaf).encode()
        doc = _set(doc, path, leaf)
    elif op == "drop" and path:
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
    elif op == "add":
        parent = doc
        for key in path:
            parent = parent[key]
        if isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = draw(json_values)
        elif isinstance(parent, list):
            parent.append(draw(json_values))
    elif op == "wrap":
        doc = _set(doc, path, [copy.deepcopy(_get(doc, path))])
    text = json.dumps(doc)
    if op == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode()


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def run_cli(*argv: str) -> tuple[int, str]:
    """``lorarecipe ARGV`` in-process -> (exit code, stdout + stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue() + err.getvalue()


def check_cli_never_crashes(*argv: str) -> str:
    """Exit 0 or 1, no traceback, no RecursionError; returns 'ok' or 'error' for the tally."""
    code, text = run_cli(*argv)
    assert code in (0, 1), f"exit {code}:\n{text[-3000:]}"
    assert "Traceback" not in text and "RecursionError" not in text, text[-3000:]
    return "ok" if code == 0 else "error"


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` at ``path`` as a new file (the old one may be a hard link to a seed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.write_bytes(data)


@st.composite
def base_folder_damage(draw: st.DrawFn, files: list[str], index: Any) -> list[tuple[str, str, bytes]]:
    """A list of (operation, relative path, bytes) to apply to a copy of a base folder."""
    damage = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["json", "delete", "truncate", "folder", "component", "index"]))
        target = draw(st.sampled_from(files))
        if op == "json" and target.endswith(".json"):
            damage.append(("write", target, draw(mutated_json(json.loads(_SEED_TEXT.get(target, "{}"))))))
        elif op == "index":
            damage.append(("write", "model_index.json", draw(mutated_json(index))))
        elif op == "component":
            name = draw(st.sampled_from(["..", "a/b", "x\n::error::y", "unet2", "", ".hidden", "scheduler"]))
            entry = draw(
                st.sampled_from([["diffusers", "UNet2DConditionModel"], ["os", "system"], [], None, 5])
            )
            damage.append(("write", "model_index.json", json.dumps({**index, name: entry}).encode()))
        else:
            damage.append((op, target, b""))
    return damage


_SEED_TEXT: dict[str, str] = {}


def seed_base_folder(source: Path, seed: Path) -> tuple[list[str], Any]:
    """Copy ``source`` to ``seed`` once; returns its relative file names and its model_index."""
    if not seed.exists():
        shutil.copytree(source, seed)
    files = sorted(p.relative_to(seed).as_posix() for p in seed.rglob("*") if p.is_file())
    for name in files:
        if name.endswith(".json"):
            _SEED_TEXT[name] = (seed / name).read_text()
    return files, json.loads((seed / "model_index.json").read_text())


def damaged_copy(seed: Path, target: Path, damage: list[tuple[str, str, bytes]]) -> Path:
    """A copy of the seed folder (weights hard-linked when possible) with ``damage`` applied."""
    if target.exists():
        shutil.rmtree(target)

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(seed, target, copy_function=link_or_copy)
    for op, rel, data in damage:
        path = target / rel
        if op == "write":
            replace_file(path, data)
        elif op == "delete" and path.is_file():
            path.unlink()
        elif op == "truncate" and path.is_file():
            replace_file(path, path.read_bytes()[: len(path.read_bytes()) // 2])
        elif op == "folder" and path.is_file():
            path.unlink()
            path.mkdir()
    return target
