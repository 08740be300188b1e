"""Model loading: diffusers folders, cached Hub repo ids and original single files, never the network.

Single files are converted with diffusers' own single-file conversion functions; the component
configs they need ship in `configs/` (see configs/SOURCES.md), so SD 1.x, 2.x and SDXL load offline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldmkit import model_defaults
from ldmkit.errors import ModelLoadError

CONFIGS_DIR = Path(__file__).parent / "configs"
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default-model"

# Bundled diffusers configs (copied verbatim from the Hub repos) for each architecture a single file can have.
SD1_CONFIG = CONFIGS_DIR / "stable-diffusion-v1-5"
SD2_V_CONFIG = CONFIGS_DIR / "stable-diffusion-2-1"  # 768 px, v-prediction, upcast attention
SD2_EPSILON_CONFIG = CONFIGS_DIR / "stable-diffusion-2-1-base"  # 512 px, epsilon

# Keys that tell an original checkpoint's text encoder apart (the ones diffusers checks too).
SD1_TEXT_KEY = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
SD2_TEXT_KEY = "cond_stage_model.model.token_embedding.weight"
UNET_CONV_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"
UNET_CONTEXT_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
# diffusers' legacy rule: SD 2.x-base (epsilon) finished training at this step; other SD2 files are v-prediction.
SD2_BASE_GLOBAL_STEP = 875000

COMPONENT_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "",
    "scheduler": "scheduler_config.json",
}
# Values diffusers assumes when a scheduler config leaves them out, written out so readers need not know.
SCHEDULER_DEFAULTS = {"prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 0}
PREDICTION_TYPES = ("epsilon", "v_prediction")
CLIP_END_TOKEN = "<|endoftext|>"
PASS_A_MODEL = "pass a model: a diffusers folder, a cached Hub repo id or a .safetensors file"


@dataclass
class Components:
    """Everything a latent diffusion pipeline needs, loaded on the CPU."""

    tokenizer: CLIPTokenizer | None  # None only for the SDXL refiner, which has the bigG encoder alone
    text_encoder: CLIPTextModel | None
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict  # diffusers scheduler config: betas, num_train_timesteps, prediction_type, ...
    source: str  # resolved location: a folder or a file
    name: str  # short model name for metadata ("v1-5-pruned", "default-model")
    # SDXL's second text encoder (OpenCLIP bigG, with its projection for the pooled embedding) and its tokenizer.
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    # SDXL model_index.json flags: force_zeros_for_empty_prompt, requires_aesthetics_score (the refiner's).
    pipeline_config: dict = field(default_factory=dict)
    # The guidance the folder's ldmkit.json names (ldmkit.model_defaults); None: it names none (7.5 then applies).
    default_guidance: float | None = None


def load_tokenizer(pad_token: str = CLIP_END_TOKEN, model_max_length: int = 77) -> CLIPTokenizer:
    """The CLIP BPE tokenizer shipped with the package (SD1.x pads with <|endoftext|>, SD2.x with '!')."""
    folder = CONFIGS_DIR / "clip-tokenizer"
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)
    return _with_pad_token(tokenizer, pad_token)


def _with_pad_token(tokenizer: CLIPTokenizer, pad_token: str) -> CLIPTokenizer:
    """Pad with `pad_token` without making it a special token.

    transformers splits special tokens out of the text, so with pad_token="!" every '!' typed in an
    SD2 prompt would become a pad (diffusers#4153). Set by id, '!' stays id 256 inside a prompt, as
    in open_clip's tokenizer, which SD2 was trained with, and only the padding uses id 0.
    """
    tokenizer.pad_token_id = tokenizer.convert_tokens_to_ids(pad_token)
    return tokenizer


def load_components(
    source: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    prediction_type: str | None = None,
) -> Components:
    """Load a model in fp32 on the CPU from a diffusers folder, a cached Hub repo id or an original single file.

    `config` is a diffusers folder of configs for single files of other architectures than SD 1.x/2.x.
    `prediction_type` ("epsilon" or "v_prediction") overrides the model's; for SD 2.x single files it
    also picks the 2.1-base (epsilon) or the 2.1 (v) configs.
    """
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise ModelLoadError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, not '{prediction_type}'")
    if source is None:
        return _load_folder(_default_model_dir(), prediction_type)
    path = Path(source).expanduser()
    if path.is_file():
        return _load_single_file(path, config, prediction_type)
    if config is not None:
        raise ModelLoadError(f"config= only applies to single-file checkpoints; '{source}' is not a file")
    if path.is_dir():
        return _load_folder(path, prediction_type)
    return _load_folder(_cached_repo(str(source)), prediction_type, name=str(source).split("/")[-1])


def save_pretrained(components: Components, folder: str | os.PathLike) -> Path:
    """Write a diffusers-layout folder that both `load_components` and diffusers' pipelines load (with the
    components' default guidance, if they name one, in its ldmkit.json)."""
    from ldmkit.families import reference_pipeline

    reference_pipeline(components).save_pretrained(folder)
    if components.default_guidance is not None:
        model_defaults.write_default_guidance(Path(folder), components.default_guidance)
    return Path(folder)


MODEL_CONTROLNETS = "controlnets"  # a model folder's own ControlNets (`ldm train controlnet` exports there too)


def model_controlnet_dir(source: str | os.PathLike | None) -> Path | None:
    """The ControlNets a model folder carries (its `controlnets` subfolder; the shipped model's when `source` is
    None), used when no ControlNet folder is given; None when it has none."""
    folder = DEFAULT_MODEL_DIR if source is None else Path(source).expanduser()
    return folder / MODEL_CONTROLNETS if (folder / MODEL_CONTROLNETS).is_dir() else None


def walk_models(folder: Path, class_name: str, suffixes) -> Iterator[Path]:
    """The diffusers folders of `class_name` (by their config.json) and the files ending in `suffixes` under
    `folder`, directory by directory in name order: its model folders, then its files. A folder with a
    config.json is a model, never searched inside; hidden files are skipped."""
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        for name in sorted(dirs):
            if _read_json(root_path / name / "config.json").get("_class_name") == class_name:
                yield root_path / name
        dirs[:] = sorted(d for d in dirs if not (root_path / d / "config.json").is_file())
        for name in sorted(files):
            if Path(name).suffix in suffixes and not name.startswith("."):
                yield root_path / name


def _default_model_dir() -> Path:
    if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        raise ModelLoadError(f"no default model is shipped with this install ({DEFAULT_MODEL_DIR}); {PASS_A_MODEL}")
    return DEFAULT_MODEL_DIR


def _cached_repo(repo_id: str) -> Path:
    """The snapshot of a Hub repo already in the local Hugging Face cache; never downloads."""
    if repo_id.count("/") != 1 or repo_id.endswith((".safetensors", ".ckpt")):
        raise ModelLoadError(f"'{repo_id}' does not exist; {PASS_A_MODEL}")
    cache_dir = _hub_cache_dir()
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        raise ModelLoadError(
            f"'{repo_id}' is neither a path nor a Hub repo in the local Hugging Face cache ({cache_dir}); "
            "ldmkit never downloads: fetch it with `hf download` where there is network, or pass a local path"
        ) from None


def _hub_cache_dir() -> str:
    """Read HF_HUB_CACHE / HF_HOME now rather than at import, so they can be set after ldmkit is imported."""
    if "HF_HUB_CACHE" in os.environ:
        return os.environ["HF_HUB_CACHE"]
    if "HF_HOME" in os.environ:
        return os.path.join(os.environ["HF_HOME"], "hub")
    return huggingface_hub.constants.HF_HUB_CACHE


# ---- diffusers folders ----


def _load_folder(folder: Path, prediction_type: str | None, name: str | None = None) -> Components:
    default_guidance = model_defaults.read_default_guidance(folder)  # first: a bad file is refused before the weights
    load = _load_sdxl_folder if _is_sdxl_folder(folder) else _load_sd_folder
    components = load(folder, prediction_type, name)
    components.default_guidance = default_guidance
    return components


def _load_sd_folder(folder: Path, prediction_type: str | None, name: str | None) -> Components:
    _check_folder(folder, model_index=True)
    with _load_errors(folder):
        unet, vae = _load_unet_and_vae(folder)
        text_encoder, info = CLIPTextModel.from_pretrained(
            folder / "text_encoder", dtype=torch.float32, output_loading_info=True
        )
        _check_loading_info(info, "text_encoder", folder)
    return Components(
        tokenizer=_folder_tokenizer(folder / "tokenizer"),
        text_encoder=text_encoder.eval(),
        unet=unet.eval(),
        vae=vae.eval(),
        scheduler_config=_scheduler_config(folder / "scheduler", prediction_type),
        source=str(folder.resolve()),
        name=name or folder.resolve().name,
    )


def _check_folder(folder: Path, model_index: bool) -> None:
    if model_index and not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{folder} is not a diffusers model folder: it has no model_index.json")
    for component, file in COMPONENT_FILES.items():
        if not (folder / component / file).exists():
            raise ModelLoadError(f"{folder} is missing the {component} component ({component}/{file})")


@contextmanager
def _load_errors(folder: Path):
    """Turn the library errors of a damaged folder into one ModelLoadError line."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelLoadError(
            f"cannot load the model in {folder}: {first_line} (is a file truncated or corrupted?)"
        ) from error


def _check_loading_info(info: dict, component: str, folder: Path) -> None:
    """from_pretrained fills missing weights with random values and only warns; refuse instead."""
    missing = info.get("missing_keys") or []
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        example = min(missing) if missing else min(map(str, mismatched))
        raise ModelLoadError(
            f"{folder / component} has {len(missing)} missing and {len(mismatched)} mis-shaped weights "
            f"(e.g. {example}); the folder is incomplete or its config does not match its weights"
        )


def _folder_tokenizer(folder: Path) -> CLIPTokenizer:
    """The folder's tokenizer, or the bundled CLIP vocabulary when it holds only configs (as shipped configs do)."""
    pad_token = _pad_token(folder)
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(folder, pad_token=CLIP_END_TOKEN)
        return _with_pad_token(tokenizer, pad_token)
    return load_tokenizer(pad_token=pad_token)


def _pad_token(folder: Path) -> str:
    """special_tokens_map.json wins over tokenizer_config.json, as in transformers: SD2's says '!'."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        pad = _read_json(folder / name).get("pad_token")
        if pad:
            return pad["content"] if isinstance(pad, dict) else pad
    return CLIP_END_TOKEN


def _scheduler_config(folder: Path, prediction_type: str | None) -> dict:
    config = _read_json(folder / "scheduler_config.json")
    config.pop("_diffusers_version", None)
    for key, value in SCHEDULER_DEFAULTS.items():
        config.setdefault(key, value)
    if prediction_type:
        config["prediction_type"] = prediction_type
    return config


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path} is not valid JSON ({error})") from None


# ---- original single files ----


def _load_single_file(path: Path, config: str | os.PathLike | None, prediction_type: str | None) -> Components:
    checkpoint, global_step = _read_checkpoint(path)
    if _sdxl_kind(checkpoint) is not None:
        return _load_sdxl_single_file(path, checkpoint, config, prediction_type)
    if config is None:
        config_dir = _bundled_config(checkpoint, global_step, prediction_type, path)
    else:
        config_dir = Path(config).expanduser()
        if not config_dir.is_dir():
            raise ModelLoadError(f"config= {config_dir} is not a folder of diffusers configs")
        _check_folder(config_dir, model_index=False)
    return Components(
        tokenizer=_folder_tokenizer(config_dir / "tokenizer"),
        text_encoder=_text_encoder(checkpoint, config_dir / "text_encoder", path),
        unet=_unet(checkpoint, config_dir / "unet", path),
        vae=_vae(checkpoint, config_dir / "vae", path),
        scheduler_config=_scheduler_config(config_dir / "scheduler", prediction_type),
        source=str(path.resolve()),
        name=path.stem,
    )


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """The flat state dict and, for .ckpt files, the training step they record."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path)), None
        except (SafetensorError, OSError) as error:
            raise ModelLoadError(
                f"{path} is not a readable safetensors file ({error}); it may be truncated or corrupted"
            ) from None
    if path.suffix == ".ckpt":
        checkpoint = load_pickled(path, " (e.g. diffusers' convert_original_stable_diffusion_to_diffusers.py)")
        global_step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
        return _ckpt_state_dict(checkpoint, path), global_step if isinstance(global_step, int) else None
    raise ModelLoadError(f"{path} is not a model: expected a folder, a .safetensors or a .ckpt file")


def load_pickled(path: Path, converter_hint: str = ""):
    """A pickled checkpoint through torch.load(weights_only=True): anything but tensors and plain containers in it
    is refused, with one line that says how to get a file that loads."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling fails in many ways, all with the same remedy
        raise ModelLoadError(
            f"{path} cannot be loaded safely ({type(error).__name__}); convert it to .safetensors once with a tool "
            f"you trust{converter_hint}"
        ) from None


def _ckpt_state_dict(checkpoint, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .ckpt: the dict itself or its (possibly nested) 'state_dict'; anything else is refused."""
    seen = []  # a pickle can make a dict that holds itself
    while isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        if any(checkpoint is earlier for earlier in seen):
            raise ModelLoadError(f"{path.name} is not a checkpoint: its state_dict holds itself")
        seen.append(checkpoint)
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        kind = type(checkpoint).__name__
        raise ModelLoadError(f"{path.name} is not a checkpoint: it holds a value of type {kind}, not a state dict")
    # Training checkpoints keep counters and such beside the weights; only tensors are weights.
    tensors = {key: value for key, value in checkpoint.items() if isinstance(key, str) and torch.is_tensor(value)}
    if not tensors:
        raise ModelLoadError(f"{path.name} is not a checkpoint: it holds no tensors")
    return tensors


def _bundled_config(checkpoint: dict, global_step: int | None, prediction_type: str | None, path: Path) -> Path:
    """Detect SD 1.x or 2.x from the text encoder's keys and the UNet's shapes, and pick the bundled configs.

    Like diffusers (infer_diffusers_model_type -> "v2" -> stabilityai/stable-diffusion-2-1), an SD 2.x
    file is taken as 2.1 (768 px, v-prediction) unless it is known to be a 512 px epsilon base model:
    `prediction_type="epsilon"`, or a .ckpt stopped at SD2-base's final step (diffusers' legacy rule).
    """
    if SD1_TEXT_KEY in checkpoint:
        architecture, context_dim = SD1_CONFIG, 768
    elif SD2_TEXT_KEY in checkpoint:
        epsilon = prediction_type == "epsilon" or (prediction_type is None and global_step == SD2_BASE_GLOBAL_STEP)
        architecture, context_dim = (SD2_EPSILON_CONFIG if epsilon else SD2_V_CONFIG), 1024
    else:
        architecture = None
    conv_in, context = checkpoint.get(UNET_CONV_IN_KEY), checkpoint.get(UNET_CONTEXT_KEY)
    if (
        architecture is None
        or conv_in is None
        or context is None
        or tuple(conv_in.shape) != (320, 4, 3, 3)
        or tuple(context.shape) != (320, context_dim)
    ):
        raise ModelLoadError(
            f"{path.name} is not an SD 1.x/2.x or SDXL checkpoint; for other architectures "
            "pass config= a diffusers folder with its unet/vae/text_encoder/tokenizer/scheduler configs"
        )
    return architecture


def _unet(checkpoint: dict, config_dir: Path, path: Path) -> UNet2DConditionModel:
    config = UNet2DConditionModel.load_config(config_dir)
    return _build(UNet2DConditionModel, config, convert_ldm_unet_checkpoint(checkpoint, config), "unet", path)


def _vae(checkpoint: dict, config_dir: Path, path: Path) -> AutoencoderKL:
    config = AutoencoderKL.load_config(config_dir)
    return _build(AutoencoderKL, config, convert_ldm_vae_checkpoint(checkpoint, config), "vae", path)


def _build(model_cls, config: dict, state_dict: dict, component: str, path: Path):
    """Create the model without random init (on the meta device) and adopt the converted weights as fp32."""
    with torch.device("meta"):
        model = model_cls.from_config(config)
    _check_fit(model, state_dict, component, path)
    model.load_state_dict({key: tensor.float() for key, tensor in state_dict.items()}, assign=True)
    return model.eval()


def _text_encoder(checkpoint: dict, config_dir: Path, path: Path) -> CLIPTextModel:
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir))
    if SD1_TEXT_KEY in checkpoint:
        state_dict = convert_ldm_clip_checkpoint(checkpoint)
    elif SD2_TEXT_KEY in checkpoint:
        state_dict = convert_open_clip_checkpoint(text_encoder, checkpoint)
    else:
        raise ModelLoadError(f"{path.name} has no CLIP text encoder weights (cond_stage_model.*)")
    # transformers >= 5.6 flattened CLIPTextModel: its keys have no "text_model." prefix.
    state_dict = {key.removeprefix("text_model."): tensor for key, tensor in state_dict.items()}
    # Older files keep the position_ids buffer; SD uses CLIPTextModel, which has no text_projection.
    for unused in ("embeddings.position_ids", "text_projection.weight"):
        state_dict.pop(unused, None)
    _check_fit(text_encoder, state_dict, "text_encoder", path)
    text_encoder.load_state_dict(state_dict)
    return text_encoder.eval()


def _check_fit(model: torch.nn.Module, state_dict: dict, component: str, path: Path) -> None:
    """Loading is strict: weights that do not fit the config are an error, not a half-random model."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    mis_shaped = sorted(k for k in expected.keys() & state_dict.keys() if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or mis_shaped:
        example = (missing + unexpected + mis_shaped)[0]
        raise ModelLoadError(
            f"{path.name}: the {component} weights do not fit its config ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mis_shaped)} mis-shaped, e.g. {example}); "
            "pass config= a diffusers folder whose configs match the checkpoint"
        )


# ---- SDXL: diffusers folders and original single files ----

SDXL_BASE_CONFIG = CONFIGS_DIR / "stable-diffusion-xl-base-1.0"
SDXL_REFINER_CONFIG = CONFIGS_DIR / "stable-diffusion-xl-refiner-1.0"
# Only the inpainting UNet differs from the base; its other components are the base's (see configs/SOURCES.md).
SDXL_INPAINTING_UNET_CONFIG = CONFIGS_DIR / "stable-diffusion-xl-1.0-inpainting-0.1" / "unet"

# Keys that tell SDXL's original checkpoints apart (sgm's conditioner layout, as diffusers checks them).
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # base, inpainting: CLIP ViT-L is embedder 0
SDXL_CLIP_L_KEY = SDXL_CLIP_L_PREFIX + "text_model.embeddings.position_embedding.weight"
SDXL_BIGG_PREFIX = "conditioner.embedders.1.model."  # base, inpainting: OpenCLIP bigG is embedder 1
SDXL_REFINER_BIGG_PREFIX = "conditioner.embedders.0.model."  # the refiner has bigG alone, as embedder 0
UNET_ADD_EMBEDDING_KEY = "model.diffusion_model.label_emb.0.0.weight"  # pooled text + size/crop embeddings
# conv_in and label_emb shapes of each kind: (320, 4|9) channels; 1280 + 6 x 256 or 1280 + 5 x 256 inputs.
SDXL_SHAPES = {
    "base": ((320, 4, 3, 3), (1280, 2816)),
    "inpainting": ((320, 9, 3, 3), (1280, 2816)),
    "refiner": ((384, 4, 3, 3), (1536, 2560)),
}
# diffusers' EMAModel saved the inpainting UNet's config with its training state; these are no UNet arguments.
EMA_CONFIG_KEYS = (
    "decay",
    "inv_gamma",
    "min_decay",
    "optimization_step",
    "power",
    "update_after_step",
    "use_ema_warmup",
)
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")


def _is_sdxl_folder(folder: Path) -> bool:
    return "text_encoder_2" in _read_json(folder / "model_index.json")


def _load_unet_and_vae(folder: Path) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """A diffusers folder's UNet and VAE in fp32, every weight present (any family)."""
    unet, info = UNet2DConditionModel.from_pretrained(
        folder, subfolder="unet", torch_dtype=torch.float32, output_loading_info=True
    )
    _check_loading_info(info, "unet", folder)
    vae, info = AutoencoderKL.from_pretrained(
        folder, subfolder="vae", torch_dtype=torch.float32, output_loading_info=True
    )
    _check_loading_info(info, "vae", folder)
    return unet, vae


def _load_sdxl_folder(folder: Path, prediction_type: str | None, name: str | None) -> Components:
    """An SDXL diffusers folder (base, refiner or inpainting); the refiner has no text_encoder/tokenizer."""
    index = _read_json(folder / "model_index.json")
    has_clip_l = _names_a_class(index.get("text_encoder"))
    _check_sdxl_folder(folder, has_clip_l)
    with _load_errors(folder):
        unet, vae = _load_unet_and_vae(folder)
        text_encoder = None
        if has_clip_l:
            text_encoder, info = CLIPTextModel.from_pretrained(
                folder / "text_encoder", dtype=torch.float32, output_loading_info=True
            )
            _check_loading_info(info, "text_encoder", folder)
        text_encoder_2, info = CLIPTextModelWithProjection.from_pretrained(
            folder / "text_encoder_2", dtype=torch.float32, output_loading_info=True
        )
        _check_loading_info(info, "text_encoder_2", folder)
    return Components(
        tokenizer=_folder_tokenizer(folder / "tokenizer") if has_clip_l else None,
        text_encoder=text_encoder.eval() if has_clip_l else None,
        unet=unet.eval(),
        vae=vae.eval(),
        scheduler_config=_scheduler_config(folder / "scheduler", prediction_type),
        source=str(folder.resolve()),
        name=name or folder.resolve().name,
        tokenizer_2=_folder_tokenizer(folder / "tokenizer_2"),
        text_encoder_2=text_encoder_2.eval(),
        pipeline_config=_sdxl_pipeline_config(index),
    )


def _names_a_class(entry) -> bool:
    """model_index.json names a component as [library, class]; the refiner's text_encoder is [null, null]."""
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def _check_sdxl_folder(folder: Path, has_clip_l: bool) -> None:
    components = {"unet": "config.json", "vae": "config.json", "text_encoder_2": "config.json", "tokenizer_2": ""}
    components["scheduler"] = "scheduler_config.json"
    if has_clip_l:
        components |= {"text_encoder": "config.json", "tokenizer": ""}
    for component, file in components.items():
        if not (folder / component / file).exists():
            raise ModelLoadError(f"{folder} is missing the {component} component ({component}/{file})")


def _sdxl_pipeline_config(index: dict) -> dict:
    """The model_index.json flags diffusers' SDXL pipelines read, with their defaults."""
    return {
        "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)),
        "requires_aesthetics_score": bool(index.get("requires_aesthetics_score", False)),
    }


def _sdxl_kind(checkpoint: dict) -> str | None:
    """'base', 'inpainting' or 'refiner' from an original checkpoint's text encoder keys and UNet input; else None."""
    if SDXL_CLIP_L_KEY in checkpoint and SDXL_BIGG_PREFIX + "positional_embedding" in checkpoint:
        conv_in = checkpoint.get(UNET_CONV_IN_KEY)
        return "inpainting" if conv_in is not None and conv_in.shape[1] == 9 else "base"
    if SDXL_REFINER_BIGG_PREFIX + "positional_embedding" in checkpoint:
        return "refiner"
    return None


def _load_sdxl_single_file(
    path: Path, checkpoint: dict, config: str | os.PathLike | None, prediction_type: str | None
) -> Components:
    """An original SDXL file, its weights adopted as stored: in the file's dtype, memory-mapped by safetensors.

    SD files are widened to fp32 here; SDXL's are not: the base in fp32 takes 14 GB, while adopting the file's
    tensors keeps loading at 1.2 GB resident (measured). The Pipeline casts each module once, when it places it.
    """
    kind = _sdxl_kind(checkpoint)
    if config is None:
        _check_sdxl_shapes(checkpoint, kind, path)
        config_dir = SDXL_REFINER_CONFIG if kind == "refiner" else SDXL_BASE_CONFIG
        unet_config_dir = SDXL_INPAINTING_UNET_CONFIG if kind == "inpainting" else config_dir / "unet"
    else:
        config_dir = Path(config).expanduser()
        if not config_dir.is_dir():
            raise ModelLoadError(f"config= {config_dir} is not a folder of diffusers configs")
        _check_sdxl_folder(config_dir, has_clip_l=kind != "refiner")
        unet_config_dir = config_dir / "unet"
    bigg_prefix = SDXL_REFINER_BIGG_PREFIX if kind == "refiner" else SDXL_BIGG_PREFIX
    return Components(
        tokenizer=None if kind == "refiner" else _folder_tokenizer(config_dir / "tokenizer"),
        text_encoder=None if kind == "refiner" else _sdxl_clip_l(checkpoint, config_dir / "text_encoder", path),
        unet=_sdxl_unet(checkpoint, unet_config_dir, path),
        vae=_sdxl_vae(checkpoint, config_dir / "vae", path),
        scheduler_config=_scheduler_config(config_dir / "scheduler", prediction_type),
        source=str(path.resolve()),
        name=path.stem,
        tokenizer_2=_folder_tokenizer(config_dir / "tokenizer_2"),
        text_encoder_2=_sdxl_bigg(checkpoint, bigg_prefix, config_dir / "text_encoder_2", path),
        pipeline_config=_sdxl_pipeline_config(_read_json(config_dir / "model_index.json")),
    )


def _check_sdxl_shapes(checkpoint: dict, kind: str, path: Path) -> None:
    """The bundled configs fit only the real SDXL sizes; anything else needs its own configs."""
    conv_in, add_embedding = checkpoint.get(UNET_CONV_IN_KEY), checkpoint.get(UNET_ADD_EMBEDDING_KEY)
    shapes = tuple(None if t is None else tuple(t.shape) for t in (conv_in, add_embedding))
    if shapes != SDXL_SHAPES[kind]:
        raise ModelLoadError(
            f"{path.name} has SDXL {kind} text encoders but a UNet of another size (conv_in, label_emb: {shapes}); "
            "pass config= a diffusers folder with its unet/vae/text_encoder(_2)/tokenizer(_2)/scheduler configs"
        )


def _sdxl_unet(checkpoint: dict, config_dir: Path, path: Path) -> UNet2DConditionModel:
    config = {k: v for k, v in UNet2DConditionModel.load_config(config_dir).items() if k not in EMA_CONFIG_KEYS}
    return _adopt(
        UNet2DConditionModel.from_config, config, convert_ldm_unet_checkpoint(checkpoint, config), "unet", path
    )


def _sdxl_vae(checkpoint: dict, config_dir: Path, path: Path) -> AutoencoderKL:
    config = AutoencoderKL.load_config(config_dir)
    return _adopt(AutoencoderKL.from_config, config, convert_ldm_vae_checkpoint(checkpoint, config), "vae", path)


def _sdxl_clip_l(checkpoint: dict, config_dir: Path, path: Path) -> CLIPTextModel:
    state_dict = convert_ldm_clip_checkpoint(checkpoint)  # strips conditioner.embedders.0.transformer.
    # transformers >= 5.6 flattened CLIPTextModel: its keys have no "text_model." prefix.
    state_dict = {key.removeprefix("text_model."): tensor for key, tensor in state_dict.items()}
    state_dict.pop("embeddings.position_ids", None)
    return _adopt(CLIPTextModel, CLIPTextConfig.from_pretrained(config_dir), state_dict, "text_encoder", path)


def _sdxl_bigg(checkpoint: dict, prefix: str, config_dir: Path, path: Path) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig.from_pretrained(config_dir)
    # OpenCLIP's fused in_proj is split in three (at the config's width) and its text_projection transposed.
    state_dict = convert_open_clip_checkpoint(_ConfigOnly(config), checkpoint, prefix=prefix)
    return _adopt(CLIPTextModelWithProjection, config, state_dict, "text_encoder_2", path)


@dataclass
class _ConfigOnly:
    """convert_open_clip_checkpoint reads only its model argument's config."""

    config: CLIPTextConfig


def _adopt(build, config, state_dict: dict, component: str, path: Path):
    """Create the model without random init (parameters on the meta device) and adopt the file's tensors as they are.

    init_empty_weights keeps buffers (CLIP's position_ids) real; assign=True takes the tensors without a copy.
    """
    with init_empty_weights():
        model = build(config)
    _check_fit(model, state_dict, component, path)
    model.load_state_dict(state_dict, assign=True)
    return model.eval()


# ---- VAE files: another VAE for a loaded model (A1111's sd_vae) ----

VAE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# An original (CompVis) checkpoint keeps its VAE under this prefix; a VAE file of its own has the bare keys.
LDM_VAE_PREFIX = "first_stage_model."
VAE_KEY_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def load_vae(path: str | os.PathLike, like: AutoencoderKL) -> AutoencoderKL:
    """A VAE in fp32 on the CPU, from a diffusers AutoencoderKL folder or a single file (original SD layout, as
    A1111's VAE files are, or diffusers' own keys). A single file has no config: it is read with `like`'s (the
    model's own VAE), and must fit it; either kind must share the model's latent space (channels, downsampling)."""
    path = Path(path).expanduser()
    if path.is_dir():
        with _load_errors(path):
            vae, info = AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32, output_loading_info=True)
        _check_loading_info(info, ".", path)
    elif path.suffix in VAE_FILE_SUFFIXES:
        checkpoint, _ = _read_checkpoint(path)
        vae = _adopt_vae_file(checkpoint, dict(like.config), path)
    else:
        raise ModelLoadError(
            f"{path} is not a VAE: expected a diffusers AutoencoderKL folder, a .safetensors or a .ckpt file"
        )
    for key in ("latent_channels", "block_out_channels"):
        ours, theirs = like.config[key], vae.config[key]
        if key == "block_out_channels":
            ours, theirs = len(ours), len(theirs)  # the downsampling factor: 2 ** (blocks - 1)
        if ours != theirs:
            raise ModelLoadError(f"VAE {path.name} does not fit this model: {key} {theirs} where the model has {ours}")
    return vae.eval()


def _adopt_vae_file(checkpoint: dict, config: dict, path: Path) -> AutoencoderKL:
    """A single VAE file's weights in `config`'s AutoencoderKL: bare keys, or a full checkpoint's VAE part."""
    prefix = LDM_VAE_PREFIX if any(key.startswith(LDM_VAE_PREFIX) for key in checkpoint) else ""
    weights = {
        key[len(prefix) :]: tensor
        for key, tensor in checkpoint.items()
        if key.startswith(prefix) and key[len(prefix) :].startswith(VAE_KEY_PREFIXES)
    }  # a VAE's training files also hold loss.* and model_ema.* entries
    if not weights:
        raise ModelLoadError(f"{path.name} holds no VAE weights (encoder.*, decoder.*)")
    if not any(key.startswith("encoder.down_blocks.") for key in weights):  # original layout: convert
        weights = convert_ldm_vae_checkpoint(weights, config)
    return _build(AutoencoderKL, config, weights, "vae", path)
