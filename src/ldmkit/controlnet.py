"""ControlNet models: load them offline (diffusers folders, original single files) and name the ones in a folder.

Original single files come in three layouts: lllyasviel's (`control_model.*` keys: ControlNet 1.0/1.1 .pth files,
A1111's .safetensors conversions), bare (the same keys without the prefix: thibaud's SD2.1 ControlNets) and
diffusers' own keys in one file (the public SDXL ControlNet files: lllyasviel's sd_control_collection
`diffusers_xl_*`, and diffusers' own repos' weights file renamed). The family is read from the weights: SDXL by its
added (text_time) embedding, SD 1.x or 2.x by the cross-attention width; the bundled config of that family is used
(configs/controlnet-sd15, controlnet-sd21, controlnet-sdxl; see configs/SOURCES.md), and an SDXL file's
transformer depth per block is read from its weights (diffusers' full, mid and small SDXL ControlNets differ only
there). diffusers' single-file conversion renames the weights. Nothing is fetched from the network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ldmkit import loading
from ldmkit.control_preprocess import detect, fit_to_size, pixel_perfect_resolution
from ldmkit.control_units import CONTROL_MODES, ControlUnit, strip_model_hash
from ldmkit.denoise import Denoiser
from ldmkit.errors import InvalidRequest, ModelLoadError

SD1_CONFIG = loading.CONFIGS_DIR / "controlnet-sd15"
SD2_CONFIG = loading.CONFIGS_DIR / "controlnet-sd21"
SDXL_CONFIG = loading.CONFIGS_DIR / "controlnet-sdxl"
CONTEXT_DIMS = {768: SD1_CONFIG, 1024: SD2_CONFIG}  # cross-attention width -> family config (SD 1.x/2.x)
# The family a UNet or ControlNet belongs to, by the width of the text states it attends to.
FAMILY_NAMES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "SDXL refiner"}
FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")  # what A1111's extension lists as models

ORIGINAL_PREFIX = "control_model."
# Keys that identify a layout (after the prefix is removed) and the width of the text conditioning it attends to.
ORIGINAL_HINT_KEY = "input_hint_block.0.weight"
DIFFUSERS_HINT_KEY = "controlnet_cond_embedding.conv_in.weight"
CROSS_ATTENTION_KEY = "attn2.to_k.weight"  # its input width is the text conditioning's (the same in both layouts)
# SDXL's added embedding (pooled text + size/crop ids): diffusers' name, then sgm's
SDXL_KEYS = {
    "add_embedding.linear_1.": "add_embedding.linear_1.",
    "label_emb.0.0.": "add_embedding.linear_1.",
    "add_embedding.linear_2.": "add_embedding.linear_2.",
    "label_emb.0.2.": "add_embedding.linear_2.",
}


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
    if config.get("addition_embed_type") not in (None, "text_time"):
        raise ModelLoadError(
            f"{folder}: a ControlNet with {config['addition_embed_type']!r} added conditioning is not an SD 1.x/2.x "
            "or SDXL ControlNet"
        )
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
    # diffusers' converter knows SD's keys only: SDXL's added embedding is carried over by name.
    converted |= {
        SDXL_KEYS[prefix] + key[len(prefix) :]: tensor
        for key, tensor in weights.items()
        for prefix in SDXL_KEYS
        if key.startswith(prefix)
    }
    if config.get("addition_embed_type") == "text_time":
        config |= _sdxl_layout(converted, len(config["block_out_channels"]))
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
    return loading._ckpt_state_dict(
        loading.load_pickled(path), path
    )  # a state_dict holding itself is refused, not looped over


def _controlnet_weights(checkpoint: dict, path: Path) -> dict[str, torch.Tensor]:
    """The ControlNet's own weights, without the `control_model.` prefix; refuses what is not a ControlNet.

    A ControlNet 1.0 file also holds the whole SD model it was trained with: only `control_model.*` is kept.
    """
    if any(key.startswith(ORIGINAL_PREFIX) for key in checkpoint):
        checkpoint = {k[len(ORIGINAL_PREFIX) :]: v for k, v in checkpoint.items() if k.startswith(ORIGINAL_PREFIX)}
    if "difference" in checkpoint:
        raise ModelLoadError(
            f"{path.name} is a 'difference' ControlNet (weights relative to a base model); convert it to a "
            "full ControlNet first"
        )
    if "lora_controlnet" in checkpoint:
        raise ModelLoadError(
            f"{path.name} is a Control-LoRA (low-rank ControlNet weights over an SDXL UNet); ldmkit loads full "
            "ControlNets"
        )
    if ORIGINAL_HINT_KEY not in checkpoint and DIFFUSERS_HINT_KEY not in checkpoint:
        kind = "a T2I-Adapter" if any(k.startswith(("body.", "adapter.")) for k in checkpoint) else "not a ControlNet"
        raise ModelLoadError(
            f"{path.name} is {kind} (no input hint block); ldmkit loads SD 1.x/2.x and SDXL ControlNets"
        )
    return checkpoint


def _bundled_config(weights: dict, path: Path) -> Path:
    """The family config: SDXL's for an added (text_time) embedding of SDXL's width; else by the cross-attention
    width, 768 (CLIP ViT-L, SD 1.x) or 1024 (OpenCLIP ViT-H, SD 2.x)."""
    to_k = next((tensor for key, tensor in weights.items() if key.endswith(CROSS_ATTENTION_KEY)), None)
    context_dim = None if to_k is None or to_k.ndim != 2 else int(to_k.shape[1])
    added = weights.get("add_embedding.linear_1.weight", weights.get("label_emb.0.0.weight"))
    if added is not None:
        sdxl = ControlNetModel.load_config(SDXL_CONFIG)
        if (
            context_dim not in (None, sdxl["cross_attention_dim"])
            or added.shape[-1] != sdxl["projection_class_embeddings_input_dim"]
        ):
            raise ModelLoadError(
                f"{path.name} is not an SDXL-shaped ControlNet (cross-attention width {context_dim}, added "
                f"embedding input {added.shape[-1]}); pass config= a folder with its diffusers config.json"
            )
        return SDXL_CONFIG
    if context_dim not in CONTEXT_DIMS:
        raise ModelLoadError(
            f"{path.name} is not an SD 1.x/2.x- or SDXL-shaped ControlNet (cross-attention width {context_dim}); pass "
            "config= a folder with its diffusers config.json"
        )
    return CONTEXT_DIMS[context_dim]


def _sdxl_layout(weights: dict, blocks: int) -> dict:
    """The config fields an SDXL ControlNet's weights decide: which down blocks attend, how many transformer layers
    each (and the middle block) has. diffusers' full SDXL ControlNets have SDXL's [1, 2, 10]; its mid and small ones
    fewer, some none (an attention block with zero layers keeps its norm and projections)."""

    def depth(prefix: str) -> int:
        layers = {key[len(prefix) :].split(".")[0] for key in weights if key.startswith(prefix)}
        return len(layers)

    attends = [any(key.startswith(f"down_blocks.{i}.attentions.") for key in weights) for i in range(blocks)]
    depths = [depth(f"down_blocks.{i}.attentions.0.transformer_blocks.") for i in range(blocks)]
    if any(key.startswith("mid_block.attentions.") for key in weights):
        depths[-1] = depth("mid_block.attentions.0.transformer_blocks.")  # diffusers builds the middle from the last
        mid_block_type = "UNetMidBlock2DCrossAttn"
    else:
        mid_block_type = "UNetMidBlock2D"
    return {
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "transformer_layers_per_block": depths,
        "mid_block_type": mid_block_type,
    }


# ---- a folder of ControlNets (--controlnet-dir) ----


class ControlNetLibrary:
    """The ControlNets a Pipeline can use: those in a folder and its subfolders, named by file or folder stem as
    A1111's model list names them, and any given by path. Each loads once, onto the device it is first asked for.
    """

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = None if folder is None else Path(folder).expanduser()
        if self.folder is not None and not self.folder.is_dir():
            raise ModelLoadError(f"ControlNet folder {self.folder} does not exist")
        self._loaded: dict[Path, ControlNetModel] = {}

    def paths(self) -> dict[str, list[Path]]:
        """Name -> every file or diffusers folder of that name (more than one: ambiguous), scanned now."""
        found: dict[str, list[Path]] = {}
        if self.folder is None:
            return found
        for path in loading.walk_models(self.folder, "ControlNetModel", FILE_SUFFIXES):
            found.setdefault(path.stem if path.is_file() else path.name, []).append(path)
        return found

    def names(self) -> list[str]:
        return sorted(self.paths(), key=str.casefold)

    def titles(self) -> list[str]:
        """A1111's model list entries: "name [hash]"."""
        return [self.title(paths[0]) for _, paths in sorted(self.paths().items(), key=lambda item: item[0].casefold())]

    @staticmethod
    def title(path: Path) -> str:
        return f"{path.stem if path.is_file() else path.name} [{model_hash(path)}]"

    def resolve_name(self, name: str) -> Path:
        """The ControlNet of the folder named `name` (A1111's "name [hash]" and any case accepted); never a path, so
        a server's clients reach only the folder's models."""
        wanted = strip_model_hash(name).casefold()
        matches = [p for stem, paths in self.paths().items() if stem.casefold() == wanted for p in paths]
        if len(matches) > 1:
            raise InvalidRequest(f"ControlNet '{name}' is ambiguous: {', '.join(str(p) for p in matches)}")
        if not matches:
            where = (
                f"in {self.folder}" if self.folder is not None else "(no ControlNet folder is set: --controlnet-dir)"
            )
            raise InvalidRequest(f"ControlNet '{name}' not found {where}")
        return matches[0]

    def resolve(self, model: str) -> Path:
        """A name in the folder, else a path to a ControlNet file or folder (the Python API and the CLI)."""
        try:
            return self.resolve_name(model)
        except InvalidRequest:
            path = Path(model).expanduser()
            if not path.exists():
                raise
            return path

    def load(self, path: Path, device: torch.device, dtype: torch.dtype) -> ControlNetModel:
        """The model at `path`, loaded once and kept on `device` in `dtype`."""
        if path not in self._loaded:
            self._loaded[path] = torch.nn.Module.to(load_controlnet(path), device, dtype).eval()
        model = self._loaded[path]
        if model.device != device or model.dtype != dtype:
            torch.nn.Module.to(model, device, dtype)
        return model


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


# ---- guiding a generation ----

# "My prompt is more important" / "ControlNet is more important" scale residual i of n (the deepest last) by
# SOFT_INJECTION ** (n - 1 - i), the ControlNet 1.1 "guess mode" weights the extension uses: for SD's 13 residuals
# the shallowest gets 0.825 ** 12 ~ 0.1 of the unit's weight, the middle block all of it.
SOFT_INJECTION = 0.825
SOFT_IN_HIRES_MODULES = ("canny", "mlsd")  # the extension weakens these in a hires pass whatever the control mode


@dataclass
class PreparedControl:
    """One unit ready to run: its placed model and its control maps at each size a pass needs."""

    unit: ControlUnit
    model: ControlNetModel
    title: str  # the model as A1111 lists it: "name [hash]"
    fitted: dict[tuple[int, int], np.ndarray]  # (width, height) of a pass -> its (H, W, 3) uint8 control map
    maps: dict[tuple[int, int], torch.Tensor]  # the same as (1, 3, H, W) in [0, 1] on the model's device

    def active(self, step: int, steps: int) -> bool:
        """Whether model call `step` of a pass of `steps` lies inside [guidance_start, guidance_end] (its whole span,
        as diffusers keeps a ControlNet: the extension compares only the step's start with guidance_end)."""
        return not (step / steps < self.unit.guidance_start or (step + 1) / steps > self.unit.guidance_end)

    def residuals(self, sample, timestep, context, guided: bool, size, hires: bool, added_cond_kwargs=None):
        """The unit's weighted down-block and mid-block residuals for a UNet input batch; `added_cond_kwargs` is
        the UNet's own (SDXL's pooled text and size ids), which an SDXL ControlNet takes as well."""
        image = self.maps[size]
        cond_only = guided and (self.unit.control_mode == CONTROL_MODES[2] or self.model.config.global_pool_conditions)
        if cond_only:  # the unconditional half gets no control: classifier-free guidance then amplifies it
            half = sample.shape[0] // 2
            sample, context = sample[half:], context[half:]
            if added_cond_kwargs is not None:
                added_cond_kwargs = {key: value[half:] for key, value in added_cond_kwargs.items()}
        sample = sample[:, : self.model.config.in_channels]  # an inpainting UNet's extra mask/image channels
        down, mid = self.model(
            sample,
            timestep,
            encoder_hidden_states=context,
            controlnet_cond=image.expand(sample.shape[0], -1, -1, -1),
            conditioning_scale=1.0,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )
        scales = self.scales(len(down) + 1, hires)
        residuals = [r * s for r, s in zip([*down, mid], scales)]
        if cond_only:
            residuals = [torch.cat([torch.zeros_like(r), r]) for r in residuals]
        return residuals[:-1], residuals[-1]

    def scales(self, count: int, hires: bool) -> list[float]:
        soft = self.unit.control_mode != CONTROL_MODES[0] or (hires and self.unit.module in SOFT_IN_HIRES_MODULES)
        if not soft:
            return [self.unit.weight] * count
        return [self.unit.weight * SOFT_INJECTION ** float(count - 1 - i) for i in range(count)]


@dataclass
class ControlledUNet:
    """The UNet with ControlNets' residuals added, called as diffusers' UNet is: for one pass of `steps` calls."""

    unet: Callable
    controls: list[PreparedControl]
    steps: int
    guided: bool  # the batch is [unconditional, conditional] halves
    size: tuple[int, int]  # (width, height) of the pass
    hires: bool
    step: int = 0

    def __call__(self, sample, timestep, encoder_hidden_states, **kwargs):
        if self.step >= self.steps:
            raise RuntimeError(f"a ControlledUNet made for {self.steps} calls was called again")
        step, self.step = self.step, self.step + 1
        down, mid = None, None
        for control in self.controls:
            if not control.active(step, self.steps):
                continue
            d, m = control.residuals(
                sample,
                timestep,
                encoder_hidden_states,
                self.guided,
                self.size,
                self.hires,
                kwargs.get("added_cond_kwargs"),
            )
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if down is not None:
            kwargs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)


@dataclass
class Controls:
    """A request's ControlNet units, prepared: `guide` gives each sampling pass its controlled denoiser."""

    prepared: list[PreparedControl]

    def guide(self, denoiser: Denoiser, steps: int, size: tuple[int, int], hires: bool = False) -> Denoiser:
        """The denoiser whose UNet call adds the residuals of the units guiding this pass (hr_option)."""
        skipped = "High res only" if not hires else "Low res only"
        controls = [c for c in self.prepared if c.unit.hr_option != skipped]
        if not controls:
            return denoiser
        unet = ControlledUNet(denoiser.unet, controls, steps, denoiser.use_guidance, size, hires)
        return dataclasses.replace(denoiser, unet=unet)

    def control_maps(self) -> list[Image.Image]:
        """Each unit's control map as the ControlNet saw it, at each pass's size (A1111's "detected maps")."""
        return [Image.fromarray(m) for control in self.prepared for m in control.fitted.values()]


def check_controls(units, library: ControlNetLibrary, models) -> None:
    """What can be checked of a request's units before any model loads: their models exist and are of the model's
    family (as far as a config or file header tells), and the UNet is run in a form that takes residuals (not the
    fast path's compiled call)."""
    if not units:
        return
    if models.unet_forward is not None:
        raise InvalidRequest(
            "ControlNets are not supported on the fast path (compiled UNet); load the model without --fast"
        )
    for index, unit in enumerate(units):
        try:
            path = library.resolve(unit.model)
        except InvalidRequest as error:
            raise InvalidRequest(f"ControlNet unit {index}: {error}") from None
        family = peek_family(path)
        if family is not None and family[0] is not None:
            _check_family(*family, models.unet, index, unit.model_name)


def prepare_controls(
    units, library: ControlNetLibrary, unet, sizes: list[tuple[int, int]], init_image, device, dtype
) -> Controls:
    """Load each unit's model onto the device and make its control map at every pass size (`sizes`, the base pass's
    first). A unit without an image uses the init image, as A1111's img2img does."""
    prepared = []
    final_width, final_height = sizes[-1]
    for index, unit in enumerate(units):
        path = library.resolve(unit.model)
        model = library.load(path, device, dtype)
        _check_fits(model, unet, index, unit.model_name)
        image = unit.image if unit.image is not None else init_image
        processor_res = unit.processor_res
        if unit.pixel_perfect:
            processor_res = pixel_perfect_resolution(image.size, final_width, final_height, unit.resize_mode)
        detected = detect(image, unit.module, processor_res, unit.threshold_a, unit.threshold_b)
        fitted = {size: fit_to_size(detected, *size, unit.resize_mode) for size in sizes}
        maps = {size: _map_tensor(fitted_map, device, dtype) for size, fitted_map in fitted.items()}
        prepared.append(PreparedControl(unit, model, library.title(path), fitted, maps))
    return Controls(prepared)


def _check_fits(model: ControlNetModel, unet, index: int, name: str) -> None:
    """A ControlNet guides a UNet of its own family (same text states and added conditioning) with RGB maps."""
    _check_family(model.config.cross_attention_dim, model.config.addition_embed_type, unet, index, name)
    # Its residuals are added to the UNet's skip connections: one per layer of every level, at the level's width.
    layout, unet_layout = _layout(model.config), _layout(unet.config)
    if layout != unet_layout:
        raise InvalidRequest(
            f"ControlNet unit {index}: '{name}' was made for a UNet of widths {layout[0]} with {layout[1]} layers per "
            f"level; this model's UNet has {unet_layout[0]} with {unet_layout[1]}: use a ControlNet made for this model"
        )
    if model.config.conditioning_channels != 3:
        raise InvalidRequest(
            f"ControlNet unit {index}: its ControlNet takes {model.config.conditioning_channels}-channel control "
            "images (an inpainting ControlNet's image and mask); ldmkit makes RGB control maps"
        )


def _layout(config) -> tuple[tuple[int, ...], int]:
    layers = config.layers_per_block
    return tuple(config.block_out_channels), layers if isinstance(layers, int) else tuple(layers)


def _check_family(context_dim, addition_embed_type, unet, index: int, name: str) -> None:
    """Refuse, naming the ControlNet and both families, a ControlNet made for another family than the UNet's."""
    ours = (unet.config.cross_attention_dim, unet.config.addition_embed_type)
    if (context_dim, addition_embed_type) != ours:
        raise InvalidRequest(
            f"ControlNet unit {index}: '{name}' is {_family_name(context_dim, addition_embed_type)} ControlNet and "
            f"this model is {_family_name(*ours)}: use a ControlNet made for the model's family"
        )


def _family_name(context_dim, addition_embed_type) -> str:
    family = FAMILY_NAMES.get(context_dim)
    if family is None or family.startswith("SDXL") != (addition_embed_type == "text_time"):
        return f"a {context_dim}-wide-text ({addition_embed_type or 'no'} added conditioning)"
    return f"an {family}"


def peek_family(path: Path) -> tuple[int | None, str | None] | None:
    """(cross-attention width, added conditioning type) of a ControlNet folder or .safetensors file, read from its
    config or its file header without loading weights; None where only loading tells (pickles)."""
    if path.is_dir():
        config = loading._read_json(path / "config.json")
        return config.get("cross_attention_dim"), config.get("addition_embed_type")
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as file:
            keys = [key.removeprefix(ORIGINAL_PREFIX) for key in file.keys()]
            to_k = next((key for key in file.keys() if key.endswith(CROSS_ATTENTION_KEY)), None)
            context_dim = None if to_k is None else file.get_slice(to_k).get_shape()[-1]
    except (SafetensorError, OSError):
        return None  # loading it says what is wrong
    added = "text_time" if any(key.startswith(tuple(SDXL_KEYS)) for key in keys) else None
    return context_dim, added


def _map_tensor(control_map: np.ndarray, device, dtype) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) in [0, 1], as diffusers' control image processor makes it."""
    tensor = torch.tensor(control_map, dtype=torch.float32) / 255.0
    return tensor.permute(2, 0, 1)[None].to(device, dtype)
