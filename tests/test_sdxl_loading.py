"""SDXL loading: diffusers folders, cached repo ids and original single files (base, refiner, inpainting)."""

import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from support.sdxl import (
    BASE_BIGG_PREFIX,
    REFINER_BIGG_PREFIX,
    bigg_to_original,
    clip_l_to_original,
    components_to_original,
    make_tiny_sdxl_components,
    unet_to_original,
    vae_to_original,
    write_safetensors_streamed,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldmkit import loading
from ldmkit.errors import ModelLoadError
from ldmkit.loading import (
    SDXL_BASE_CONFIG,
    SDXL_INPAINTING_UNET_CONFIG,
    SDXL_REFINER_CONFIG,
    Components,
    load_components,
    save_pretrained,
)

KINDS = ("base", "refiner", "inpainting")
MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")


def assert_same_weights(expected: Components, actual: Components, dtype: torch.dtype = torch.float32) -> None:
    """Every tensor equal, in `dtype` (the dtype the weights were written in)."""
    for name in MODELS:
        want, got = getattr(expected, name), getattr(actual, name)
        if want is None:
            assert got is None, name
            continue
        want, got = want.state_dict(), got.state_dict()
        assert want.keys() == got.keys(), name
        for key, tensor in want.items():
            assert got[key].dtype == dtype, f"{name}: {key}"
            assert torch.equal(got[key], tensor.to(dtype)), f"{name}: {key}"


def write_original(components: Components, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    tensors = {key: tensor.to(dtype).contiguous() for key, tensor in components_to_original(components).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


# ---- diffusers folders ----


def test_folder_round_trip(kind, tmp_path):
    components = make_tiny_sdxl_components(kind=kind)
    folder = save_pretrained(components, tmp_path / f"sdxl-{kind}")
    loaded = load_components(folder)
    assert_same_weights(components, loaded)
    assert loaded.pipeline_config == components.pipeline_config
    assert loaded.tokenizer_2.pad_token_id == 0  # bigG pads with '!'
    assert loaded.tokenizer_2("wow!").input_ids == [49406, 2781, 256, 49407]  # a typed '!' stays a word
    if kind == "refiner":
        assert loaded.tokenizer is None and not (folder / "text_encoder").exists()
    else:
        assert loaded.tokenizer.pad_token_id == 49407
    assert loaded.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert loaded.name == f"sdxl-{kind}"


def test_saved_folder_loads_in_diffusers(tmp_path):
    components = make_tiny_sdxl_components()
    pipe = StableDiffusionXLPipeline.from_pretrained(save_pretrained(components, tmp_path / "sdxl"))
    assert torch.equal(pipe.text_encoder_2.text_projection.weight, components.text_encoder_2.text_projection.weight)
    assert pipe.config.force_zeros_for_empty_prompt is True


def test_folder_written_by_diffusers_loads(tmp_path):
    """The folder an SDXL user has (diffusers' own save), not one ldmkit wrote: this crashed before."""
    c = make_tiny_sdxl_components(seed=3)
    diffusers_pipe = StableDiffusionXLPipeline(
        vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer,
        tokenizer_2=c.tokenizer_2, unet=c.unet, scheduler=make_euler(c),
    )  # fmt: skip
    diffusers_pipe.save_pretrained(tmp_path / "from-diffusers")
    assert_same_weights(c, load_components(tmp_path / "from-diffusers"))


def make_euler(components):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(components.scheduler_config)


def test_cached_repo_id_resolves_offline(tmp_path, monkeypatch):
    components = make_tiny_sdxl_components(kind="refiner")
    repo = tmp_path / "hub" / "models--someone--tiny-sdxl-refiner"
    save_pretrained(components, repo / "snapshots" / "89ab")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("89ab")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_components("someone/tiny-sdxl-refiner")
    assert_same_weights(components, loaded)
    assert loaded.name == "tiny-sdxl-refiner" and loaded.pipeline_config["requires_aesthetics_score"]


def test_folder_missing_the_second_text_encoder(tmp_path):
    folder = save_pretrained(make_tiny_sdxl_components(), tmp_path / "sdxl")
    shutil.rmtree(folder / "text_encoder_2")
    message = one_line_error(folder)
    assert "missing the text_encoder_2 component" in message


def test_folder_with_a_missing_bigg_weight(tmp_path):
    from safetensors.torch import load_file

    folder = save_pretrained(make_tiny_sdxl_components(), tmp_path / "sdxl")
    weights = next((folder / "text_encoder_2").glob("*.safetensors"))
    state_dict = load_file(str(weights))
    del state_dict["text_projection.weight"]
    save_file(state_dict, str(weights), metadata={"format": "pt"})
    assert "text_encoder_2 has 1 missing" in one_line_error(folder)


# ---- original single files ----


def test_single_file_round_trip_with_config(kind, tmp_path):
    components = make_tiny_sdxl_components(kind=kind, seed=1)
    folder = save_pretrained(components, tmp_path / "configs")
    path = write_original(components, tmp_path / f"tiny-{kind}.safetensors", dtype=torch.float16)
    loaded = load_components(path, config=folder)
    assert_same_weights(components, loaded, dtype=torch.float16)  # the file's dtype is kept
    assert loaded.pipeline_config == components.pipeline_config
    assert loaded.name == f"tiny-{kind}" and loaded.source == str(path.resolve())
    assert (loaded.tokenizer is None) == (kind == "refiner")


def test_original_layout_names(tmp_path):
    """The keys real SDXL files have (sgm's conditioner layout), which detection relies on."""
    base = components_to_original(make_tiny_sdxl_components())
    assert loading.SDXL_CLIP_L_KEY in base
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in base
    assert "conditioner.embedders.1.model.text_projection" in base
    assert "model.diffusion_model.label_emb.0.0.weight" in base
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in base
    refiner = components_to_original(make_tiny_sdxl_components(kind="refiner"))
    assert "conditioner.embedders.0.model.positional_embedding" in refiner
    assert not any(
        key.startswith(("conditioner.embedders.1.", "conditioner.embedders.0.transformer.")) for key in refiner
    )
    assert [loading._sdxl_kind(sd) for sd in (base, refiner)] == ["base", "refiner"]


def fake_sdxl_checkpoint(kind: str, conv_in=None, add_embedding=None) -> dict:
    """Just the tensors detection and the shape check look at."""
    real_conv_in, real_add_embedding = loading.SDXL_SHAPES[kind]
    keys = [loading.SDXL_REFINER_BIGG_PREFIX] if kind == "refiner" else [loading.SDXL_BIGG_PREFIX]
    checkpoint = {prefix + "positional_embedding": torch.empty(1) for prefix in keys}
    if kind != "refiner":
        checkpoint[loading.SDXL_CLIP_L_KEY] = torch.empty(1)
    checkpoint[loading.UNET_CONV_IN_KEY] = torch.empty(conv_in or real_conv_in)
    checkpoint[loading.UNET_ADD_EMBEDDING_KEY] = torch.empty(add_embedding or real_add_embedding)
    return checkpoint


def test_kind_detection(kind):
    checkpoint = fake_sdxl_checkpoint(kind)
    assert loading._sdxl_kind(checkpoint) == kind
    loading._check_sdxl_shapes(checkpoint, kind, Path("x.safetensors"))  # the real sizes pass


@pytest.mark.parametrize(
    "checkpoint",
    [
        fake_sdxl_checkpoint("base", conv_in=(320, 8, 3, 3)),
        fake_sdxl_checkpoint("base", add_embedding=(1280, 2560)),  # refiner-sized time embedding
        fake_sdxl_checkpoint("refiner", conv_in=(320, 4, 3, 3)),
    ],
)
def test_sdxl_encoders_with_another_unet_say_to_pass_config(checkpoint, tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file(checkpoint, str(path))
    message = one_line_error(path)
    assert "config=" in message and "SDXL" in message


def test_tiny_sdxl_file_without_config_names_the_sizes(tmp_path):
    path = write_original(make_tiny_sdxl_components(), tmp_path / "tiny.safetensors")
    assert "UNet of another size" in one_line_error(path)


def test_truncated_sdxl_file(tmp_path):
    path = write_original(make_tiny_sdxl_components(), tmp_path / "tiny.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    assert "truncated or corrupted" in one_line_error(path)


def test_unknown_file_is_still_one_line(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"some.other.model.weight": torch.zeros(2)}, str(path))
    assert "not an SD 1.x/2.x or SDXL checkpoint" in one_line_error(path)


def one_line_error(source, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as error:
        load_components(source, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


# ---- the bundled configs ----


def test_bundled_sdxl_configs_carry_the_traps():
    for folder in (SDXL_BASE_CONFIG, SDXL_REFINER_CONFIG):
        vae = AutoencoderKL.load_config(folder / "vae")
        assert (vae["scaling_factor"], vae["force_upcast"]) == (0.13025, True)
        bigg = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
        assert (bigg.hidden_act, bigg.num_hidden_layers, bigg.hidden_size, bigg.projection_dim) == (
            "gelu",
            32,
            1280,
            1280,
        )
        assert json.loads((folder / "tokenizer_2" / "special_tokens_map.json").read_text())["pad_token"] == "!"
    base, refiner = (
        UNet2DConditionModel.load_config(folder / "unet") for folder in (SDXL_BASE_CONFIG, SDXL_REFINER_CONFIG)
    )
    inpainting = UNet2DConditionModel.load_config(SDXL_INPAINTING_UNET_CONFIG)
    for unet in (base, refiner, inpainting):
        assert (unet["addition_embed_type"], unet["addition_time_embed_dim"]) == ("text_time", 256)
    assert (base["projection_class_embeddings_input_dim"], base["cross_attention_dim"]) == (2816, 2048)
    assert (refiner["projection_class_embeddings_input_dim"], refiner["cross_attention_dim"]) == (2560, 1280)
    assert (inpainting["in_channels"], inpainting["projection_class_embeddings_input_dim"]) == (9, 2816)
    clip_l = CLIPTextConfig.from_pretrained(SDXL_BASE_CONFIG / "text_encoder")
    assert (clip_l.hidden_act, clip_l.num_hidden_layers, clip_l.hidden_size) == ("quick_gelu", 12, 768)
    index = json.loads((SDXL_REFINER_CONFIG / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["requires_aesthetics_score"] is True


# ---- real SDXL architectures, patterned weights ----


def pattern(name: str, shape: torch.Size) -> torch.Tensor:
    """fp16 noise of its own for each weight name, reproducible: the expected values are drawn again to compare."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=torch.float16).uniform_(-1, 1, generator=generator)


def meta_modules(config_dir: Path, refiner: bool) -> dict:
    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae")),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2")
            ),
        }
        if not refiner:
            modules["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    return modules


def write_patterned_original(config_dir: Path, refiner: bool, path: Path) -> None:
    """An original-layout fp16 SDXL file of the real sizes (7 GB for the base), one component in memory at a time."""
    modules = meta_modules(config_dir, refiner)
    to_original = {
        "unet": lambda sd: unet_to_original(sd, modules["unet"].config),
        "vae": lambda sd: vae_to_original(sd, modules["vae"].config),
        "text_encoder": clip_l_to_original,
        "text_encoder_2": lambda sd: bigg_to_original(sd, REFINER_BIGG_PREFIX if refiner else BASE_BIGG_PREFIX),
    }

    def part(name: str):
        shapes = modules[name].state_dict()

        def make() -> dict:
            return to_original[name]({key: pattern(f"{name}.{key}", t.shape) for key, t in shapes.items()})

        return to_original[name]({key: t.to(torch.float16) for key, t in shapes.items()}), make

    write_safetensors_streamed(path, [part(name) for name in modules])


def assert_patterned(loaded: Components) -> None:
    for name in MODELS:
        module = getattr(loaded, name)
        if module is None:
            continue
        for key, tensor in module.state_dict().items():
            assert tensor.dtype == torch.float16, f"{name}.{key}"
            assert torch.equal(tensor, pattern(f"{name}.{key}", tensor.shape)), f"{name}.{key}"


@pytest.mark.slow
@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_real_sized_sdxl_single_file_loads_without_config(refiner, tmp_path):
    config_dir = SDXL_REFINER_CONFIG if refiner else SDXL_BASE_CONFIG
    path = tmp_path / ("sd_xl_refiner_1.0.safetensors" if refiner else "sd_xl_base_1.0.safetensors")
    write_patterned_original(config_dir, refiner, path)
    loaded = load_components(path)
    assert_patterned(loaded)
    assert loaded.unet.config.cross_attention_dim == (1280 if refiner else 2048)
    assert loaded.vae.config.scaling_factor == 0.13025
    assert loaded.tokenizer_2.pad_token_id == 0
    assert (loaded.text_encoder is None) == refiner
    assert loaded.pipeline_config["requires_aesthetics_score"] == refiner
    assert loaded.scheduler_config["prediction_type"] == "epsilon"
