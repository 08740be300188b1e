"""Model loading: diffusers folders, cached Hub repo ids and original single files, never the network.

Single files are converted with diffusers' own single-file conversion functions; the component
configs they need ship in `configs/` (see configs/SOURCES.md), so SD 1.x and 2.x load offline.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import diffusers
import huggingface_hub
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict  # diffusers scheduler config: betas, num_train_timesteps, prediction_type, ...
    source: str  # resolved location: a folder or a file
    name: str  # short model name for metadata ("v1-5-pruned", "default-model")


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
    """Write a diffusers-layout folder that both `load_components` and diffusers' pipelines load."""
    scheduler_config = dict(components.scheduler_config)
    scheduler_cls = getattr(diffusers, scheduler_config.pop("_class_name", "DDIMScheduler"))
    pipeline = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler_cls.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return Path(folder)


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
    _check_folder(folder, model_index=True)
    with _load_errors(folder):
        unet, info = UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", torch_dtype=torch.float32, output_loading_info=True
        )
        _check_loading_info(info, "unet", folder)
        vae, info = AutoencoderKL.from_pretrained(
            folder, subfolder="vae", torch_dtype=torch.float32, output_loading_info=True
        )
        _check_loading_info(info, "vae", folder)
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
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - unpickling fails in many ways, all with the same remedy
            raise ModelLoadError(
                f"{path} cannot be loaded safely ({type(error).__name__}); convert it to .safetensors "
                "once with a tool you trust (e.g. diffusers' convert_original_stable_diffusion_to_diffusers.py)"
            ) from None
        global_step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
        return _ckpt_state_dict(checkpoint, path), global_step if isinstance(global_step, int) else None
    raise ModelLoadError(f"{path} is not a model: expected a folder, a .safetensors or a .ckpt file")


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
            f"{path.name} is not an SD 1.x/2.x text-to-image checkpoint; for other architectures "
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
