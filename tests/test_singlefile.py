"""Single-file writer: tiny SD1-, SD2- and SDXL-like pipelines go out through ``to_single_file_state_dict``
and come back through diffusers' own ``from_single_file`` bit for bit (fp32 and fp16); the full-size
SD1.5 / SD2.1 / SDXL layouts, built on the meta device, are read back by diffusers' own component
loaders with every tensor landing on the key it came from, in the right shape and rows."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file, single_file_model, single_file_utils
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lorarecipe.outputs.singlefile import (
    OutputTensor,
    Piece,
    apply_transform,
    inverse_lookup,
    single_file_layout,
    to_single_file_state_dict,
)

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# ------------------------------------------------------------------------------------ tiny builders


def _tokenizer() -> CLIPTokenizer:
    """A real byte-level CLIP BPE vocabulary, in memory (transformers 5 ignores vocab_file=)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # GPT-2's bytes_to_unicode: 188 printable bytes map to themselves
    chars = [chr(c) for c in cs]
    tokens = chars + [c + "</w>" for c in chars] + ["ph", "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=[("p", "h")], model_max_length=77)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter distinct and random: default inits (norms = 1, biases = 0) would hide swaps."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


def _clip(cls: type[torch.nn.Module], vocab: int, hidden: int, act: str) -> torch.nn.Module:
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act=act,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    return cls(config)


def _vae(blocks: tuple[int, ...], layers: int) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=blocks,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )


_TINY_UNET: dict[str, dict[str, Any]] = {
    "sd1": {
        "layers_per_block": 1,
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
    },
    "sd2": {
        "layers_per_block": 2,
        "block_out_channels": (32, 32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 48,
        "attention_head_dim": (2, 4, 4),
        "use_linear_projection": True,
    },
    "sdxl": {
        "layers_per_block": 2,
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2),
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 32,  # 6 time ids + text_encoder_2's projection
        "cross_attention_dim": 32 + 48,  # both text encoders' widths
    },
}


def _tiny_pipeline(family: str) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """sd1: 2 blocks, 1 layer; sd2: 3 blocks, 2 layers, linear projections, gelu OpenCLIP-style text
    encoder; sdxl: text_time UNet with (1, 2) transformer layers and two text encoders of different width
    (diffusers' reader tells SDXL's encoders apart by width)."""
    torch.manual_seed(0)
    tok = _tokenizer()
    n = len(tok)
    models: dict[str, torch.nn.Module] = {
        "unet": UNet2DConditionModel(sample_size=32, norm_num_groups=32, **_TINY_UNET[family])
    }
    if family == "sd1":
        models |= {"vae": _vae((32, 64), 1), "text_encoder": _clip(CLIPTextModel, n, 32, "quick_gelu")}
    elif family == "sd2":
        models |= {"vae": _vae((32, 32, 64), 2), "text_encoder": _clip(CLIPTextModel, n, 48, "gelu")}
    else:
        models |= {
            "vae": _vae((32, 64), 1),
            "text_encoder": _clip(CLIPTextModel, n, 32, "quick_gelu"),
            "text_encoder_2": _clip(CLIPTextModelWithProjection, n, 48, "gelu"),
        }
    for seed, model in enumerate(models.values()):
        _randomize(model, seed)
    schedule = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            **models, tokenizer=tok, tokenizer_2=tok, scheduler=EulerDiscreteScheduler(**schedule)
        )
    scheduler = DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        **models,
        tokenizer=tok,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _components(pipe: Any) -> dict[str, torch.nn.Module]:
    names = ("unet", "vae", *TEXT_ENCODERS)
    return {c: getattr(pipe, c) for c in names if getattr(pipe, c, None) is not None}


def _configs(folder: Path, components: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {c: json.loads((folder / c / "config.json").read_text()) for c in components}


# ----------------------------------------------------------------------------------- tiny round-trip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_tiny_pipeline_round_trips_through_from_single_file_bit_for_bit(
    family: str, dtype: torch.dtype, tmp_path: Path
) -> None:
    pipe = _tiny_pipeline(family).to(dtype)
    folder = tmp_path / "diffusers"
    pipe.save_pretrained(folder)
    originals = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in _components(pipe).items()}
    # Leave only configs and tokenizers: every weight must come from the single file, never from the folder.
    for weights in [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]:
        weights.unlink()

    state_dict = to_single_file_state_dict(family, originals, _configs(folder, originals))
    # OpenCLIP packs q, k, v (weight and bias) into one in_proj each: 4 fewer tensors per layer, 2 layers.
    open_clip = {"sd1": 0, "sd2": 1, "sdxl": 1}[family]
    assert len(state_dict) == sum(len(sd) for sd in originals.values()) - 4 * 2 * open_clip
    file = tmp_path / "model.safetensors"
    save_file(state_dict, str(file))

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    loaded = cls.from_single_file(str(file), config=str(folder), local_files_only=True, torch_dtype=dtype)
    for component, original in originals.items():
        reloaded = getattr(loaded, component).state_dict()
        assert sorted(reloaded) == sorted(original), component
        for key, value in original.items():
            got = reloaded[key]
            assert got.dtype == value.dtype and torch.equal(got, value), f"{component}: {key}"


def test_layout_is_a_plan_the_executor_and_inverse_lookup_agree_with() -> None:
    pipe = _tiny_pipeline("sdxl")
    state_dicts = {c: m.state_dict() for c, m in _components(pipe).items()}
    configs = {c: dict(m.config) if c in ("unet", "vae") else {} for c, m in _components(pipe).items()}
    shapes = {c: {k: tuple(v.shape) for k, v in sd.items()} for c, sd in state_dicts.items()}
    layout = single_file_layout("sdxl", shapes, configs)
    out = to_single_file_state_dict("sdxl", state_dicts, configs)
    assert [t.key for t in layout] == sorted(out)
    assert all(tuple(out[t.key].shape) == t.shape for t in layout)

    lookup = inverse_lookup(layout)
    assert set(lookup) == {(c, k) for c, sd in state_dicts.items() for k in sd}
    for (component, key), (out_key, rows, transform) in lookup.items():
        stored = out[out_key] if rows is None else out[out_key][rows[0] : rows[1]]
        assert torch.equal(stored, apply_transform(state_dicts[component][key], transform))

    expected = {
        ("text_encoder_2", "text_model.encoder.layers.1.self_attn.k_proj.weight"): (
            "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
            (48, 96),
            None,
        ),
        ("text_encoder_2", "text_projection.weight"): (
            "conditioner.embedders.1.model.text_projection",
            None,
            "transpose",
        ),
        ("vae", "decoder.mid_block.attentions.0.to_q.weight"): (
            "first_stage_model.decoder.mid.attn_1.q.weight",
            None,
            "conv1x1",
        ),
        ("vae", "decoder.up_blocks.0.upsamplers.0.conv.weight"): (
            "first_stage_model.decoder.up.1.upsample.conv.weight",
            None,
            None,
        ),
        # SDXL's up block 0 has attention, so its upsampler sits at slot 2 of output block 2 (else slot 1).
        ("unet", "up_blocks.0.upsamplers.0.conv.weight"): (
            "model.diffusion_model.output_blocks.2.2.conv.weight",
            None,
            None,
        ),
        ("unet", "up_blocks.1.resnets.2.conv_shortcut.bias"): (
            "model.diffusion_model.output_blocks.5.0.skip_connection.bias",
            None,
            None,
        ),
    }
    assert {k: lookup[k] for k in expected} == expected
    assert OutputTensor("k", (Piece("unet", "conv_in.weight"),), None).shape is None


def test_unmapped_keys_are_all_named_never_dropped() -> None:
    pipe = _tiny_pipeline("sd1")
    shapes = {c: {k: tuple(v.shape) for k, v in m.state_dict().items()} for c, m in _components(pipe).items()}
    configs = {"unet": dict(pipe.unet.config), "vae": dict(pipe.vae.config)}
    shapes["unet"] = {**shapes["unet"], "time_embedding.cond_proj.weight": (128, 4), "mystery.weight": (1,)}
    with pytest.raises(ValueError, match=r"2 tensor\(s\)[\s\S]*time_embedding\.cond_proj\.weight[\s\S]*myst"):
        single_file_layout("sd1", shapes, configs)
    with pytest.raises(ValueError, match="text_encoder_2"):
        single_file_layout("sd1", {"text_encoder_2": {}}, {})
    with pytest.raises(ValueError, match="unknown single-file family"):  # SD 3 has one since issue 17
        single_file_layout("no-such-family", {}, {})
    with pytest.raises(ValueError, match="layers_per_block"):
        single_file_layout(
            "sd1", {"unet": shapes["unet"]}, {"unet": {**configs["unet"], "layers_per_block": [1, 2]}}
        )


def test_reader_limits_are_refused_rather_than_written() -> None:
    same_width = {"embeddings.position_embedding.weight": (77, 32)}
    with pytest.raises(ValueError, match="tells them apart by width"):
        single_file_layout("sdxl", {"text_encoder": same_width, "text_encoder_2": same_width}, {})
    with pytest.raises(ValueError, match=r"resblocks\.23"):
        single_file_layout("sd2", {"text_encoder": {"encoder.layers.23.mlp.fc1.weight": (4, 4)}}, {})
    mid_without_attention = {
        "mid_block.resnets.0.norm1.weight": (4,),
        "mid_block.resnets.1.norm1.weight": (4,),
    }
    with pytest.raises(ValueError, match="mid block without attention"):
        single_file_layout("sd1", {"unet": mid_without_attention}, {"unet": {"layers_per_block": 1}})


# ---------------------------------------------------------------------------- full size, meta device

_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12}
_FULL_SIZE: dict[str, dict[str, tuple[type, dict[str, Any]]]] = {
    "sd1": {
        "unet": (UNet2DConditionModel, {"cross_attention_dim": 768}),  # defaults = SD1.5
        "text_encoder": (CLIPTextModel, {**_CLIP_L, "projection_dim": 768}),
    },
    "sd2": {
        "unet": (
            UNet2DConditionModel,
            {
                "sample_size": 96,
                "cross_attention_dim": 1024,
                "attention_head_dim": (5, 10, 20, 20),
                "use_linear_projection": True,
                "upcast_attention": True,
            },
        ),
        "text_encoder": (
            CLIPTextModel,
            {
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_attention_heads": 16,
                "num_hidden_layers": 23,
                "projection_dim": 512,
                "hidden_act": "gelu",
            },
        ),
    },
    "sdxl": {
        "unet": (
            UNet2DConditionModel,
            {
                "sample_size": 128,
                "block_out_channels": (320, 640, 1280),
                "layers_per_block": 2,
                "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                "transformer_layers_per_block": (1, 2, 10),
                "attention_head_dim": (5, 10, 20),
                "cross_attention_dim": 2048,
                "use_linear_projection": True,
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816,
            },
        ),
        "text_encoder": (CLIPTextModel, {**_CLIP_L, "projection_dim": 768}),
        "text_encoder_2": (
            CLIPTextModelWithProjection,
            {
                "hidden_size": 1280,
                "intermediate_size": 5120,
                "num_attention_heads": 20,
                "num_hidden_layers": 32,
                "projection_dim": 1280,
                "hidden_act": "gelu",
            },
        ),
    },
}
_SD_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
}
_MODEL_TYPE = {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}


def _full_size_meta(family: str, folder: Path) -> dict[str, torch.nn.Module]:
    """Full-size models with every parameter on the meta device; their configs saved under ``folder``."""
    specs = {**_FULL_SIZE[family], "vae": (AutoencoderKL, _SD_VAE)}
    models: dict[str, torch.nn.Module] = {}
    with init_empty_weights():
        for component, (cls, kwargs) in specs.items():
            if issubclass(cls, CLIPTextModel | CLIPTextModelWithProjection):
                config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **kwargs)
                config.save_pretrained(folder / component)
                models[component] = cls(config)
            else:
                models[component] = cls(**kwargs)
                models[component].save_config(folder / component)
    return models


@pytest.fixture
def intercept_loading(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
    """Run diffusers' single-file component loaders for real, but capture the converted state dict
    they would load (keyed by id(model)) instead of materializing multi-GB full-size weights."""
    captured: dict[int, dict[str, torch.Tensor]] = {}

    def capture(
        model: torch.nn.Module, state_dict: dict[str, torch.Tensor], *args: Any, **kwargs: Any
    ) -> list[str]:
        captured[id(model)] = dict(state_dict)
        return []

    monkeypatch.setattr(single_file_model, "load_model_dict_into_meta", capture)
    monkeypatch.setattr(single_file_utils, "load_model_dict_into_meta", capture)
    monkeypatch.setattr(single_file_model, "dispatch_model", lambda model, **kwargs: model)
    yield captured


def _single_value(t: torch.Tensor) -> int | None:
    """The one value a tensor holds, or None if it holds several (cheap for stride-0 expanded tensors)."""
    if t.numel() == 1 or all(s == 0 for s in t.stride()):
        return int(t[(0,) * t.dim()])
    lo, hi = torch.aminmax(t)
    return int(lo) if int(lo) == int(hi) else None


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_layout_reads_back_through_diffusers_loaders(
    family: str, tmp_path: Path, intercept_loading: dict[int, dict[str, torch.Tensor]]
) -> None:
    models = _full_size_meta(family, tmp_path)
    configs = _configs(tmp_path, models)
    # Each diffusers tensor becomes a no-memory constant equal to its own index: after writing and
    # reading back, every key must hold its own index, in its own shape.
    fakes: dict[str, dict[str, torch.Tensor]] = {}
    for component, model in models.items():
        keys = model.state_dict()
        fakes[component] = {
            k: torch.full((), i, dtype=torch.int16).expand(v.shape) for i, (k, v) in enumerate(keys.items())
        }
    checkpoint = to_single_file_state_dict(family, fakes, configs)
    assert single_file_utils.infer_diffusers_model_type(checkpoint) == _MODEL_TYPE[family]

    for component, original in fakes.items():
        library = "diffusers" if component in ("unet", "vae") else "transformers"
        loaded = single_file.load_single_file_sub_model(
            library_name=library,
            class_name=type(models[component]).__name__,
            name=component,
            checkpoint=checkpoint,
            pipelines=None,
            is_pipeline_module=False,
            cached_model_config_path=str(tmp_path),
            local_files_only=True,
        )
        read = intercept_loading[id(loaded)]
        assert sorted(read) == sorted(original), component
        for key, value in original.items():
            assert read[key].shape == value.shape, f"{component}: {key}"
            assert _single_value(read[key]) == _single_value(value), f"{component}: {key}"


_RELEASED = "model.diffusion_model."
_RELEASED_KEYS: dict[str, dict[str, tuple[int, ...]]] = {
    "sd1": {
        f"{_RELEASED}output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        f"{_RELEASED}input_blocks.3.0.op.weight": (320, 320, 3, 3),
        f"{_RELEASED}output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        f"{_RELEASED}output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        f"{_RELEASED}middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        f"{_RELEASED}time_embed.2.weight": (1280, 1280),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    },
    "sd2": {
        f"{_RELEASED}middle_block.1.proj_in.weight": (1280, 1280),
        f"{_RELEASED}input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.bias": (4096,),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
    },
    "sdxl": {
        f"{_RELEASED}label_emb.0.0.weight": (1280, 2816),
        f"{_RELEASED}input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        f"{_RELEASED}output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        f"{_RELEASED}output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        f"{_RELEASED}output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.bias": (768,),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.ln_final.bias": (1280,),
    },
}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_names_and_shapes_match_the_released_checkpoints(family: str, tmp_path: Path) -> None:
    """Spot checks against keys and shapes of the released SD1.5, SD2.1 and SDXL-base files."""
    models = _full_size_meta(family, tmp_path)
    shapes = {c: {k: tuple(v.shape) for k, v in m.state_dict().items()} for c, m in models.items()}
    layout = {t.key: t.shape for t in single_file_layout(family, shapes, _configs(tmp_path, models))}
    assert {k: layout.get(k) for k in _RELEASED_KEYS[family]} == _RELEASED_KEYS[family]
