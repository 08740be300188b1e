"""ControlNet models: load them offline (diffusers folders, original single files) and name the ones in a folder.

Original single files come in three layouts: lllyasviel's (`control_model.*` keys: ControlNet 1.0/1.1 .pth files,
A1111's .safetensors conversions), bare (the same keys without the prefix: thibaud's SD2.1 ControlNets) and
diffusers' own keys in one file. SD 1.x or 2.x is read from the cross-attention width of the weights and the
bundled config of that family is used (configs/controlnet-sd15, controlnet-sd21; see configs/SOURCES.md);
diffusers' single-file conversion renames the weights. Nothing is fetched from the network.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors import SafetensorError
from safetensors.torch import load_file

from ldmkit import loading
from ldmkit.control_units import strip_model_hash
from ldmkit.errors import InvalidRequest, ModelLoadError

SD1_CONFIG = loading.CONFIGS_DIR / "controlnet-sd15"
SD2_CONFIG = loading.CONFIGS_DIR / "controlnet-sd21"
CONTEXT_DIMS = {768: SD1_CONFIG, 1024: SD2_CONFIG}  # cross-attention width -> family config
FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")  # what A1111's extension lists as models

ORIGINAL_PREFIX = "control_model."
# Keys that identify a layout (after the prefix is removed) and the width of the text conditioning it attends to.
ORIGINAL_HINT_KEY = "input_hint_block.0.weight"
DIFFUSERS_HINT_KEY = "controlnet_cond_embedding.conv_in.weight"
CROSS_ATTENTION_KEY = "attn2.to_k.weight"  # its input width is the text conditioning's (the same in both layouts)
SDXL_KEYS = ("label_emb.0.0.weight", "add_embedding.linear_1.weight")


def load_controlnet(source: str | os.PathLike, config: str | os.PathLike | None = None) -> ControlNetModel:
    """A ControlNet in fp32 on the CPU from a diffusers folder or an original single file.

    `config` is a folder holding a ControlNet config.json, for single files of other shapes than SD 1.x/2.x's.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if config is not None:
            raise ModelLoadError(f"config= only applies to single-file ControlNets; '{source}' is a folder")
        return _load_folder(path)
    if path.is_file():
        return _load_single_file(path, None if config is None else Path(config).expanduser())
    raise ModelLoadError(f"ControlNet '{source}' not found: pass a diffusers ControlNet folder or a model file")


def _load_folder(folder: Path) -> ControlNetModel:
    config = loading._read_json(folder / "config.json")
    if config.get("_class_name") != "ControlNetModel":
        raise ModelLoadError(f"{folder} is not a diffusers ControlNet folder (its config.json has no ControlNetModel)")
    if config.get("addition_embed_type") is not None:
        raise ModelLoadError(f"{folder} is an SDXL ControlNet; ldmkit runs SD 1.x/2.x ControlNets")
    with loading._load_errors(folder):
        model, info = ControlNetModel.from_pretrained(folder, torch_dtype=torch.float32, output_loading_info=True)
    loading._check_loading_info(info, "ControlNet", folder)
    return model.eval()


def _load_single_file(path: Path, config_dir: Path | None) -> ControlNetModel:
    weights = _controlnet_weights(read_weights(path), path)
    if config_dir is None:
        config_dir = _bundled_config(weights, path)
    elif not (config_dir / "config.json").is_file():
        raise ModelLoadError(f"config= {config_dir} has no config.json of a ControlNet")
    config = dict(ControlNetModel.load_config(config_dir))
    config.pop("_use_default_values", None)  # diffusers would reset those keys, the two set below among them
    hint = weights.get(ORIGINAL_HINT_KEY, weights.get(DIFFUSERS_HINT_KEY))
    config["conditioning_channels"] = int(hint.shape[1])  # most take RGB; some (inpainting) an extra mask channel
    # The weights cannot tell a shuffle ControlNet, which averages its residuals over the image; A1111's
    # extension goes by the file name, and so does ldmkit.
    config["global_pool_conditions"] = config.get("global_pool_conditions") or "shuffle" in path.stem.lower()
    try:
        converted = convert_controlnet_checkpoint(weights, config)
    except (KeyError, IndexError, RuntimeError) as error:
        raise ModelLoadError(f"{path.name}: its ControlNet weights do not convert ({error!r})") from None
    converted = {key: tensor for key, tensor in converted.items() if tensor is not None}
    return loading._build(ControlNetModel, config, converted, "ControlNet", path)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The flat state dict of a .safetensors file, or of a pickled one read with weights_only=True (no code runs)."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ModelLoadError(f"{path} is not a readable safetensors file ({error})") from None
    if path.suffix not in FILE_SUFFIXES:
        raise ModelLoadError(f"{path} is not a ControlNet file: expected one of {', '.join(FILE_SUFFIXES)}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling fails in many ways, all with the same remedy
        raise ModelLoadError(
            f"{path} cannot be loaded safely ({type(error).__name__}); convert it to .safetensors once "
            "with a tool you trust"
        ) from None
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ModelLoadError(f"{path} holds no state dict")
    return checkpoint


def _controlnet_weights(checkpoint: dict, path: Path) -> dict[str, torch.Tensor]:
    """The ControlNet's own weights, without the `control_model.` prefix; refuses what is not an SD1/2 ControlNet.

    A ControlNet 1.0 file also holds the whole SD model it was trained with: only `control_model.*` is kept.
    """
    if any(key.startswith(ORIGINAL_PREFIX) for key in checkpoint):
        checkpoint = {k[len(ORIGINAL_PREFIX) :]: v for k, v in checkpoint.items() if k.startswith(ORIGINAL_PREFIX)}
    if "difference" in checkpoint:
        raise ModelLoadError(
            f"{path.name} is a 'difference' ControlNet (weights relative to a base model); convert it to a "
            "full ControlNet first"
        )
    if any(key in checkpoint for key in SDXL_KEYS):
        raise ModelLoadError(f"{path.name} is an SDXL ControlNet; ldmkit runs SD 1.x/2.x ControlNets")
    if ORIGINAL_HINT_KEY not in checkpoint and DIFFUSERS_HINT_KEY not in checkpoint:
        kind = "a T2I-Adapter" if any(k.startswith(("body.", "adapter.")) for k in checkpoint) else "not a ControlNet"
        raise ModelLoadError(f"{path.name} is {kind} (no input hint block); ldmkit loads SD 1.x/2.x ControlNets")
    return checkpoint


def _bundled_config(weights: dict, path: Path) -> Path:
    """The family config from the cross-attention width: 768 (CLIP ViT-L, SD 1.x) or 1024 (OpenCLIP ViT-H, SD 2.x)."""
    to_k = next((tensor for key, tensor in weights.items() if key.endswith(CROSS_ATTENTION_KEY)), None)
    context_dim = None if to_k is None or to_k.ndim != 2 else int(to_k.shape[1])
    if context_dim not in CONTEXT_DIMS:
        raise ModelLoadError(
            f"{path.name} is not an SD 1.x/2.x-shaped ControlNet (cross-attention width {context_dim}); pass "
            "config= a folder with its diffusers config.json"
        )
    return CONTEXT_DIMS[context_dim]


# ---- a folder of ControlNets (--controlnet-dir) ----


@dataclass
class ControlNetLibrary:
    """The ControlNets in a folder and its subfolders, named by file or folder stem as A1111's model list does.

    Models load on first use and stay loaded (on the CPU, fp32); a Pipeline moves its own copy to its device.
    """

    folder: Path
    _loaded: dict[Path, ControlNetModel] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.folder = Path(self.folder).expanduser()
        if not self.folder.is_dir():
            raise ModelLoadError(f"ControlNet folder {self.folder} does not exist")

    def paths(self) -> dict[str, list[Path]]:
        """Name -> every file or diffusers folder of that name (more than one: ambiguous), scanned now."""
        found: dict[str, list[Path]] = {}
        for root, dirs, files in os.walk(self.folder):
            root_path = Path(root)
            for name in sorted(dirs):
                if loading._read_json(root_path / name / "config.json").get("_class_name") == "ControlNetModel":
                    found.setdefault(name, []).append(root_path / name)
            dirs[:] = sorted(d for d in dirs if not (root_path / d / "config.json").is_file())
            for name in sorted(files):
                path = root_path / name
                if path.suffix in FILE_SUFFIXES and not name.startswith("."):
                    found.setdefault(path.stem, []).append(path)
        return found

    def names(self) -> list[str]:
        return sorted(self.paths(), key=str.casefold)

    def titles(self) -> list[str]:
        """A1111's model list entries: "name [hash]" (the short hash of the weights file)."""
        return [f"{name} [{model_hash(paths[0])}]" for name, paths in sorted(self.paths().items())]

    def resolve(self, name: str) -> Path:
        """The path of the ControlNet `name` (A1111's "name [hash]" form and any case accepted)."""
        wanted = strip_model_hash(name).casefold()
        matches = [paths for stem, paths in self.paths().items() if stem.casefold() == wanted]
        if not matches:
            raise InvalidRequest(f"ControlNet '{name}' not found in {self.folder}")
        paths = [p for group in matches for p in group]
        if len(paths) > 1:
            raise InvalidRequest(f"ControlNet '{name}' is ambiguous: {', '.join(str(p) for p in paths)}")
        return paths[0]

    def load(self, name: str) -> ControlNetModel:
        path = self.resolve(name)
        if path not in self._loaded:
            self._loaded[path] = load_controlnet(path)
        return self._loaded[path]


def model_hash(path: Path) -> str:
    """A1111's short model hash (its list shows "name [hash]"): sha256 of the 64 KiB at 1 MiB, 8 hex digits.

    A diffusers folder is hashed by its weights file.
    """
    if path.is_dir():
        weights = sorted(path.glob("diffusion_pytorch_model*.safetensors")) or sorted(path.glob("*.bin"))
        if not weights:
            return "00000000"
        path = weights[0]
    with open(path, "rb") as file:
        file.seek(0x100000)
        return hashlib.sha256(file.read(0x10000)).hexdigest()[:8]
