"""Image upscalers by name: the built-in resizes (None, Lanczos, Nearest) and the super-resolution model files
(ESRGAN, Real-ESRGAN and the other architectures spandrel knows) of a folder, each named by its file stem.

A model upscales as AUTOMATIC1111's model upscalers do: its passes (each x its scale) until the image covers the
target size, at most MAX_PASSES, then a Lanczos resize to the target exactly. Large images run in tiles whose
overlap is cut away, so memory is bounded by the tile, not the image. spandrel (an optional dependency, the
`upscale` extra) reads the files: it detects the architecture from the state dict's keys, and unpickles .pth
files with an allow-list of tensor types only.
"""

from __future__ import annotations

import enum
import math
import os
import sys
import threading
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ldmkit.errors import InvalidRequest, ModelLoadError, describe

# A1111's names of its resizes; "None" resizes with Lanczos too (its hires fix and its upscale loop end so).
RESIZES = {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
MODEL_SUFFIXES = (".pth", ".safetensors")  # not .pt/.ckpt: spandrel may read a .pt as TorchScript (code)
MAX_PASSES = 3  # as A1111: a 4x model reaches 64x; beyond, the last resize does the rest
MAX_PASS_PIXELS = 8192 * 8192  # one model pass's output, checked before any pass runs
TILE = 256  # input pixels per tile side
TILE_OVERLAP = 32  # input pixels of context around a tile, cut from its output
LOADED_MODELS = 2  # models kept in memory (a hires upscaler and an extras one)


@dataclass(frozen=True)
class UpscalerInfo:
    """One entry of the list: a resize (path None) or a model file."""

    name: str
    path: Path | None = None
    scale: int | None = None  # a model's, once loaded

    @property
    def is_model(self) -> bool:
        return self.path is not None


class UpscalerLibrary:
    """The upscalers a Pipeline offers: the resizes, and the model files of `folder` (and its subfolders).

    A model loads on its first use (or check), onto the device and dtype given, and stays loaded, LRU, up to
    LOADED_MODELS; model runs are serialized (the extras endpoints and the generation worker may both ask).
    """

    def __init__(self, folder: str | os.PathLike | None = None, device="cpu", dtype=torch.float32):
        self.folder = None if folder is None else Path(folder).expanduser()
        if self.folder is not None and not self.folder.is_dir():
            raise ModelLoadError(f"upscalers folder {self.folder} does not exist")
        self.device, self.dtype = torch.device(device), dtype
        self._loaded: OrderedDict[tuple[Path, float], object] = OrderedDict()
        self._lock = threading.Lock()

    # -- names ----------------------------------------------------------------------------------

    def model_paths(self) -> dict[str, list[Path]]:
        """Stem -> the model files of that stem (more than one: ambiguous), scanned now."""
        found: dict[str, list[Path]] = {}
        if self.folder is None:
            return found
        for path in sorted(self.folder.rglob("*")):
            if path.suffix.lower() in MODEL_SUFFIXES and not path.name.startswith(".") and path.is_file():
                found.setdefault(path.stem, []).append(path)
        return found

    def entries(self) -> list[UpscalerInfo]:
        """The resizes, then the models by name (each with its scale once it has loaded)."""
        models = [
            UpscalerInfo(name, paths[0], self._loaded_scale(paths[0]))
            for name, paths in sorted(self.model_paths().items(), key=lambda item: item[0].casefold())
            if name not in RESIZES
        ]
        return [UpscalerInfo(name) for name in RESIZES] + models

    def names(self) -> list[str]:
        return [info.name for info in self.entries()]

    def resolve(self, name: str, what: str = "upscaler") -> UpscalerInfo:
        """The upscaler of that name (any case); an unknown one is refused naming the ones there are."""
        if not isinstance(name, str):
            raise InvalidRequest(f"{what} must be an upscaler name, not {type(name).__name__}")
        wanted = name.casefold()
        for resize in RESIZES:
            if resize.casefold() == wanted:
                return UpscalerInfo(resize)
        matches = [(stem, p) for stem, paths in self.model_paths().items() if stem.casefold() == wanted for p in paths]
        if len(matches) > 1:
            raise InvalidRequest(f"{what} {name!r} is ambiguous: {len(matches)} files in the upscalers folder")
        if not matches:
            where = "" if self.folder is not None else " (no upscalers folder is set: --upscalers-dir)"
            raise InvalidRequest(f"{what} {name!r} is not available{where}; upscalers here: {', '.join(self.names())}")
        return UpscalerInfo(matches[0][0], matches[0][1])

    # -- upscaling ------------------------------------------------------------------------------

    def check(self, name: str, size: tuple[int, int], target: tuple[int, int], what: str = "upscaler") -> UpscalerInfo:
        """Before any compute: the name, the model (loaded now), and the size of every pass it would run."""
        info = self.resolve(name, what)
        if info.is_model:
            scale = self.model(info).scale
            for width, height in _pass_sizes(size, target, scale):
                if width * height > MAX_PASS_PIXELS:
                    raise InvalidRequest(
                        f"{what} {info.name!r} ({scale}x) would make a {width}x{height} image on the way to "
                        f"{target[0]}x{target[1]}; at most {MAX_PASS_PIXELS} pixels"
                    )
            return UpscalerInfo(info.name, info.path, scale)
        return info

    def upscale(self, image: Image.Image, name: str, target: tuple[int, int]) -> Image.Image:
        """`image` at the target size through the named upscaler (checked first); RGBA keeps a resized alpha."""
        info = self.check(name, image.size, target)
        if not info.is_model or image.size == target:
            return image.resize(target, RESIZES.get(info.name, Image.Resampling.LANCZOS))
        alpha = image.getchannel("A") if image.mode in ("RGBA", "LA", "PA") else None
        model = self.model(info)
        result = image.convert("RGB")
        with self._lock:
            for _ in _pass_sizes(image.size, target, model.scale):
                result = run_model(model, result, self.device, self.dtype)
        result = result.resize(target, Image.Resampling.LANCZOS) if result.size != target else result
        if alpha is not None:
            result.putalpha(alpha.resize(target, Image.Resampling.LANCZOS))
        return result

    def model(self, info: UpscalerInfo):
        """The spandrel model descriptor of a model file, loaded once (again if the file changed)."""
        key = (info.path, info.path.stat().st_mtime)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            model = load_model(info.path, self.device, self.dtype)
            self._loaded[key] = model
            while len(self._loaded) > LOADED_MODELS:
                self._loaded.popitem(last=False)
            return model

    def _loaded_scale(self, path: Path) -> int | None:
        return next((model.scale for (p, _), model in list(self._loaded.items()) if p == path), None)


def load_model(path: Path, device: torch.device, dtype: torch.dtype):
    """A model file -> spandrel's ImageModelDescriptor on the device, in `dtype` where the architecture takes it."""
    spandrel = import_spandrel()
    try:
        model = spandrel.ModelLoader().load_from_file(path)
    except spandrel.UnsupportedModelError:
        raise ModelLoadError(f"upscaler {path.name}: not an architecture spandrel knows") from None
    except Exception as exc:  # noqa: BLE001 (a damaged or foreign file: the unpickler, safetensors, shapes)
        raise ModelLoadError(f"upscaler {path.name} could not be read ({describe(exc)})") from None
    rgb = (getattr(model, "input_channels", 0), getattr(model, "output_channels", 0)) == (3, 3)
    if not isinstance(model, spandrel.ImageModelDescriptor) or model.purpose not in ("SR", "Restoration") or not rgb:
        # inpainting (LaMa) and face restorers (GFPGAN...) take other inputs than a whole RGB image
        raise ModelLoadError(f"upscaler {path.name}: not an RGB upscaling model ({model.architecture.name})")
    supported = {torch.float16: model.supports_half, torch.bfloat16: model.supports_bfloat16}
    return model.to(device, dtype if supported.get(dtype, True) else torch.float32).eval()


def import_spandrel():
    """spandrel, imported with or without torchvision.

    spandrel imports torchvision for two architectures only, neither an upscaler (LaMa inpainting, the RestoreFormer
    face restorer, both refused by load_model). Where torchvision is absent (PyPI's does not load beside torch's CPU
    build, so ./setup.sh leaves it out), those two imports get a stand-in for the duration of spandrel's import.
    """
    try:
        import spandrel

        return spandrel
    except ModuleNotFoundError as exc:
        if exc.name == "spandrel":
            raise ModelLoadError("upscaler models need the spandrel package: pip install 'ldmkit[upscale]'") from None
        if exc.name is None or exc.name.split(".")[0] != "torchvision":
            raise ModelLoadError(f"spandrel could not be imported ({describe(exc)})") from None
    except Exception as exc:  # noqa: BLE001 (a torchvision built for another torch fails as it registers its ops)
        raise ModelLoadError(f"spandrel could not be imported ({describe(exc)})") from None
    stand_ins = _torchvision_stand_in()
    sys.modules.update(stand_ins)
    try:
        import spandrel
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
    return spandrel


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    """Modules named as the torchvision parts spandrel imports; what they hold fails if ever called."""

    def unavailable(*args, **kwargs):
        raise ModelLoadError("this spandrel architecture needs torchvision, which is not installed")

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC")
    functional.rotate = functional.normalize = unavailable
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    package = types.ModuleType("torchvision")
    package.transforms = transforms
    return {module.__name__: module for module in (package, transforms, functional)}


def _pass_sizes(size: tuple[int, int], target: tuple[int, int], scale: int) -> list[tuple[int, int]]:
    """The output size of each model pass taking `size` to cover `target` (none for a model of scale 1 or less)."""
    width, height = size
    if scale <= 1:
        return [size]  # a restoration model (1x) runs once
    ratio = max(target[0] / width, target[1] / height)
    passes = min(MAX_PASSES, max(1, math.ceil(math.log(ratio, scale) - 1e-9))) if ratio > 1 else 1
    return [(width * scale**i, height * scale**i) for i in range(1, passes + 1)]


@torch.inference_mode()
def run_model(model, image: Image.Image, device: torch.device, dtype: torch.dtype) -> Image.Image:
    """One pass of the model over an RGB image, tile by tile: each tile sees TILE_OVERLAP pixels of context on
    every side, which its output loses, so the result equals one pass over the whole image wherever the model
    sees no further than that (an RRDB's effective field is far narrower than its nominal one)."""
    pixels = torch.from_numpy(_as_array(image)).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    _, _, height, width = pixels.shape
    s = model.scale
    out = torch.empty((3, height * s, width * s), dtype=torch.uint8)
    for top in range(0, height, TILE):
        for left in range(0, width, TILE):
            bottom, right = min(top + TILE, height), min(left + TILE, width)
            y0, x0 = max(0, top - TILE_OVERLAP), max(0, left - TILE_OVERLAP)
            y1, x1 = min(height, bottom + TILE_OVERLAP), min(width, right + TILE_OVERLAP)
            tile = pixels[..., y0:y1, x0:x1].to(device, dtype) / 255
            upscaled = model(tile)[0, :, (top - y0) * s : (bottom - y0) * s, (left - x0) * s : (right - x0) * s]
            out[:, top * s : bottom * s, left * s : right * s] = to_uint8(upscaled).cpu()
    return Image.fromarray(out.permute(1, 2, 0).numpy())


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8, rounded to nearest (as diffusers' numpy_to_pil)."""
    return (image.float().clamp(0, 1) * 255).round().to(torch.uint8)


def _as_array(image: Image.Image):
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
