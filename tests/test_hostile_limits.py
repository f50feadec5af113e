"""Issue 12: a pull request must not be able to exhaust, crash, confuse or inject through lorarecipe.

Every case runs through the command line (``lorarecipe.cli.main`` or a subprocess) and asserts the
exact outcome: the exit code, the location (``file:line:col`` of the offending value, or the file and
key) and the limit named. Resource attacks are measured in a fresh process: peak RSS and CPU time.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from lorarecipe.cli import main
from lorarecipe.inspect.safetensors_header import MAX_HEADER_BYTES
from lorarecipe.recipe.matrix import build_label
from lorarecipe.recipe.template_limits import MAX_VALUE_CHARS
from tests.helpers.fuzz_files import (
    base_folder_damage,
    check_cli_never_crashes,
    damaged_copy,
    mutated_json,
    replace_file,
    seed_base_folder,
)
from tests.helpers.measure import REPO, measure_cli


class Cli:
    """Runs the CLI in-process and keeps what it printed."""

    def __init__(self, capsys: pytest.CaptureFixture[str], folder: Path) -> None:
        self.capsys, self.folder = capsys, folder
        self.out = self.err = ""

    def __call__(self, *argv: str) -> int:
        self.capsys.readouterr()
        code = main(list(argv))
        self.out, self.err = self.capsys.readouterr()
        return code

    @property
    def text(self) -> str:
        return self.out + self.err

    def write(self, text: str, name: str = "recipe.yaml") -> Path:
        path = self.folder / name
        path.write_text(text, encoding="utf-8")
        return path

    def refused(self, code: int, *needles: str) -> None:
        assert code == 1, self.text
        assert "Traceback" not in self.text and "internal error" not in self.text, self.text
        for needle in needles:
            assert needle in self.text, f"{needle!r} not in:\n{self.text}"


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Cli:
    return Cli(capsys, tmp_path)


def recipe_with(description: str, extra: str = "") -> str:
    """A valid recipe (built-in inputs, nothing to download) whose line 2 holds ``description``."""
    return (
        "base: builtin:tiny-sd\n"
        f"description: {json.dumps(description)}\n"
        "adapters:\n"
        "  style: builtin:tiny-sd/style\n"
        "outputs:\n"
        "  lora: {kind: lora, adapter: style, path: lora}\n" + extra
    )


# ---- 1. templates: bounded size of every value, bounded work ----------------------------------------

TEMPLATE_ATTACKS = {
    "str.format width": ('{{ "{:99999999}".format(1) }}', "width 99999999 is larger than 10000"),
    "nested format width": ('{{ "{0:{1}}".format(1, 99999999) }}', "width 99999999"),
    "%-format width": ('{{ "%99999999d" % 1 }}', "width 99999999 is larger than 10000"),
    "%-format precision": ('{{ "%.99999999f" % 1.5 }}', "width 99999999"),
    "format filter": ('{{ "%s%s"|format("a" * 9000, "b" * 9000) }}', "18000 characters"),
    "repetition": ("{{ 'x' * 100000000 }}", "100000000 characters"),
    "list repetition": ("{{ [1, 2] * 100000000 }}", "limit: 10000 characters per value"),
    "replace amplification": ("{{ ('a' * 9999)|replace('a', 'a' * 9999) }}", "99980001 characters"),
    "str.replace amplification": ("{{ ('a' * 9999).replace('a', 'a' * 9999) }}", "99980001 characters"),
    "join amplification": ("{{ ('a' * 9999)|join('b' * 9999) }}", "characters long (limit: 10000"),
    "concatenation": ("{{ ('a' * 9000) ~ ('b' * 9000) ~ ('c' * 9000) }}", "27000 characters"),
    "plus concatenation": ("{{ ('a' * 9000) + ('b' * 9000) }}", "18000 characters"),
    "padding": ("{{ 'a'.center(99999999) }}", "pad to 99999999 characters"),
    "zfill": ("{{ 'a'.zfill(99999999) }}", "pad to 99999999 characters"),
    "expandtabs": ("{{ ('\\t' * 9999).expandtabs(9999) }}", "99990000 characters"),
    "power tower": ("{{ 9 ** 9 ** 9 ** 9 ** 9 }}", "exceed 4096 bits (limit)"),
    "big exponent": ("{{ 2 ** 10000000 }}", "exponent 10000000 is too large (limit: 64)"),
    "product chain": ("{{ (10 ** 60) ** 60 * (10 ** 60) ** 60 * (10 ** 60) ** 60 }}", "4096 bits"),
    "nested loops": (
        "{% for i in 'a' * 9999 %}{% for j in 'a' * 9999 %}x{% endfor %}{% endfor %}",
        "'for' is not allowed",
    ),
    "assignment chain": ("{% set a = 'a' * 9999 %}{% set b = a ~ a ~ a %}{{ b }}", "'assign' is not allowed"),
    "recursive macro": ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "'macro' is not allowed"),
    "range": ("{{ range(100000000) }}", "'range' is undefined"),
    "bytes": ("{{ (1).to_bytes(999999999, 'big') }}", "attribute 'to_bytes' of 'int' object is unsafe"),
    "many parts": ("{{ " + " ~ ".join(["'a'"] * 300) + " }}", "more than 256 parts (limit)"),
}


def _value_location(text: str, key: str = "description") -> str:
    """``recipe.yaml:LINE:COL`` of the value of ``key`` (computed from the text, not by lorarecipe)."""
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith(f"{key}: "):
            return f"recipe.yaml:{number}:{len(key) + 3}"
    raise AssertionError(f"{key} not in the recipe")


@pytest.mark.parametrize("attack", list(TEMPLATE_ATTACKS))
def test_template_attacks_are_refused_at_the_value_with_the_limit_named(cli: Cli, attack: str) -> None:
    template, limit = TEMPLATE_ATTACKS[attack]
    text = recipe_with(template)
    code = cli("validate", str(cli.write(text)))
    cli.refused(code, f"{_value_location(text)}: error: description: template ", limit)


def test_templates_that_stay_small_still_render(cli: Cli) -> None:
    text = recipe_with(
        "{{ '%5.2f'|format(w) }}|{{ '{:>6}'.format(s) }}|{{ s.upper() ~ '-' ~ ('ab' * 3) }}|"
        "{% if w > 0.5 %}strong{% else %}soft{% endif %}|{{ ['a', 'b']|join('+') }}",
        "variables: {w: 0.75, s: ink}\n",
    )
    assert cli("plan", str(cli.write(text)), "--json") == 0, cli.text
    description = json.loads(cli.out)["recipe_description"] if "recipe_description" in cli.out else None
    assert description is None or description.startswith(" 0.75")
    assert " 0.75|   ink|INK-ababab|strong|a+b" in cli.out


def _alias_amplified(template: str, axis: int) -> str:
    """~11,000 copies of one templated string through YAML aliases, times a matrix of ``axis``² builds."""
    lines = [f"t0: &t0 {json.dumps(template)}"]
    lines += [f"t{i}: &t{i} [" + ", ".join([f"*t{i - 1}"] * 10) + "]" for i in range(1, 5)]
    values = ", ".join(str(v) for v in range(axis))
    matrix = f"{{m: [{values}], n: [{values}]}}"
    return "\n".join(lines) + "\n" + recipe_with("x", f"variables: {{x: 1}}\nmatrix: {matrix}\n")


MEASURED_ATTACKS = {
    "str.format width": recipe_with('{{ "{:99999999}".format(1) }}'),
    "%-format width": recipe_with('{{ "%99999999d" % 1 }}'),
    "replace amplification": recipe_with("{{ ('a' * 9999)|replace('a', 'a' * 9999) }}"),
    "join amplification": recipe_with("{{ ('a' * 9999)|join('b' * 9999) }}"),
    "concatenation": recipe_with("{{ ('a' * 9999) ~ ('a' * 9999) ~ ('a' * 9999) ~ ('a' * 9999) }}"),
    "nested loops": recipe_with("{% for i in 'a' * 9999 %}{% for j in 'a' * 9999 %}{% endfor %}{% endfor %}"),
    "power tower": recipe_with("{{ 9 ** 9 ** 9 ** 9 ** 9 }}"),
    "alias x matrix x template": _alias_amplified("{{ '%5.2f'|format(x) ~ m }}", 16),
    "alias x smaller matrix": _alias_amplified("{{ '%5.2f'|format(x) ~ m ~ n }}", 4),
}


@pytest.mark.parametrize("attack", list(MEASURED_ATTACKS))
def test_template_attacks_stay_under_100_mb_and_2_cpu_seconds(tmp_path: Path, attack: str) -> None:
    text = MEASURED_ATTACKS[attack]
    assert len(text.encode()) < 600  # "a recipe under a few hundred bytes"
    (tmp_path / "recipe.yaml").write_text(text)
    measured = measure_cli("validate", "recipe.yaml", folder=tmp_path)
    print(
        f"{attack}: {measured.rss_mb:.0f} MB, {measured.cpu_seconds:.2f} s CPU, {measured.wall_seconds:.2f} s"
    )
    assert measured.code == 1, measured.output
    assert "Traceback" not in measured.output
    assert re.search(r"recipe\.yaml:\d+:\d+: error: ", measured.output), measured.output
    assert measured.rss_mb < 100, f"{attack}: peak RSS {measured.rss_mb:.0f} MB"
    assert measured.cpu_seconds < 2, f"{attack}: {measured.cpu_seconds:.2f} s of CPU"


def test_a_value_at_the_limit_renders_and_one_past_it_is_refused(cli: Cli) -> None:
    text = recipe_with(f"{{{{ ('a' * {MAX_VALUE_CHARS})|length }}}} chars")
    assert cli("validate", str(cli.write(text))) == 0, cli.text
    text = recipe_with(f"{{{{ ('a' * {MAX_VALUE_CHARS + 1})|length }}}} chars")
    cli.refused(cli("validate", str(cli.write(text))), f"{MAX_VALUE_CHARS + 1} characters")


def test_many_distinct_templates_times_a_matrix_hit_the_render_budget(tmp_path: Path) -> None:
    """Distinct templated strings cannot share renders: the per-recipe budget stops them, located."""
    words = "\n".join(f"    - '{{{{ m ~ n ~ {i} }}}}'" for i in range(120))
    text = recipe_with(
        "x", "matrix: {m: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], n: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}\n"
    )
    text = text.replace(
        "  style: builtin:tiny-sd/style\n",
        f"  style:\n    builtin: tiny-sd/style\n    trigger_words:\n{words}\n",
    )
    (tmp_path / "recipe.yaml").write_text(text)
    measured = measure_cli("validate", "recipe.yaml", folder=tmp_path)
    print(f"render budget: {measured.rss_mb:.0f} MB, {measured.cpu_seconds:.2f} s CPU")
    assert measured.code == 1, measured.output
    assert re.search(
        r"recipe\.yaml:\d+:\d+: error: adapters\.style\.trigger_words\[\d+\]: template refused: more than "
        r"10000 templated values to render \(limit per recipe\)",
        measured.output,
    ), measured.output
    assert measured.cpu_seconds < 3


# ---- 2. safetensors headers and JSON files: bounded size and depth, named errors ---------------------

LORA_RECIPE = """\
base: builtin:tiny-sd
adapters:
  evil: {file: evil.safetensors}
outputs:
  lora: {kind: lora, adapter: evil, path: lora}
"""


def _safetensors(path: Path, header: bytes, claimed: int | None = None) -> Path:
    """A file whose 8-byte length claims ``claimed`` (default: the header's length), then the header."""
    path.write_bytes(struct.pack("<Q", len(header) if claimed is None else claimed) + header)
    return path


def _junk_headers() -> dict[str, bytes]:
    """Headers a pull request could commit: 50 MB (over the limit) and just under the 8 MiB limit."""
    mib, cap = 1024 * 1024, MAX_HEADER_BYTES
    entry = b'"t%08d":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}'
    long_entry = '"' + "x" * 300 + '%07d":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}'
    return {
        "50 MB of junk": b"{" + b"\x00junk" * (10 * mib),
        "50 MB valid JSON of tiny values": b'{"a":[' + b"[]," * (50 * mib // 3) + b"[]]}",
        "8 MiB of tiny values": b'{"a":[' + b"{}," * (cap // 3 - 4) + b"{}]}",
        "8 MiB of zero-size tensors": b"{" + b",".join(entry % i for i in range(cap // 60)) + b"}",
        "8 MiB metadata string with an astral character": (
            b'{"__metadata__":{"k":"\xf0\x9f\x98\x80' + b"a" * (cap - 40) + b'"}}'
        ),
        "7.5 MiB of long tensor names": (
            "{" + ",".join(long_entry % i for i in range(22_000)) + "}"
        ).encode(),
        "deep nesting": b'{"a":' + b"[" * (cap // 2 - 8) + b"]" * (cap // 2 - 8) + b"}",
    }


@pytest.mark.parametrize("junk", list(_junk_headers()))
def test_junk_safetensors_headers_are_refused_in_bounded_memory(tmp_path: Path, junk: str) -> None:
    header = _junk_headers()[junk]
    _safetensors(tmp_path / "evil.safetensors", header)
    (tmp_path / "recipe.yaml").write_text(LORA_RECIPE)
    measured = measure_cli("validate", "recipe.yaml", folder=tmp_path)
    print(
        f"{junk} ({len(header) / 2**20:.0f} MiB): {measured.rss_mb:.0f} MB, {measured.cpu_seconds:.2f} s CPU"
    )
    assert measured.code == 1, measured.output
    assert "Traceback" not in measured.output and "RecursionError" not in measured.output
    assert "recipe.yaml:3:" in measured.output and "evil.safetensors" in measured.output, measured.output
    within_limits = "long tensor names" in junk or "metadata string" in junk  # valid JSON, not a LoRA
    refusal = "no LoRA weights recognized" if within_limits else "limit"
    assert refusal in measured.output, measured.output
    assert measured.rss_mb < 200, f"{junk}: peak RSS {measured.rss_mb:.0f} MB"
    assert measured.cpu_seconds < 3, f"{junk}: {measured.cpu_seconds:.2f} s of CPU"


def _base_folder(folder: Path) -> Path:
    """A private copy of the built-in tiny SD base as a local diffusers folder."""
    target = folder / "base"
    shutil.copytree(builtin_base_path("tiny-sd"), target)
    return target


LOCAL_BASE = """\
base: {path: base}
adapters:
  style: builtin:tiny-sd/style
outputs:
  lora: {kind: lora, adapter: style, path: lora}
"""
DEEP = "[" * 5000 + "]" * 5000  # deeper than json's recursion allows
DEEPISH = '{"a": ' * 100 + "1" + "}" * 100  # parses, but deeper than any real file


@pytest.mark.parametrize("nesting", [DEEP, DEEPISH])
@pytest.mark.parametrize("where", ["model_index.json", "unet/config.json"])
def test_deep_json_in_a_base_folder_is_a_named_error(cli: Cli, where: str, nesting: str) -> None:
    base = _base_folder(cli.folder)
    doc = json.loads((base / where).read_text())
    (base / where).write_text(json.dumps(doc)[:-1] + ', "deep": ' + nesting + "}")
    code = cli("validate", str(cli.write(LOCAL_BASE)))
    cli.refused(code, f"{where}: nested deeper than 64 levels (limit)", "recipe.yaml:1:")
    assert "RecursionError" not in cli.text


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (DEEP, "nested deeper than 64 levels (limit)"),
        ('{"weight_map": 123}', "no 'weight_map' object"),
        ('{"weight_map": {"a": 1}}', "weight_map names '1', not a .safetensors file"),
        ("[1]", "not a JSON object (found an array)"),
    ],
)
def test_a_malformed_shard_index_is_a_named_error(cli: Cli, index: str, message: str) -> None:
    base = _base_folder(cli.folder)
    (base / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(index)
    cli.refused(
        cli("validate", str(cli.write(LOCAL_BASE))), "diffusion_pytorch_model.safetensors.index.json", message
    )


def test_deep_lora_adapter_metadata_never_crashes(cli: Cli) -> None:
    source = builtin_lora_path("tiny-sd/style").read_bytes()
    (length,) = struct.unpack("<Q", source[:8])
    header = json.loads(source[8 : 8 + length])
    header["__metadata__"] = {**header.get("__metadata__", {}), "lora_adapter_metadata": DEEP}
    encoded = json.dumps(header).encode()
    (cli.folder / "evil.safetensors").write_bytes(
        struct.pack("<Q", len(encoded)) + encoded + source[8 + length :]
    )
    code = cli("validate", str(cli.write(LORA_RECIPE)))
    assert code in (0, 1), cli.text
    assert "Traceback" not in cli.text and "RecursionError" not in cli.text


# ---- 3. malformed lock files, manifests and build state: exit 1 naming the file and the key --------

BUILT_RECIPE = """\
base: builtin:tiny-sd
adapters:
  style: builtin:tiny-sd/style
outputs:
  lora: {kind: lora, adapter: style, path: lora, card: false}
"""


@pytest.fixture(scope="module")
def built_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recipe, its lock and its build folder (made once; each test edits a copy)."""
    folder = tmp_path_factory.mktemp("built")
    recipe = folder / "recipe.yaml"
    recipe.write_text(BUILT_RECIPE)
    assert main(["lock", str(recipe)]) == 0
    assert main(["build", str(recipe), "--out", str(folder / "out"), "--quiet"]) == 0
    return folder


@pytest.fixture
def built(built_once: Path, tmp_path: Path) -> Path:
    shutil.copytree(built_once, tmp_path / "p", symlinks=True)
    return tmp_path / "p"


def _edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    """Replace a JSON file's document with ``edit(document)``."""
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


_DROP = object()


def _at(*keys: str | int, value: Any = _DROP) -> Callable[[Any], Any]:
    """An edit that sets (or drops) the value at ``keys`` and returns the document."""

    def edit(doc: Any) -> Any:
        node = doc
        for key in keys[:-1]:
            node = node[key]
        if value is _DROP:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
        return doc

    return edit


_FILE0 = ("inputs", 0, "files", 0)


LOCK_DAMAGE: dict[str, tuple[Callable[[Any], Any] | bytes, str]] = {
    "path is a number": (
        _at(*_FILE0, "path", value=123),
        "inputs[0].files[0].path: expected a string, found 123",
    ),
    "sha256 missing": (_at(*_FILE0, "sha256"), "inputs[0].files[0].sha256: missing"),
    "size is a boolean": (
        _at(*_FILE0, "size", value=True),
        "inputs[0].files[0].size: expected an integer, found True",
    ),
    "files is an object": (
        _at("inputs", 0, "files", value={}),
        "inputs[0].files: expected a list, found an object",
    ),
    "inputs is a string": (_at("inputs", value="oops"), "inputs: expected a list, found 'oops'"),
    "unknown key": (_at("inputs", 0, "surprise", value=1), "inputs[0].surprise: unknown key"),
    "another format": (_at("lorarecipe_lock", value=2), "lorarecipe_lock: input should be 1, found 2"),
    "path part too long": (
        _at(*_FILE0, "path", value="a/" + "x" * 300),
        "inputs[0].files[0].path: value error, a path part longer than 255 bytes",
    ),
    "top level is a list": (lambda d: [d], "(top level): expected an object, found an array"),
    "deep nesting": (DEEP.encode(), "nested deeper than 64 levels (limit)"),
    "not JSON": (b"{", "not valid JSON"),
    "not UTF-8": (b'{"a": "\xff"}', "not UTF-8 text"),
}


@pytest.mark.parametrize("damage", list(LOCK_DAMAGE))
def test_a_malformed_lock_file_is_exit_1_naming_the_file_and_key(cli: Cli, built: Path, damage: str) -> None:
    edit, expected = LOCK_DAMAGE[damage]
    lock = built / "recipe.lock.json"
    if isinstance(edit, bytes):
        lock.write_bytes(edit)
    else:
        _edit_json(lock, edit)
    recipe = str(built / "recipe.yaml")
    message = f"recipe.lock.json: unreadable lock file ({expected}"
    cli.refused(cli("lock", "--check", recipe), message)
    cli.refused(cli("build", recipe, "--frozen", "--out", str(built / "o2"), "--quiet"), message)
    assert not (built / "o2" / "lora").exists()


MANIFEST_DAMAGE: dict[str, tuple[Callable[[Any], Any] | bytes, str]] = {
    "outputs is a list": (_at("outputs", value=[]), "outputs: expected an object, found an array"),
    "files is an object": (_at("outputs", "lora", "files", value={}), "outputs.lora.files: expected a list"),
    "files missing": (_at("outputs", "lora", "files"), "outputs.lora.files: missing"),
    "path is a number": (
        _at("outputs", "lora", "files", 0, "path", value=123),
        "outputs.lora.files[0].path: expected a string, found 123",
    ),
    "sha256 missing": (_at("outputs", "lora", "files", 0, "sha256"), "outputs.lora.files[0].sha256: missing"),
    "size is a string": (
        _at("outputs", "lora", "files", 0, "size", value="12"),
        "outputs.lora.files[0].size: expected an integer, found '12'",
    ),
    "path too long (found by fuzzing)": (
        _at("outputs", "lora", "files", 0, "path", value="x" * 5000),
        "outputs.lora.files[0].path: value error, a path longer than 4096 bytes",
    ),
    "output path too long (found by fuzzing)": (
        _at("outputs", "lora", "path", value="x" * 300),
        "outputs.lora.path: value error, a path part longer than 255 bytes",
    ),
    "top level is a list": (lambda d: [d], "not a JSON object (found an array)"),
    "deep nesting": (DEEP.encode(), "nested deeper than 64 levels (limit)"),
}


@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE))
def test_a_malformed_manifest_is_exit_1_naming_the_file_and_key(cli: Cli, built: Path, damage: str) -> None:
    edit, expected = MANIFEST_DAMAGE[damage]
    manifest = built / "out" / "manifest.json"
    if isinstance(edit, bytes):
        manifest.write_bytes(edit)
    else:
        _edit_json(manifest, edit)
    cli.refused(cli("verify", str(built / "out")), f"manifest.json: unreadable manifest: {expected}")
    assert cli("verify", str(built / "out"), "--json") == 1
    problems = json.loads(cli.out)["problems"]
    assert any(f"manifest.json: unreadable manifest: {expected}" in p["message"] for p in problems), problems


STATE_DAMAGE: dict[str, tuple[Callable[[Any], Any] | bytes, str]] = {
    "outputs is a list": (_at("outputs", value=[]), "outputs: expected an object, found an array"),
    "key is a number": (
        _at("outputs", "lora", "key", value=5),
        "outputs.lora.key: expected a string, found 5",
    ),
    "files is a list": (_at("outputs", "lora", "files", value=[]), "outputs.lora.files: expected an object"),
    "a file entry is a string": (
        _at("outputs", "lora", "files", "x", value="big"),
        "outputs.lora.files.x: expected a list, found 'big'",
    ),
    "deep nesting": (DEEP.encode(), "nested deeper than 64 levels (limit)"),
}


@pytest.mark.parametrize("damage", list(STATE_DAMAGE))
def test_a_malformed_build_state_is_exit_1_naming_the_file_and_key(
    cli: Cli, built: Path, damage: str
) -> None:
    edit, expected = STATE_DAMAGE[damage]
    state = built / "out" / ".lorarecipe" / "state.json"
    if isinstance(edit, bytes):
        state.write_bytes(edit)
    else:
        _edit_json(state, edit)
    recipe = str(built / "recipe.yaml")
    code = cli("build", recipe, "--out", str(built / "out"), "--quiet")
    cli.refused(code, "state.json (build state; delete it to rebuild everything)", expected)
    assert cli("build", recipe, "--out", str(built / "out"), "--quiet", "--force") == 0, cli.text
    assert cli("build", recipe, "--out", str(built / "out"), "--quiet") == 0, (
        cli.text
    )  # the state was rewritten


# ---- 4. a closed stdout is not a crash ------------------------------------------------------------


def _with_stdout_closed(argv: list[str], cwd: Path) -> tuple[int, str]:
    """Run ``lorarecipe ARGV`` with its stdout's reader gone before it writes (``| head -c0``)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "lorarecipe", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env,
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # the reader leaves before the command prints anything
    stderr = child.stderr.read().decode()
    return child.wait(timeout=300), stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["validate", "--json", "recipe.yaml"],
        ["validate", "--json", "broken.yaml"],
        ["plan", "--json", "broken.yaml"],
        ["plan", "recipe.yaml"],
        ["plan", "--json", "recipe.yaml"],
        ["schema"],
        ["verify", "--json", "out"],
        ["build", "--json", "recipe.yaml", "--out", "out2", "--quiet"],
    ],
)
def test_a_closed_stdout_is_not_a_crash(built: Path, argv: list[str]) -> None:
    (built / "broken.yaml").write_text("base: [\n")
    code, stderr = _with_stdout_closed(argv, built)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert "BrokenPipeError" not in stderr and "internal error" not in stderr, stderr
    assert code == 141, (code, stderr)  # 128 + SIGPIPE, what `set -o pipefail` sees from `cat | head`
    if argv[:3] == ["plan", "--json", "broken.yaml"]:
        assert "broken.yaml:2:1: error: invalid YAML" in stderr  # the problems still reach stderr


# ---- 5-6. text output: nothing from an input can start a log line, a command or an escape ------------

HOSTILE = "x\n::error file=a.py,line=1::pwned\r\n::stop-commands::tok\x1b[2J\x1b]0;title\x07\u202e"


def _assert_log_safe(text: str, github: bool = False) -> None:
    """No ESC or bell, and no line (after indentation) that GitHub Actions reads as a command other
    than lorarecipe's own annotations."""
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text, repr(text)
    for line in re.split(r"\r\n|[\n\r]", text):
        stripped = line.lstrip()
        if github and re.match(r"::(error|warning) [^\n]*title=lorarecipe::", line):
            continue  # lorarecipe's own annotation; what follows its '::' is message data on one line
        assert not stripped.startswith(("::", "##[")), f"a workflow command in the log: {line!r}"


def _lora_with_extra_tensor(path: Path, name: str) -> Path:
    """The built-in style LoRA plus one zero-size tensor called ``name``."""
    source = builtin_lora_path("tiny-sd/style").read_bytes()
    (length,) = struct.unpack("<Q", source[:8])
    header = json.loads(source[8 : 8 + length])
    data_end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    header[name] = {"dtype": "F32", "shape": [0], "data_offsets": [data_end, data_end]}
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + source[8 + length :])
    return path


@pytest.mark.parametrize("format_", ["text", "github", "json"])
def test_a_hostile_tensor_name_cannot_inject_into_the_log(cli: Cli, format_: str) -> None:
    _lora_with_extra_tensor(cli.folder / "evil.safetensors", "unet.a.lora_A.weight" + HOSTILE)
    args = ["--json"] if format_ == "json" else ["--format", format_]
    code = cli("validate", str(cli.write(LORA_RECIPE)), *args)
    assert code in (0, 1) and "Traceback" not in cli.text, cli.text
    assert "pwned" in cli.text  # the name is reported, escaped
    _assert_log_safe(cli.text, github=format_ == "github")


@pytest.mark.parametrize("format_", ["text", "github"])
def test_a_hostile_file_name_cannot_inject_into_the_log(cli: Cli, format_: str) -> None:
    text = LORA_RECIPE.replace(
        "{file: evil.safetensors}", "{file: " + json.dumps(HOSTILE + ".safetensors") + "}"
    )
    cli.refused(cli("validate", str(cli.write(text)), "--format", format_), "pwned")
    _assert_log_safe(cli.text, github=format_ == "github")


def test_a_hostile_recipe_value_and_snippet_cannot_inject_into_the_log(cli: Cli) -> None:
    text = (
        recipe_with("ok").replace("path: lora}", "path: lora, kind2: 1}")
        + f"description: {json.dumps(HOSTILE)}\n"
    )
    text = text.replace('description: "ok"\n', "") + "# ::error::in a comment\n"
    text = text.replace("style: builtin:tiny-sd/style", "style: builtin:tiny-sd/style  # ::warning::x")
    text += "name: 'ok\u202e\u2066evil ::error::x'\n"  # raw bidi controls in the YAML line itself
    cli.refused(cli("validate", str(cli.write(text))), "unknown key 'kind2'", "invalid name", r"\u202e")
    _assert_log_safe(cli.text)


def test_a_recipe_file_named_like_a_workflow_command_cannot_inject(cli: Cli) -> None:
    path = cli.write(recipe_with("{{ nope }}"), name="::error file=a::pwned.yaml")
    for format_ in ("text", "github"):
        cli.refused(cli("validate", str(path), "--format", format_), "pwned.yaml")
        _assert_log_safe(cli.text, github=format_ == "github")
    cli.refused(cli("build", str(path), "--out", str(cli.folder / "out")), "pwned.yaml")
    _assert_log_safe(cli.text)


def test_snippets_quote_one_line_windowed_and_escaped(cli: Cli) -> None:
    long_line = "description: " + json.dumps("a" * 3000 + "\x1b[2J{{ nope }}" + "b" * 3000) + "\n"
    text = recipe_with("ok").replace('description: "ok"\n', long_line)
    cli.refused(cli("validate", str(cli.write(text))), "'nope' is undefined")
    _assert_log_safe(cli.text)
    snippet = [line for line in cli.text.splitlines() if re.match(r"\s+2 \| ", line)]
    assert len(snippet) == 1 and len(snippet[0]) < 200, snippet


# ---- 7. YAML tags refused everywhere, keys included; booleans are not numbers -------------------------

KEY_TAGS = {
    "python object key": (
        "!!python/object:os.system foo: 1\n",
        "1:1",
        "tag:yaml.org,2002:python/object:os.system",
    ),
    "explicit binary key": ("? !!binary aGVsbG8=\n: 1\n", "1:3", "tag:yaml.org,2002:binary"),
    "nested key": (
        "x:\n  y: {!!python/name:os.system b: 1}\n",
        "2:7",
        "tag:yaml.org,2002:python/name:os.system",
    ),
    "key in a list item": ("x:\n  - {a: 1, !!int 5: 2}\n", "2:12", "tag:yaml.org,2002:int"),
    "anchored key": ("x: {&k !!python/tuple t: 1}\n", "1:5", "tag:yaml.org,2002:python/tuple"),
}


@pytest.mark.parametrize("case", list(KEY_TAGS))
def test_yaml_tags_on_keys_are_refused_at_the_key(cli: Cli, case: str) -> None:
    text, where, tag = KEY_TAGS[case]
    code = cli("validate", str(cli.write(text + recipe_with("ok"))))
    cli.refused(code, f"recipe.yaml:{where}: error: ", f"YAML tag '{tag}", "is not allowed in a recipe")


BOOLEANS = {
    "weight": ("set_adapters: {adapters: {style: true}}\n", "set_adapters.adapters.style", "true"),
    "lora_scale": ("fuse: {adapters: [style], lora_scale: false}\n", "fuse.lora_scale", "false"),
    "density": (
        "merges: {m: {method: ties, adapters: [style], density: false}}\n",
        "merges.m.density",
        "false",
    ),
    "seeds": (
        "  grid: {kind: grid, path: g.png, prompts: [a], seeds: [1, true]}\n",
        "outputs.grid.seeds[1]",
        "true",
    ),
    "steps": ("  grid: {kind: grid, path: g.png, prompts: [a], steps: true}\n", "outputs.grid.steps", "true"),
    "svd_rank": (
        "merges: {m: {method: ties_svd, adapters: [style], density: 0.5, svd_rank: true}}\n",
        "merges.m.svd_rank",
        "true",
    ),
}


@pytest.mark.parametrize("field", list(BOOLEANS))
def test_booleans_are_not_numbers(cli: Cli, field: str) -> None:
    extra, path, word = BOOLEANS[field]
    text = recipe_with("ok") + extra
    if extra.startswith("  grid"):
        text = recipe_with("ok").replace("outputs:\n", "outputs:\n" + extra)
    line = next(n for n, t in enumerate(text.splitlines(), 1) if word in t and ("true" in t or "false" in t))
    col = text.splitlines()[line - 1].rindex(word) + 1
    code = cli("validate", str(cli.write(text)))
    cli.refused(code, f"recipe.yaml:{line}:{col}: error: {path}: expected a number, got {word} (a boolean)")


def test_yes_and_no_stay_strings_and_are_not_numbers(cli: Cli) -> None:
    text = recipe_with("ok") + "fuse: {adapters: [style], lora_scale: yes}\n"
    cli.refused(cli("validate", str(cli.write(text))), "fuse.lora_scale: expected a number, got 'yes'")


# ---- 8. matrix combinations land in distinct folders by construction ----------------------------------

_axis_values = st.one_of(
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False, width=64),
    st.text(max_size=150),
    st.sampled_from(["1", "1.0", "true", "True", "a/b", "a_b", "a b", "a-b", "", ".", "..", "x" * 200]),
)


def _identity(value: Any) -> tuple[str, str]:
    return (type(value).__name__, repr(value))


@settings(max_examples=500, deadline=None)
@given(st.lists(_axis_values, min_size=2, max_size=6), st.lists(_axis_values, min_size=1, max_size=3))
def test_distinct_matrix_combinations_get_distinct_folder_names(first: list[Any], second: list[Any]) -> None:
    first = list({_identity(v): v for v in first}.values())
    second = list({_identity(v): v for v in second}.values())
    labels = {}
    for a in first:
        for b in second:
            label = build_label({"w": a, "style_2": b})
            assert label not in labels, f"{(a, b)} and {labels[label]} share the folder {label!r}"
            labels[label] = (a, b)
            assert re.fullmatch(r"[A-Za-z0-9._=-]{1,120}", label), label
            assert label not in (".", "..")


def test_simple_labels_stay_readable_and_collisions_get_a_hash(cli: Cli) -> None:
    text = recipe_with("w {{ w }}") + "matrix: {w: [0.5, 1, '1', a/b, a_b, 'x' , true, 'true']}\n"
    assert cli("plan", str(cli.write(text)), "--json") == 0, cli.text
    labels = [b["build"] for b in json.loads(cli.out)["builds"]]
    assert labels[:2] == ["w-0.5", "w-1"] and labels[4] == "w-a_b=" + labels[4].split("=")[1]
    assert len(set(labels)) == len(labels) == 8, labels
    assert labels[5] == "w-x" and labels[6] == "w-True"


def test_a_value_listed_twice_on_an_axis_is_refused_at_the_repeat(cli: Cli) -> None:
    text = recipe_with("{{ w }}") + "matrix: {w: [0.5, 0.7, 0.5]}\n"
    line = len(text.splitlines())
    cli.refused(
        cli("validate", str(cli.write(text))),
        f"recipe.yaml:{line}:",
        "matrix.w[2]: matrix axis 'w' lists 0.5 twice",
    )


# ---- 9. sizes from a recipe checked against the model's real dimensions --------------------------------


def _smallest_module_size(*files: Path) -> int:
    """min(out, in * kernel) over every LoRA module of the files, read from their headers directly."""
    sizes = []
    for file in files:
        raw = file.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + length])
        for name, entry in header.items():
            if name.endswith((".lora_A.weight", ".lora_down.weight")):
                _rank, inputs, *kernel = entry["shape"]
                up = name.replace("lora_A", "lora_B").replace("lora_down", "lora_up")
                out = header[up]["shape"][0]
                sizes.append(min(out, inputs * math.prod(kernel)))
    return min(sizes)


def test_svd_rank_larger_than_the_merged_modules_is_refused_at_the_value(cli: Cli) -> None:
    limit = _smallest_module_size(builtin_lora_path("tiny-sd/style"), builtin_lora_path("tiny-sd/detail"))
    merge = "merges:\n  m:\n    method: ties_svd\n    adapters: [style, detail]\n    density: 0.5\n    svd_rank: {}\n"
    base = recipe_with("ok").replace(
        "  style: builtin:tiny-sd/style\n",
        "  style: builtin:tiny-sd/style\n  detail: builtin:tiny-sd/detail\n",
    )
    text = base + merge.format(limit + 1)
    line = len(text.splitlines())
    code = cli("validate", str(cli.write(text)))
    cli.refused(
        code,
        f"recipe.yaml:{line}:15: error: merges.m.svd_rank: svd_rank {limit + 1} is larger than module ",
        f"(min(out, in) = {limit};",
        f"use svd_rank <= {limit}",
    )
    assert cli("validate", str(cli.write(base + merge.format(limit)))) == 0, cli.text


# ---- 10. fuzzing: lock files, manifests, model_index.json and base-folder layouts ---------------------
# (fuzz/run.py runs the same properties for thousands of examples)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_lock_files_and_manifests_never_crash(built_once: Path, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as work:
        folder = Path(shutil.copytree(built_once, Path(work) / "p", symlinks=True))
        lock, manifest = folder / "recipe.lock.json", folder / "out" / "manifest.json"
        replace_file(lock, data.draw(mutated_json(json.loads(lock.read_text()))))
        replace_file(manifest, data.draw(mutated_json(json.loads(manifest.read_text()))))
        check_cli_never_crashes("lock", "--check", str(folder / "recipe.yaml"))
        check_cli_never_crashes("verify", str(folder / "out"))


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_base_folders_never_crash(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as work:
        seed = Path(work) / "seed"
        files, index = seed_base_folder(builtin_base_path("tiny-sd"), seed)
        damaged_copy(seed, Path(work) / "base", data.draw(base_folder_damage(files, index)))
        (Path(work) / "recipe.yaml").write_text(LOCAL_BASE)
        check_cli_never_crashes("validate", str(Path(work) / "recipe.yaml"))


def test_a_pipeline_class_of_another_type_is_refused(cli: Cli) -> None:
    """Found by fuzzing: ``"_class_name": ["StableDiffusionPipeline"]`` reached a set lookup (exit 3)."""
    base = _base_folder(cli.folder)
    _edit_json(base / "model_index.json", _at("_class_name", value=["StableDiffusionPipeline"]))
    code = cli("validate", str(cli.write(LOCAL_BASE)))
    cli.refused(
        code, "model_index.json: pipeline class ['StableDiffusionPipeline'] is not one lorarecipe loads"
    )


@pytest.mark.parametrize("entry", [[[None], None], [{"a": 1}, "X"], ["diffusers", 5], ["diffusers"]])
def test_a_model_index_entry_of_another_shape_is_refused(cli: Cli, entry: list[Any]) -> None:
    """Found by fuzzing: ``[[null], null]`` reached a set lookup and crashed (exit 3)."""
    base = _base_folder(cli.folder)
    index = json.loads((base / "model_index.json").read_text())
    index["image_encoder"] = entry
    (base / "model_index.json").write_text(json.dumps(index))
    code = cli("validate", str(cli.write(LOCAL_BASE)))
    cli.refused(code, "model_index.json: component 'image_encoder' has an unexpected entry")
