"""Hostile recipes and adapter files, end to end through the command line.

Issue 7's "refuse what is dangerous" list, each case run through ``lorarecipe.cli.main``: the answer
is always exit 1 with a ``file:line:col`` message that names the problem (and the limit, for
resource bombs), never a traceback, never exit 3. Payloads are armed, so a refusal that came too
late would show: pickles and a model library write a marker file when they run, a template that
escapes would print a secret from the environment or ``/etc/passwd``, and bombs must be refused
before the runner starts (``run_plan`` is replaced by a tripwire) and in well under a second.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings

import lorarecipe.runner
from lorarecipe.cli import main
from lorarecipe.errors import LorarecipeError
from lorarecipe.inspect import read_header
from lorarecipe.inspect.safetensors_header import DTYPE_BITS
from tests.helpers.cli import LOCATED, Cli
from tests.helpers.malformed import (
    Malformed,
    Tensor,
    check_header_never_crashes,
    check_load_never_crashes,
    join,
    malformed_files,
    split,
)

SECRET = "lorarecipe-hostile-secret-7f3a"

RECIPE = """\
base: builtin:tiny-sd
adapters:
  evil: {file: ADAPTER}
outputs:
  lora: {kind: lora, adapter: evil, path: lora, card: false}
"""


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Cli:
    return Cli(capsys, tmp_path)


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tripwire: the refusal must come before the runner loads anything."""

    def tripwire(*args: object, **kwargs: object) -> None:
        raise AssertionError("run_plan was reached: the input was not refused before work started")

    monkeypatch.setattr(lorarecipe.runner, "run_plan", tripwire)


# ---- pickle: refused by name and by content, never unpickled ----


class _Payload:
    """Unpickling this writes a marker file: proof that a pickle ran."""

    marker = ""

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (Path(self.marker), "pwned"))  # type: ignore[return-value]


def _armed_pickle(path: Path, marker: Path) -> Path:
    payload = _Payload()
    payload.marker = str(marker)
    path.write_bytes(pickle.dumps({"state_dict": payload}, protocol=2))
    return path


@pytest.mark.parametrize("name", ["evil.bin", "evil.ckpt", "evil.pt", "evil.pth", "evil.safetensors"])
def test_pickle_adapters_are_refused_and_never_unpickled(cli: Cli, no_run: None, name: str) -> None:
    marker = cli.folder / "PWNED"
    _armed_pickle(cli.folder / name, marker)
    code = cli.build(RECIPE.replace("ADAPTER", name))
    if name.endswith(".safetensors"):
        cli.refused(code, "adapters.evil", "is a pickle/PyTorch checkpoint")
    else:
        cli.refused(code, "adapters.evil", "pickle", "only reads .safetensors")
    assert not marker.exists()


def test_torch_save_file_renamed_safetensors_is_refused(cli: Cli, no_run: None) -> None:
    import torch

    torch.save({"w": torch.zeros(2)}, str(cli.folder / "renamed.safetensors"))
    cli.refused(cli.build(RECIPE.replace("ADAPTER", "renamed.safetensors")), "is a pickle/PyTorch checkpoint")


def test_pickle_base_checkpoint_is_refused(cli: Cli, no_run: None) -> None:
    marker = cli.folder / "PWNED"
    _armed_pickle(cli.folder / "model.ckpt", marker)
    text = RECIPE.replace("base: builtin:tiny-sd", "base: {file: model.ckpt, family: sd1}")
    _armed_pickle(cli.folder / "lora.safetensors", marker)
    cli.refused(cli.build(text.replace("ADAPTER", "lora.safetensors")), "base", "pickle")
    assert not marker.exists()


def test_base_folder_with_only_pickle_weights_is_refused(cli: Cli) -> None:
    """A diffusers folder whose weights are .bin: diffusers would unpickle them without
    ``use_safetensors=True``; lorarecipe refuses instead of falling back."""
    from lorarecipe.builtin.materialize import builtin_base_path

    base = cli.folder / "base"
    shutil.copytree(builtin_base_path("tiny-sd"), base)
    marker = cli.folder / "PWNED"
    for weights in base.rglob("*.safetensors"):
        weights.unlink()
        _armed_pickle(weights.with_name(weights.name.replace(".safetensors", ".bin")), marker)
    text = RECIPE.replace("base: builtin:tiny-sd", "base: {path: base}")
    shutil.copy(_lora_file(), cli.folder / "lora.safetensors")
    cli.refused(cli.build(text.replace("ADAPTER", "lora.safetensors")))
    assert not marker.exists()


def test_hub_adapter_must_name_a_safetensors_file(cli: Cli, no_run: None) -> None:
    text = RECIPE.replace("evil: {file: ADAPTER}", "evil: {hub: org/lora, weight_name: lora.bin}")
    cli.refused(cli.build(text), "adapters.evil")


# ---- paths: inputs stay in the recipe's folder, outputs in the output root ----


def _lora_file() -> Path:
    from lorarecipe.builtin.materialize import builtin_lora_path

    return builtin_lora_path("tiny-sd/style")


@pytest.fixture
def outside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder outside the recipe's, holding a valid LoRA."""
    folder = tmp_path_factory.mktemp("outside")
    shutil.copy(_lora_file(), folder / "lora.safetensors")
    yield folder


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "symlinked-folder"])
def test_inputs_that_leave_the_recipe_folder_are_refused(
    cli: Cli, no_run: None, outside: Path, how: str
) -> None:
    recipe_dir = cli.folder
    if how == "dotdot":
        ref = os.path.relpath(outside / "lora.safetensors", recipe_dir)
        assert ref.startswith("..")
    elif how == "absolute":
        ref = str(outside / "lora.safetensors")
    elif how == "symlink":
        (recipe_dir / "link.safetensors").symlink_to(outside / "lora.safetensors")
        ref = "link.safetensors"
    else:
        (recipe_dir / "models").symlink_to(outside)
        ref = "models/lora.safetensors"
    code = cli.build(RECIPE.replace("ADAPTER", ref))
    cli.refused(code, "adapters.evil", "--allow-read")
    assert ("is a symlink" in cli.text) == how.startswith("symlink")


def test_allow_read_opens_exactly_the_named_directory(cli: Cli, outside: Path) -> None:
    text = RECIPE.replace("ADAPTER", str(outside / "lora.safetensors"))
    path = cli.recipe(text)
    assert cli("validate", str(path), "--allow-read", str(outside)) == 0, cli.text
    sibling = outside.parent / (outside.name + "-sibling")
    sibling.mkdir()
    shutil.copy(_lora_file(), sibling / "lora.safetensors")
    other = cli.recipe(RECIPE.replace("ADAPTER", str(sibling / "lora.safetensors")), "recipe.yaml")
    cli.refused(cli("validate", str(other), "--allow-read", str(outside)), "--allow-read")


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("../escape", "leaves the output root"),
        ("/tmp/escape", "is absolute"),
        ("a/../../escape", "leaves the output root"),
        ("manifest.json", "reserved"),
        (".lorarecipe-tmp-x", "reserved"),
    ],
)
def test_output_paths_that_leave_the_output_root_are_refused(
    cli: Cli, no_run: None, path: str, needle: str
) -> None:
    shutil.copy(_lora_file(), cli.folder / "lora.safetensors")
    text = RECIPE.replace("ADAPTER", "lora.safetensors").replace("path: lora,", f"path: {json.dumps(path)},")
    cli.refused(cli.build(text), "outputs.lora", needle)


@pytest.mark.slow
def test_output_through_a_symlink_in_the_output_root_is_refused(
    cli: Cli, tmp_path_factory: pytest.TempPathFactory
) -> None:
    target = tmp_path_factory.mktemp("victim")
    (cli.folder / "out").mkdir()
    (cli.folder / "out" / "lora").symlink_to(target, target_is_directory=True)
    shutil.copy(_lora_file(), cli.folder / "lora.safetensors")
    code = cli.build(RECIPE.replace("ADAPTER", "lora.safetensors"))
    cli.refused(code, "goes through a symlink")
    assert list(target.iterdir()) == [], "a file was written through the symlink"


# ---- templates: sandboxed; no attribute walks, no environment, no files ----


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ joiner.__init__.__globals__.os.environ }}",
        "{{ lipsum.__globals__['os'].environ['LORARECIPE_HOSTILE'] }}",
        "{{ self.__init__.__globals__ }}",
        "{{ self._TemplateReference__context }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ config }}",
        "{{ request.environ }}",
        "{% include '/etc/passwd' %}",
        "{% import '/etc/passwd' as x %}",
        "{% extends '/etc/passwd' %}",
        "{{ ''|attr('__class__') }}",
        "{{ 'a'.format.__globals__ }}",
        "{{ 'x' * 100000000 }}",
        "{{ (9 ** 99) ** 99 }}",
        "{% for i in range(100000000) %}x{% endfor %}",
    ],
)
def test_template_escapes_are_recipe_errors(
    cli: Cli, no_run: None, monkeypatch: pytest.MonkeyPatch, template: str
) -> None:
    monkeypatch.setenv("LORARECIPE_HOSTILE", SECRET)
    text = RECIPE.replace("adapters:\n", f"description: {json.dumps(template)}\nadapters:\n")
    shutil.copy(_lora_file(), cli.folder / "lora.safetensors")
    started = time.perf_counter()
    code = cli.build(text.replace("ADAPTER", "lora.safetensors"))
    cli.refused(code, "description")
    assert time.perf_counter() - started < 5
    for leak in (SECRET, "root:x:0:0", "<class 'object'>", "__subclasses__() of"):
        assert leak not in cli.text


def test_a_variable_value_is_never_rendered_as_a_template(cli: Cli, no_run: None) -> None:
    """``--set`` values and variable values are data: ``{{ }}`` inside them is not evaluated again."""
    text = "variables: {w: 0.5}\n" + RECIPE.replace("adapters:\n", "description: 'w={{ w }}'\nadapters:\n")
    shutil.copy(_lora_file(), cli.folder / "lora.safetensors")
    path = cli.recipe(text.replace("ADAPTER", "lora.safetensors"))
    cli("plan", str(path), "--json", "--set", "w={{ ''.__class__.__mro__ }}")
    assert "<class 'object'>" not in cli.text and "Traceback" not in cli.text


# ---- resource bombs: refused before work starts, the limit named ----


def _alias_bomb() -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    return "\n".join(lines) + "\n" + RECIPE


def _matrix_bomb() -> str:
    axes = "\n".join(f"  v{i}: [{', '.join(str(j) for j in range(10))}]" for i in range(7))
    return RECIPE + "matrix:\n" + axes + "\n"


def _grid_bomb(prompts: int, seeds: int) -> str:
    listed = ", ".join(f"p{i}" for i in range(prompts))
    numbers = ", ".join(str(i) for i in range(seeds))
    return RECIPE + f"  grid: {{kind: grid, path: g.png, prompts: [{listed}], seeds: [{numbers}]}}\n"


BOMBS = {
    "alias bomb": (_alias_bomb, "max_nodes"),
    "deep nesting": (lambda: "x: " + "[" * 5000 + "]" * 5000 + "\n" + RECIPE, "max_depth"),
    "deep mappings": (
        lambda: "".join(f"{' ' * i}k{i}:\n" for i in range(200)) + " " * 200 + "v: 1\n",
        "max_depth",
    ),
    "huge file": (lambda: RECIPE + "#" + "x" * 2_000_000 + "\n", "max_bytes"),
    "huge scalar": (lambda: RECIPE + "description: " + "x" * 200_000 + "\n", "max_scalar_chars"),
    "matrix of 10 million builds": (_matrix_bomb, "more than the limit of 256"),
    "grid of a million images": (lambda: _grid_bomb(1000, 1000), "at most 64 items"),
    "grid of 4096 images": (lambda: _grid_bomb(64, 64), "limit: 1024 per grid"),
}


@pytest.mark.parametrize("bomb", list(BOMBS))
def test_resource_bombs_are_refused_before_work_with_the_limit_named(
    cli: Cli, no_run: None, bomb: str
) -> None:
    make, limit = BOMBS[bomb]
    shutil.copy(_lora_file(), cli.folder / "lora.safetensors")
    text = make().replace("ADAPTER", "lora.safetensors")
    started = time.perf_counter()
    code = cli.build(text)
    elapsed = time.perf_counter() - started
    cli.refused(code, limit, located=bomb != "huge file")
    assert elapsed < 10, f"refusing took {elapsed:.1f}s"


def _header_only(path: Path, length: int, body: bytes = b"{}") -> Path:
    path.write_bytes(struct.pack("<Q", length) + body)
    return path


@pytest.mark.parametrize(
    ("claim", "needle"),
    [
        (8 << 30, "exceeds the limit"),  # a header length claiming 8 GiB
        (2**64 - 1, "exceeds the limit"),
        (4096, "larger than the file"),
    ],
)
def test_safetensors_header_claiming_gigabytes_is_refused(
    cli: Cli, no_run: None, claim: int, needle: str
) -> None:
    _header_only(cli.folder / "big.safetensors", claim)
    cli.refused(cli.build(RECIPE.replace("ADAPTER", "big.safetensors")), "adapters.evil", needle)


def test_tensor_shape_claiming_exabytes_is_refused(cli: Cli, no_run: None) -> None:
    header = json.dumps(
        {"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}
    ).encode()
    (cli.folder / "big.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    cli.refused(cli.build(RECIPE.replace("ADAPTER", "big.safetensors")), "adapters.evil")


# ---- NaN / Inf in adapter weights: refused naming the tensor ----


@pytest.mark.slow
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_adapter_with_nan_or_inf_is_refused_naming_the_tensor(cli: Cli, bad: float) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(_lora_file()))
    name = sorted(tensors)[5]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = bad
    save_file(tensors, str(cli.folder / "bad.safetensors"))
    code = cli.build(RECIPE.replace("ADAPTER", "bad.safetensors"))
    cli.refused(code, name, "NaN/Inf", "bad.safetensors")
    assert not (cli.folder / "out" / "lora").exists()


# ---- model_index.json is untrusted: only diffusers/transformers classes are imported ----


@pytest.fixture
def evil_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable module that leaves a marker when imported (what a hostile model_index names)."""
    lib = tmp_path / "lib"
    lib.mkdir()
    marker = tmp_path / "IMPORTED"
    (lib / "evil_lib.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "class UNet2DConditionModel:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(lib))
    return marker


@pytest.mark.slow
def _base_with_model_index(cli: Cli, edit: dict[str, object]) -> None:
    """cli.folder/base: the tiny SD pipeline with ``edit`` applied to its model_index.json, and
    cli.folder/lora.safetensors beside it."""
    from lorarecipe.builtin.materialize import builtin_base_path

    base = cli.folder / "base"
    shutil.copytree(builtin_base_path("tiny-sd"), base)
    index = json.loads((base / "model_index.json").read_text())
    index.update(edit)
    (base / "model_index.json").write_text(json.dumps(index))
    shutil.copy(_lora_file(), cli.folder / "lora.safetensors")


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"unet": ["evil_lib", "UNet2DConditionModel"]}, "names library 'evil_lib'"),
        ({"_class_name": "EvilPipeline"}, "pipeline class 'EvilPipeline'"),
        ({"unet": ["evil_lib", "UNet2DConditionModel", "extra"]}, ""),
    ],
    ids=["component-library", "pipeline-class", "malformed-entry"],
)
def test_model_index_naming_a_foreign_library_is_refused(
    cli: Cli, evil_library: Path, edit: dict[str, object], needle: str
) -> None:
    _base_with_model_index(cli, edit)
    text = RECIPE.replace("base: builtin:tiny-sd", "base: {path: base, family: sd1}")
    code = cli.build(text.replace("ADAPTER", "lora.safetensors"))
    cli.refused(code, needle)
    assert not evil_library.exists(), "the library named by model_index.json was imported"


@pytest.mark.parametrize(
    "edit",
    [
        {"unet": ["evil_lib", "UNet2DConditionModel"]},
        {"scheduler": ["evil_lib", "EvilScheduler"]},
        {"_class_name": "EvilPipeline"},
    ],
    ids=["component-library", "scheduler-library", "pipeline-class"],
)
def test_validate_refuses_a_model_index_naming_a_foreign_library(
    cli: Cli, evil_library: Path, edit: dict[str, object]
) -> None:
    _base_with_model_index(cli, edit)
    path = cli.recipe(
        RECIPE.replace("base: builtin:tiny-sd", "base: {path: base}").replace("ADAPTER", "lora.safetensors")
    )
    cli.refused(cli("validate", str(path)), "model_index.json")
    assert not evil_library.exists()


# ---- malformed safetensors: header reading, loading, and a whole build never crash ----


def _examples(count: int) -> settings:
    return settings(
        max_examples=count,
        deadline=None,
        database=None,
        derandomize=True,  # the same examples on every run
        phases=[Phase.explicit, Phase.generate],  # no shrinking: the report names the mutation
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def seed_files() -> list[bytes]:
    """A PEFT-layout and a kohya-layout LoRA that load into the built-in tiny SD pipeline."""
    from lorarecipe.builtin.materialize import builtin_lora_path

    return [builtin_lora_path(n).read_bytes() for n in ("tiny-sd/style", "tiny-sd/detail")]


@pytest.fixture(scope="module")
def tiny_pipe() -> Any:
    from diffusers import StableDiffusionPipeline

    from lorarecipe.builtin.materialize import builtin_base_path
    from lorarecipe.runner.quiet import quiet_libraries

    quiet_libraries()
    pipe = StableDiffusionPipeline.from_pretrained(str(builtin_base_path("tiny-sd")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def drop_adapter(pipe: Any, name: str) -> None:
    """Keep the shared pipeline clean between examples."""
    if any(name in names for names in pipe.get_list_adapters().values()):
        pipe.delete_adapters(name)


def test_seed_files_are_valid_and_load(seed_files: list[bytes], tiny_pipe: Any, tmp_path: Path) -> None:
    for i, blob in enumerate(seed_files):
        assert join(*split(blob)) == blob  # the strategies rebuild files exactly as safetensors lays them out
        path = tmp_path / f"seed{i}.safetensors"
        path.write_bytes(blob)
        assert check_header_never_crashes(path) == "ok"
        assert check_load_never_crashes(tiny_pipe, f"seed{i}", path, drop_adapter) == "loaded"


def test_malformed_safetensors_headers_end_in_lorarecipe_errors(
    seed_files: list[bytes], tmp_path: Path
) -> None:
    path = tmp_path / "x.safetensors"

    @_examples(500)
    @given(malformed_files(seed_files))
    def run(case: Malformed) -> None:
        path.write_bytes(case.data)
        check_header_never_crashes(path)

    run()


def test_malformed_safetensors_never_crash_load_adapter(
    seed_files: list[bytes], tiny_pipe: Any, tmp_path: Path
) -> None:
    path = tmp_path / "x.safetensors"
    counter = iter(range(10**9))

    @_examples(150)
    @given(malformed_files(seed_files))
    def run(case: Malformed) -> None:
        path.write_bytes(case.data)
        check_load_never_crashes(tiny_pipe, f"fuzz{next(counter)}", path, drop_adapter)

    run()


@pytest.mark.slow
def test_malformed_adapters_through_a_build_exit_0_or_1(
    seed_files: list[bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end the step context turns every failure into a located error (exit 1), never exit 3."""
    counter = iter(range(10**9))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("ADAPTER", "lora.safetensors"))

    @_examples(60)
    @given(malformed_files(seed_files))
    def run(case: Malformed) -> None:
        (tmp_path / "lora.safetensors").write_bytes(case.data)
        code = main(
            ["build", str(recipe), "--out", str(tmp_path / f"out{next(counter)}"), "--quiet", "--force"]
        )
        text = "".join(capsys.readouterr())
        assert code in (0, 1) and "Traceback" not in text, f"{case.kind}: exit {code}\n{text}"
        if code == 1:
            assert LOCATED.search(text), text

    run()


Edit = Callable[[dict[str, str], list[Tensor]], tuple[dict[str, str], list[Tensor]]]


def _first(tensors: list[Tensor], *endings: str) -> int:
    return next(i for i, t in enumerate(tensors) if t.name.endswith(endings))


def _rank_changed(metadata: dict[str, str], tensors: list[Tensor]) -> tuple[dict[str, str], list[Tensor]]:
    i = _first(tensors, "lora_B.weight", "lora_up.weight")
    t = tensors[i]
    row = len(t.data) // t.shape[0]
    tensors[i] = Tensor(t.name, t.dtype, (t.shape[0] + 1, *t.shape[1:]), t.data + b"\0" * row)
    return metadata, tensors


def _retyped(dtype: str) -> Edit:
    def edit(metadata: dict[str, str], tensors: list[Tensor]) -> tuple[dict[str, str], list[Tensor]]:
        i = _first(tensors, ".weight")
        t = tensors[i]
        count = len(t.data) * 8 // DTYPE_BITS[dtype]
        tensors[i] = Tensor(t.name, dtype, (*t.shape[:-1], count // math.prod(t.shape[:-1])), t.data)
        return metadata, tensors

    return edit


def _adapter_metadata(text: str) -> Edit:
    def edit(metadata: dict[str, str], tensors: list[Tensor]) -> tuple[dict[str, str], list[Tensor]]:
        return {**metadata, "lora_adapter_metadata": text}, tensors

    return edit


def _peft_alpha(metadata: dict[str, str], tensors: list[Tensor]) -> tuple[dict[str, str], list[Tensor]]:
    module = tensors[_first(tensors, ".lora_A.weight")].name.removesuffix(".lora_A.weight")
    return metadata, [*tensors, Tensor(module + ".alpha", "F32", (), struct.pack("<f", 4.0))]


PEFT, KOHYA = 0, 1
WRONG_CONTENT: dict[str, tuple[int, Edit, str]] = {
    # id: (seed, edit, what diffusers/torch raise today)
    "peft-shape-does-not-fit": (PEFT, _rank_changed, "RuntimeError: size mismatch"),
    "kohya-shape-does-not-fit": (KOHYA, _rank_changed, "RuntimeError: ignore_mismatched_sizes"),
    "integer-weights": (PEFT, _retyped("I32"), "RuntimeError: only floating point can require grad"),
    "float8-weights": (PEFT, _retyped("F8_E4M3"), "NotImplementedError: isfinite for Float8"),
    "adapter-metadata-not-json": (PEFT, _adapter_metadata("{"), "JSONDecodeError"),
    "adapter-metadata-a-list": (PEFT, _adapter_metadata("[]"), "AttributeError"),
    "adapter-metadata-without-config": (PEFT, _adapter_metadata('{"r": 0}'), "KeyError: 'model_type'"),
    "adapter-metadata-on-kohya": (KOHYA, _adapter_metadata('{"r": 4}'), "ValueError: network_alphas"),
    "peft-file-with-an-alpha-tensor": (PEFT, _peft_alpha, "ValueError: names must contain 'lora'"),
}


@pytest.mark.parametrize("case", list(WRONG_CONTENT))
def test_load_adapter_refuses_valid_files_with_wrong_content(
    seed_files: list[bytes], tiny_pipe: Any, tmp_path: Path, case: str
) -> None:
    from lorarecipe.runner.pipeline.adapters import load_adapter

    seed, edit, _today = WRONG_CONTENT[case]
    path = tmp_path / "wrong.safetensors"
    path.write_bytes(join(*edit(*split(seed_files[seed]))))
    read_header(path)  # a valid safetensors file: only its content is wrong
    try:
        with pytest.raises(LorarecipeError, match=r"wrong\.safetensors"):
            load_adapter(tiny_pipe, case, path)
    finally:
        drop_adapter(tiny_pipe, case)


@pytest.mark.parametrize("dtype", ["I32", "I16", "U8", "BOOL"])
def test_integer_lora_weights_are_refused_not_cast(cli: Cli, seed_files: list[bytes], dtype: str) -> None:
    metadata, tensors = split(seed_files[PEFT])
    t = tensors[0]  # same name and shape, so it fits its module; only the dtype is wrong
    tensors[0] = Tensor(t.name, dtype, t.shape, t.data[: math.prod(t.shape) * DTYPE_BITS[dtype] // 8])
    (cli.folder / "int.safetensors").write_bytes(join(metadata, tensors))
    text = RECIPE.replace("ADAPTER", "int.safetensors").replace(
        "outputs:", "fuse: {adapters: [evil], lora_scale: 1.0}\noutputs:"
    )
    cli.refused(cli.build(text), t.name)
