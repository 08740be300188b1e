"""Model loading: folder and single-file round trips, cached repo ids, architecture detection, errors."""

import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_components
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from support.convert import save_single_file
from transformers import CLIPTextConfig, CLIPTextModel

from ldmkit import loading
from ldmkit.errors import ModelLoadError
from ldmkit.families import reference_pipeline
from ldmkit.loading import (
    SD1_CONFIG,
    SD2_EPSILON_CONFIG,
    SD2_V_CONFIG,
    Components,
    load_components,
    save_pretrained,
)

MODELS = ("unet", "vae", "text_encoder")


def assert_same_weights(expected: Components, actual: Components, dtype: torch.dtype | None = None) -> None:
    """Every tensor equal (after rounding to `dtype` when the file was written in it)."""
    for name in MODELS:
        want, got = getattr(expected, name).state_dict(), getattr(actual, name).state_dict()
        assert want.keys() == got.keys(), name
        for key, tensor in want.items():
            assert got[key].dtype == torch.float32, key
            assert torch.equal(got[key], tensor.to(dtype or tensor.dtype).float()), f"{name}: {key}"


def tiny_sd2_components() -> Components:
    """Tiny components whose text encoder is OpenCLIP-like (gelu), so it converts to SD2's key layout."""
    components = make_tiny_components(seed=1)
    config = components.text_encoder.config.to_dict() | {"hidden_act": "gelu", "pad_token_id": 0}
    torch.manual_seed(1)
    components.text_encoder = CLIPTextModel(CLIPTextConfig(**config)).eval()
    components.tokenizer = loading.load_tokenizer(pad_token="!")
    components.scheduler_config = dict(components.scheduler_config, prediction_type="v_prediction")
    return components


@pytest.fixture
def tiny_folder(tiny_components, tmp_path) -> Path:
    return save_pretrained(tiny_components, tmp_path / "tiny-model")


# ---- diffusers folders ----


def test_folder_round_trip(tiny_components, tiny_folder):
    loaded = load_components(tiny_folder)
    assert_same_weights(tiny_components, loaded)
    assert loaded.name == "tiny-model" and loaded.source == str(tiny_folder.resolve())
    assert loaded.tokenizer.pad_token_id == 49407
    for key, value in tiny_components.scheduler_config.items():
        assert loaded.scheduler_config[key] == value, key


def test_saved_folder_loads_in_diffusers(tiny_components, tiny_folder):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None)
    assert torch.equal(pipe.unet.conv_in.weight, tiny_components.unet.conv_in.weight)
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_components_build_a_diffusers_pipeline(tiny_components):
    """Tests, bench and saving build diffusers' pipeline from Components (families.reference_pipeline): it runs."""
    c = tiny_components
    pipe = reference_pipeline(c, DDIMScheduler.from_config(c.scheduler_config))
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.unet is c.unet and pipe.safety_checker is None
    image = pipe("a cat", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert image.shape == (1, 16, 16, 3)


def test_sd2_folder_keeps_pad_token_and_prediction_type(tmp_path):
    folder = save_pretrained(tiny_sd2_components(), tmp_path / "sd2")
    loaded = load_components(folder)
    assert loaded.tokenizer.pad_token_id == 0
    assert loaded.tokenizer("wow!").input_ids == [49406, 2781, 256, 49407]
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"
    assert load_components(folder, prediction_type="epsilon").scheduler_config["prediction_type"] == "epsilon"


def test_folder_with_config_only_tokenizer_uses_bundled_vocabulary(tiny_folder):
    for vocab_file in (tiny_folder / "tokenizer").iterdir():
        vocab_file.unlink()
    shutil.copytree(SD2_V_CONFIG / "tokenizer", tiny_folder / "tokenizer", dirs_exist_ok=True)
    tokenizer = load_components(tiny_folder).tokenizer
    assert tokenizer.pad_token_id == 0  # SD2's special_tokens_map.json says '!'
    assert tokenizer("a photo").input_ids == [49406, 320, 1125, 49407]


def test_scheduler_defaults_are_explicit(tiny_folder):
    (tiny_folder / "scheduler" / "scheduler_config.json").write_text(
        '{"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear"}'
    )
    config = load_components(tiny_folder).scheduler_config
    assert config["prediction_type"] == "epsilon"
    assert config["timestep_spacing"] == "leading"
    assert config["steps_offset"] == 0
    assert config["_class_name"] == "PNDMScheduler"


# ---- cached Hub repo ids ----


def test_cached_repo_id_resolves_offline(tiny_components, tmp_path, monkeypatch):
    hub = tmp_path / "hf-home" / "hub"
    repo = hub / "models--someone--tiny-sd"
    save_pretrained(tiny_components, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    loaded = load_components("someone/tiny-sd")
    assert_same_weights(tiny_components, loaded)
    assert loaded.name == "tiny-sd"
    assert loaded.source == str((repo / "snapshots" / "0123abcd").resolve())

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelLoadError, match="local Hugging Face cache.*never downloads"):
        load_components("someone/tiny-sd")


# ---- original single files ----


def test_single_file_round_trip_with_config(tiny_components, tiny_folder, tmp_path):
    path = save_single_file(tiny_components, tmp_path / "tiny.safetensors")
    keys = load_file(str(path)).keys()
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    loaded = load_components(path, config=tiny_folder)
    assert_same_weights(tiny_components, loaded)
    assert loaded.name == "tiny" and loaded.source == str(path.resolve())


def test_sd2_layout_single_file_round_trip(tmp_path):
    components = tiny_sd2_components()
    folder = save_pretrained(components, tmp_path / "sd2-configs")
    path = save_single_file(components, tmp_path / "tiny-sd2.safetensors", dtype=torch.float16)
    keys = load_file(str(path)).keys()
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert not any(key.startswith("cond_stage_model.transformer.") for key in keys)
    loaded = load_components(path, config=folder)
    assert_same_weights(components, loaded, dtype=torch.float16)
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"


def test_ckpt_loads_with_weights_only(tiny_components, tiny_folder, tmp_path):
    state_dict = load_file(str(save_single_file(tiny_components, tmp_path / "tiny.safetensors")))
    torch.save({"state_dict": state_dict, "global_step": 1000}, tmp_path / "tiny.ckpt")
    assert_same_weights(tiny_components, load_components(tmp_path / "tiny.ckpt", config=tiny_folder))


def fake_checkpoint(text_key: str, conv_in_channels: int = 4, context_dim: int = 768) -> dict:
    """Just the tensors architecture detection looks at."""
    return {
        text_key: torch.empty(1),
        loading.UNET_CONV_IN_KEY: torch.empty(320, conv_in_channels, 3, 3),
        loading.UNET_CONTEXT_KEY: torch.empty(320, context_dim),
    }


@pytest.mark.parametrize(
    ("text_key", "context_dim", "global_step", "prediction_type", "expected"),
    [
        (loading.SD1_TEXT_KEY, 768, None, None, SD1_CONFIG),
        (loading.SD2_TEXT_KEY, 1024, None, None, SD2_V_CONFIG),
        (loading.SD2_TEXT_KEY, 1024, 875000, None, SD2_EPSILON_CONFIG),
        (loading.SD2_TEXT_KEY, 1024, None, "epsilon", SD2_EPSILON_CONFIG),
        (loading.SD2_TEXT_KEY, 1024, 875000, "v_prediction", SD2_V_CONFIG),
    ],
)
def test_architecture_detection(text_key, context_dim, global_step, prediction_type, expected):
    checkpoint = fake_checkpoint(text_key, context_dim=context_dim)
    assert loading._bundled_config(checkpoint, global_step, prediction_type, Path("x.safetensors")) == expected


@pytest.mark.parametrize(
    "checkpoint",
    [
        fake_checkpoint(loading.SD1_TEXT_KEY, conv_in_channels=9),  # inpainting UNet
        fake_checkpoint(loading.SD1_TEXT_KEY, context_dim=1024),  # SD1 text encoder, SD2 UNet
        fake_checkpoint("conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"),
    ],
)
def test_unknown_architecture_says_to_pass_config(checkpoint):
    with pytest.raises(ModelLoadError, match="config="):
        loading._bundled_config(checkpoint, None, None, Path("x.safetensors"))


def test_bundled_sd2_configs_carry_the_traps():
    v, base = UNet2DConditionModel.load_config(SD2_V_CONFIG / "unet"), SD2_EPSILON_CONFIG / "unet"
    assert v["upcast_attention"] is True and v["sample_size"] == 96
    assert UNet2DConditionModel.load_config(base).get("upcast_attention", False) is False
    text = CLIPTextConfig.from_pretrained(SD2_V_CONFIG / "text_encoder")
    assert (text.hidden_act, text.num_hidden_layers) == ("gelu", 23)
    assert AutoencoderKL.load_config(SD1_CONFIG / "vae").get("scaling_factor") is None  # diffusers' 0.18215


# ---- errors: one line, saying what to do ----


def one_line_error(source, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as error:
        load_components(source, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    assert "does not exist" in one_line_error(tmp_path / "nope.safetensors")
    assert "does not exist" in one_line_error(str(tmp_path / "a" / "b" / "c"))


def test_folder_missing_a_component(tiny_folder):
    shutil.rmtree(tiny_folder / "vae")
    assert "missing the vae component" in one_line_error(tiny_folder)


def test_folder_without_model_index(tiny_folder):
    (tiny_folder / "model_index.json").unlink()
    assert "no model_index.json" in one_line_error(tiny_folder)


def test_folder_with_truncated_weights(tiny_folder):
    weights = tiny_folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert str(tiny_folder) in one_line_error(tiny_folder)


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_folder_with_a_missing_weight(tiny_folder, component):
    weights = next((tiny_folder / component).glob("*.safetensors"))
    state_dict = load_file(str(weights))
    del state_dict[min(state_dict)]
    save_file(state_dict, str(weights), metadata={"format": "pt"})
    assert "1 missing" in one_line_error(tiny_folder)


def test_truncated_single_file(tiny_components, tiny_folder, tmp_path):
    path = save_single_file(tiny_components, tmp_path / "tiny.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    assert "truncated or corrupted" in one_line_error(path, config=tiny_folder)


def test_single_file_of_unknown_architecture(tiny_components, tmp_path):
    path = save_single_file(tiny_components, tmp_path / "tiny.safetensors")
    assert "config=" in one_line_error(path)


def test_weights_that_do_not_fit_the_config(tiny_components, tmp_path):
    other = make_tiny_components()
    other.unet = UNet2DConditionModel.from_config(other.unet.config, block_out_channels=(8, 16))
    configs = save_pretrained(other, tmp_path / "other")
    path = save_single_file(tiny_components, tmp_path / "tiny.safetensors")
    assert "unet weights do not fit" in one_line_error(path, config=configs)


def test_unsafe_ckpt_says_to_convert(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "callback": print}, path)
    assert "safetensors" in one_line_error(path)


def test_no_default_model(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", tmp_path / "default-model")
    assert "no default model is shipped" in one_line_error(None)


def test_bad_prediction_type(tiny_folder):
    assert "prediction_type" in one_line_error(tiny_folder, prediction_type="sample")


# ---- real SD architectures, random weights ----


def random_components(config_dir: Path) -> Components:
    """A randomly initialised model of a real SD architecture, built from the bundled configs."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    tokenizer = loading._folder_tokenizer(config_dir / "tokenizer")
    scheduler_config = loading._scheduler_config(config_dir / "scheduler", None)
    return Components(tokenizer, text_encoder.eval(), unet.eval(), vae.eval(), scheduler_config, "random", "random")


@pytest.mark.slow
def test_sd15_single_file_loads_without_config(tmp_path):
    original = random_components(SD1_CONFIG)
    path = save_single_file(original, tmp_path / "v1-5-random.safetensors", dtype=torch.float16)
    loaded = load_components(path)
    assert_same_weights(original, loaded, dtype=torch.float16)
    assert loaded.tokenizer.pad_token_id == 49407
    assert loaded.scheduler_config["prediction_type"] == "epsilon"
    assert loaded.text_encoder.config.hidden_act == "quick_gelu"


@pytest.mark.slow
def test_sd21_single_file_loads_without_config(tmp_path):
    original = random_components(SD2_V_CONFIG)
    path = save_single_file(original, tmp_path / "v2-1_768-random.safetensors", dtype=torch.float16)
    loaded = load_components(path)
    assert_same_weights(original, loaded, dtype=torch.float16)
    assert loaded.unet.config.upcast_attention is True
    assert (loaded.text_encoder.config.hidden_act, loaded.text_encoder.config.num_hidden_layers) == ("gelu", 23)
    assert loaded.tokenizer.pad_token_id == 0
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"


def test_a_model_folder_carries_its_own_controlnets(tmp_path):
    from ldmkit.loading import DEFAULT_MODEL_DIR, model_controlnet_dir

    assert model_controlnet_dir(None) == DEFAULT_MODEL_DIR / "controlnets"  # the shipped model's emoji-lines
    assert model_controlnet_dir(tmp_path) is None
    (tmp_path / "controlnets").mkdir()
    assert model_controlnet_dir(tmp_path) == tmp_path / "controlnets"
    assert model_controlnet_dir(tmp_path / "model.safetensors") is None  # a single file has no folder of its own
