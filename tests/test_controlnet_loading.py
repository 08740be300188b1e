"""Loading ControlNets offline: diffusers folders, original single files in every layout, a folder of them."""

import hashlib
import json
import pickle

import pytest
import torch
from diffusers import ControlNetModel
from safetensors.torch import save_file
from support.controlnet import make_tiny_controlnet, make_tiny_sdxl_controlnet, original_state_dict, write_config
from support.sdxl import make_tiny_sdxl_components

from ldmkit.controlnet import SD1_CONFIG, SD2_CONFIG, SDXL_CONFIG, ControlNetLibrary, load_controlnet, model_hash
from ldmkit.errors import InvalidRequest, ModelLoadError

# diffusers' converter places the hint block's last conv at index 14, as every real ControlNet has it
# (four conditioning stages); the generation tests' tiny ControlNet has two and is not written as an original file.
FOUR_STAGES = {"conditioning_embedding_out_channels": (4, 4, 4, 4)}


def assert_same_weights(loaded: ControlNetModel, reference: ControlNetModel):
    expected = reference.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


@pytest.fixture
def tiny():
    return make_tiny_controlnet(**FOUR_STAGES)


def test_diffusers_folder(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "cn")
    assert_same_weights(load_controlnet(tmp_path / "cn"), tiny)


def test_incomplete_folder_is_refused(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "cn")
    weights = tmp_path / "cn" / "diffusion_pytorch_model.safetensors"
    state = {k: v for k, v in tiny.state_dict().items() if not k.startswith("controlnet_mid_block")}
    save_file(state, weights)
    with pytest.raises(ModelLoadError, match="missing"):
        load_controlnet(tmp_path / "cn")


@pytest.mark.parametrize("prefix", ["control_model.", ""])  # lllyasviel's files / thibaud's bare SD2.1 files
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_original_single_file(tmp_path, tiny, prefix, suffix):
    weights = original_state_dict(tiny, prefix)
    path = tmp_path / f"control_tiny{suffix}"
    if suffix == ".safetensors":
        save_file(weights, path)
    else:
        torch.save({"state_dict": weights}, path)
    assert_same_weights(load_controlnet(path, config=write_config(tiny, tmp_path / "cfg")), tiny)


def test_controlnet_10_file_keeps_only_the_control_model(tmp_path, tiny):
    weights = original_state_dict(tiny) | {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    save_file(weights, tmp_path / "control_sd15_tiny.safetensors")
    loaded = load_controlnet(tmp_path / "control_sd15_tiny.safetensors", config=write_config(tiny, tmp_path / "cfg"))
    assert_same_weights(loaded, tiny)


def test_single_file_in_diffusers_layout(tmp_path, tiny):
    save_file(tiny.state_dict(), tmp_path / "cn.safetensors")
    assert_same_weights(load_controlnet(tmp_path / "cn.safetensors", config=write_config(tiny, tmp_path / "c")), tiny)


def test_shuffle_is_named_by_its_file(tmp_path, tiny):
    save_file(original_state_dict(tiny), tmp_path / "control_v11e_tiny_shuffle.safetensors")
    loaded = load_controlnet(tmp_path / "control_v11e_tiny_shuffle.safetensors", config=write_config(tiny, tmp_path))
    assert loaded.config.global_pool_conditions is True


def test_tiny_shapes_need_a_config(tmp_path, tiny):
    save_file(original_state_dict(tiny), tmp_path / "cn.safetensors")
    with pytest.raises(ModelLoadError, match="cross-attention width 8.*config="):
        load_controlnet(tmp_path / "cn.safetensors")


def test_wrong_config_is_refused_not_half_loaded(tmp_path, tiny):
    save_file(original_state_dict(tiny), tmp_path / "cn.safetensors")
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_controlnet(tmp_path / "cn.safetensors", config=SD1_CONFIG)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (
            {
                "control_model.label_emb.0.0.weight": torch.zeros(4, 5),
                "control_model.input_hint_block.0.weight": torch.zeros(1),
            },
            "not an SDXL-shaped ControlNet",
        ),
        ({"lora_controlnet": torch.zeros(1), "input_hint_block.0.weight": torch.zeros(1)}, "Control-LoRA"),
        ({"control_model.difference": torch.zeros(1)}, "difference"),
        ({"adapter.body.0.block1.weight": torch.zeros(1)}, "T2I-Adapter"),
        ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "not a ControlNet"),
    ],
)  # fmt: skip
def test_other_kinds_of_model_are_refused(tmp_path, weights, message):
    save_file(weights, tmp_path / "m.safetensors")
    with pytest.raises(ModelLoadError, match=message):
        load_controlnet(tmp_path / "m.safetensors")


class _Payload:
    def __reduce__(self):
        return (print, ("pickle ran code",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickles_are_read_without_running_code(tmp_path, capsys):
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"state_dict": _Payload()}))
    with pytest.raises(ModelLoadError, match="cannot be loaded safely"):
        load_controlnet(tmp_path / "evil.pth")
    assert "pickle ran code" not in capsys.readouterr().out


def test_missing_and_unreadable_sources(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_controlnet(tmp_path / "nope.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        load_controlnet(tmp_path / "broken.safetensors")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ModelLoadError, match="not a diffusers ControlNet folder"):
        load_controlnet(tmp_path / "folder")


def test_bundled_configs_are_the_sd_families():
    sd1 = ControlNetModel.load_config(SD1_CONFIG)
    sd2 = ControlNetModel.load_config(SD2_CONFIG)
    assert (sd1["cross_attention_dim"], sd1["attention_head_dim"], sd1["use_linear_projection"]) == (768, 8, False)
    assert (sd2["cross_attention_dim"], sd2["attention_head_dim"], sd2["use_linear_projection"]) == (
        1024,
        [5, 10, 20, 20],
        True,
    )


# ---- SDXL ----


@pytest.fixture(scope="module")
def tiny_sdxl():
    """A tiny SDXL ControlNet with four conditioning stages (the hint block's layout in every released file)."""
    return make_tiny_sdxl_controlnet(make_tiny_sdxl_components().unet, conditioning_channels=(4, 4, 4, 4))


def test_sdxl_diffusers_folder(tmp_path, tiny_sdxl):
    tiny_sdxl.save_pretrained(tmp_path / "cn")
    loaded = load_controlnet(tmp_path / "cn")
    assert loaded.config.addition_embed_type == "text_time"
    assert_same_weights(loaded, tiny_sdxl)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_sdxl_single_file(tmp_path, tiny_sdxl, layout):
    """The public SDXL ControlNet files hold diffusers' keys (sd_control_collection's diffusers_xl_*); sgm's layout
    (label_emb for the added embedding) is read too."""
    weights = tiny_sdxl.state_dict() if layout == "diffusers" else original_state_dict(tiny_sdxl)
    save_file(weights, tmp_path / "diffusers_xl_tiny.safetensors")
    loaded = load_controlnet(tmp_path / "diffusers_xl_tiny.safetensors", config=write_config(tiny_sdxl, tmp_path / "c"))
    assert_same_weights(loaded, tiny_sdxl)


def test_sdxl_transformer_depths_are_read_from_the_weights(tmp_path, tiny_sdxl):
    """diffusers' full, mid and small SDXL ControlNets differ in transformer layers per block: the weights decide."""
    config = {k: v for k, v in tiny_sdxl.config.items() if not k.startswith("_")}
    smaller = ControlNetModel.from_config({**config, "transformer_layers_per_block": [1, 0]}).eval()
    assert not any("transformer_blocks" in key for key in smaller.state_dict())
    save_file(smaller.state_dict(), tmp_path / "small.safetensors")
    loaded = load_controlnet(tmp_path / "small.safetensors", config=write_config(tiny_sdxl, tmp_path / "c"))
    assert_same_weights(loaded, smaller)


def test_bundled_sdxl_config_is_the_sdxl_unets():
    """Every field the SDXL ControlNet shares with the bundled SDXL base UNet config has its value (diffusers' SDXL
    ControlNets are made from that UNet with ControlNetModel.from_unet)."""
    controlnet = ControlNetModel.load_config(SDXL_CONFIG)
    unet = json.loads((SDXL_CONFIG.parent / "stable-diffusion-xl-base-1.0" / "unet" / "config.json").read_text())
    shared = set(controlnet) & set(unet) - {"_class_name"}
    assert len(shared) > 25
    assert {key: controlnet[key] for key in shared} == {key: unet[key] for key in shared}


# ---- --controlnet-dir ----


@pytest.fixture
def library(tmp_path, tiny):
    folder = tmp_path / "controlnets"
    tiny.save_pretrained(folder / "diffusers_canny")
    (folder / "sub").mkdir()
    save_file(tiny.state_dict(), folder / "sub" / "scribble.safetensors")
    torch.save(tiny.state_dict(), folder / "Depth.pth")
    (folder / "notes.txt").write_text("not a model")
    (folder / "Depth.yaml").write_text("a sidecar config A1111 users keep next to the file")
    return ControlNetLibrary(folder)


def test_library_names_files_and_folders_by_stem(library):
    assert library.names() == ["Depth", "diffusers_canny", "scribble"]


def test_library_titles_carry_a1111s_short_hash(library):
    path = library.folder / "sub" / "scribble.safetensors"
    data = path.read_bytes()[0x100000:0x110000]
    assert f"scribble [{hashlib.sha256(data).hexdigest()[:8]}]" in library.titles()
    assert model_hash(path) == hashlib.sha256(data).hexdigest()[:8]


def test_library_resolves_titles_and_any_case(library):
    assert library.resolve_name("scribble [0123abcd]").name == "scribble.safetensors"
    assert library.resolve_name("depth").name == "Depth.pth"
    assert library.resolve_name("diffusers_canny").is_dir()
    with pytest.raises(InvalidRequest, match="not found"):
        library.resolve_name("canny")


def test_paths_resolve_for_the_python_api_but_not_by_name(library):
    path = library.folder / "sub" / "scribble.safetensors"
    assert library.resolve(str(path)) == path
    with pytest.raises(InvalidRequest, match="not found"):
        library.resolve_name(str(path))
    with pytest.raises(InvalidRequest, match="not found.*--controlnet-dir"):
        ControlNetLibrary().resolve_name("scribble")


def test_library_refuses_an_ambiguous_name(library):
    torch.save({}, library.folder / "sub" / "depth.pt")
    with pytest.raises(InvalidRequest, match="ambiguous"):
        library.resolve_name("Depth")


def test_library_loads_once(library, tiny):
    cpu = torch.device("cpu")
    first = library.load(library.resolve_name("diffusers_canny"), cpu, torch.float32)
    assert library.load(library.resolve_name("DIFFUSERS_CANNY"), cpu, torch.float32) is first
    assert_same_weights(first, tiny)


def test_missing_library_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        ControlNetLibrary(tmp_path / "none")


# ---- real SD shapes, random weights (slow) ----


def random_like_config(config_dir, seed=0) -> ControlNetModel:
    """An SD-sized ControlNet with random fp16-representable weights, built without the slow random init."""
    config = ControlNetModel.load_config(config_dir)
    with torch.device("meta"):
        model = ControlNetModel.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=generator).half().float() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize(("config_dir", "name"), [(SD1_CONFIG, "control_v11p_sd15_canny"), (SD2_CONFIG, "sd21_canny")])
def test_sd_sized_original_single_file_loads_with_no_config(tmp_path, config_dir, name):
    reference = random_like_config(config_dir)
    weights = {k: v.half() for k, v in original_state_dict(reference).items()}  # as shipped: fp16 safetensors
    assert "control_model.input_hint_block.14.weight" in weights and "control_model.zero_convs.11.0.weight" in weights
    save_file(weights, tmp_path / f"{name}.safetensors")
    del weights
    loaded = load_controlnet(tmp_path / f"{name}.safetensors")
    assert loaded.config.cross_attention_dim == reference.config.cross_attention_dim
    assert_same_weights(loaded, reference)


@pytest.mark.slow
def test_sdxl_sized_single_file_loads_with_no_config(tmp_path):
    """An SDXL-width ControlNet in the public files' layout (diffusers keys, fp16), with no transformer layers (the
    smallest of diffusers' variants keeps only the attention blocks' norms and projections): detected from its keys,
    the bundled SDXL config completed from its weights."""
    config = dict(ControlNetModel.load_config(SDXL_CONFIG)) | {"transformer_layers_per_block": [0, 0, 0]}
    with torch.device("meta"):
        reference = ControlNetModel.from_config(config)
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator).half().float() for k, v in reference.state_dict().items()}
    reference.load_state_dict(state, assign=True)
    save_file({k: v.half() for k, v in state.items()}, tmp_path / "diffusers_xl_canny_small.safetensors")
    del state
    loaded = load_controlnet(tmp_path / "diffusers_xl_canny_small.safetensors")
    assert loaded.config.transformer_layers_per_block == [0, 0, 0]
    assert loaded.config.cross_attention_dim == 2048
    assert_same_weights(loaded, reference.eval())
