"""ControlNet preprocessors that need no model, and fitting a control map to the generation size.

Names, parameters and their ranges are those of the AUTOMATIC1111 ControlNet extension (sd-webui-controlnet),
so units its clients send run here unchanged: `threshold_a`/`threshold_b` are each module's first and second
slider, `processor_res` the resolution the module works at. The image work is OpenCV's (the optional `control`
extra, opencv-python-headless); this module imports it only when a map is made, so the registry is cheap to read.

A map is an (H, W, 3) uint8 RGB array; the ControlNet sees it as floats in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ldmkit.errors import InvalidRequest, LdmError

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
DEFAULT_RESOLUTION = 512
RESOLUTION_RANGE = (64, 2048)


@dataclass(frozen=True)
class Slider:
    """One numeric parameter of a preprocessor, as the extension's UI slider describes it."""

    label: str
    default: float
    minimum: float
    maximum: float


@dataclass(frozen=True)
class Preprocessor:
    name: str
    label: str  # the extension's alias name, shown by /controlnet/module_list?alias_names=true
    run: Callable[[np.ndarray, float | None, float | None], np.ndarray]  # (RGB map, threshold_a, threshold_b)
    slider_a: Slider | None = None
    slider_b: Slider | None = None
    has_resolution: bool = True  # False: runs on the image as given, processor_res does not apply

    def check(self, processor_res, threshold_a, threshold_b) -> tuple[int, float | None, float | None]:
        """Values, with None (or the extension's -1) meaning the default; out-of-range ones are refused."""
        res = DEFAULT_RESOLUTION if processor_res in (None, -1) else processor_res
        if self.has_resolution and (not _is_int(res) or not RESOLUTION_RANGE[0] <= res <= RESOLUTION_RANGE[1]):
            raise InvalidRequest(
                f"processor_res must be an integer from {RESOLUTION_RANGE[0]} to {RESOLUTION_RANGE[1]} "
                f"(or -1 for {DEFAULT_RESOLUTION}), got {processor_res!r}"
            )
        return (
            res,
            _slider_value("threshold_a", self.slider_a, threshold_a),
            _slider_value("threshold_b", self.slider_b, threshold_b),
        )


def _slider_value(field: str, slider: Slider | None, value) -> float | None:
    if slider is None:
        return None  # the module has no such parameter; the extension ignores the field too
    if value is None or value == -1:
        return slider.default
    if not _is_number(value) or not slider.minimum <= value <= slider.maximum:
        raise InvalidRequest(
            f"{field} ({slider.label}) must be from {slider.minimum:g} to {slider.maximum:g} "
            f"(or -1 for {slider.default:g}), got {value!r}"
        )
    return float(value)


# ---- the preprocessors ----


def _none(image: np.ndarray, a, b) -> np.ndarray:
    return image


def _canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Canny edges (OpenCV) with hysteresis thresholds `low` and `high`: white edges on black."""
    cv2 = opencv()
    return _gray_to_rgb(cv2.Canny(image, low, high))


def _invert(image: np.ndarray, a, b) -> np.ndarray:
    """A black-on-white drawing becomes the white-on-black map scribble and line ControlNets expect."""
    return 255 - image


def _threshold(image: np.ndarray, level: float, b) -> np.ndarray:
    """White where the image is brighter than `level`, black elsewhere."""
    gray = opencv().cvtColor(image, opencv().COLOR_RGB2GRAY)
    return _gray_to_rgb(np.where(gray > level, 255, 0).astype(np.uint8))


# XDoG's two blurs: the fine one removes pixel noise, the wide one is the local background a line is darker than.
XDOG_SIGMAS = (0.5, 5.0)


def _scribble_xdog(image: np.ndarray, threshold: float, b) -> np.ndarray:
    """Scribble lines by a difference of Gaussians (XDoG): pixels darker than their surroundings become lines.

    A pixel is a line where, in its darkest channel, the wide blur exceeds the fine blur by more than
    threshold / 2 grey levels (a lower threshold draws more, fainter lines).
    """
    darkness = _darker_than_surroundings(image, *XDOG_SIGMAS)
    return _gray_to_rgb(np.where(darkness > threshold / 2, 255, 0).astype(np.uint8))


LINEART_SIGMA = 6.0  # the local background scale of a line drawing
LINEART_FLOOR = 16.0  # smallest typical line darkness the normalisation divides by (a faint drawing is not amplified)
LINEART_NOISE = 8.0  # darkness below this is paper texture, not a line, when taking the typical line darkness


def _lineart_standard(image: np.ndarray, a, b) -> np.ndarray:
    """Line art from a drawing or photo: each pixel's darkness below its blurred surroundings, normalised so a
    typical line (the median darkness of line pixels) maps to mid grey: soft white lines on black."""
    darkness = _darker_than_surroundings(image, 0.0, LINEART_SIGMA)
    lines = darkness[darkness > LINEART_NOISE]
    typical = max(LINEART_FLOOR, float(np.median(lines))) if lines.size else LINEART_FLOOR
    return _gray_to_rgb((darkness / typical * 127).clip(0, 255).astype(np.uint8))


def _darker_than_surroundings(image: np.ndarray, fine_sigma: float, wide_sigma: float) -> np.ndarray:
    """(H, W) float32, >= 0: how much darker than its wide-blurred surroundings each pixel is (darkest channel)."""
    cv2 = opencv()
    pixels = image.astype(np.float32)
    fine = cv2.GaussianBlur(pixels, (0, 0), fine_sigma) if fine_sigma > 0 else pixels
    wide = cv2.GaussianBlur(pixels, (0, 0), wide_sigma)
    return (wide - fine).min(axis=2).clip(min=0)


PREPROCESSORS = {
    p.name: p
    for p in (
        Preprocessor("none", "none", _none, has_resolution=False),
        Preprocessor(
            "canny",
            "canny",
            _canny,
            Slider("Canny Low Threshold", 100, 1, 255),
            Slider("Canny High Threshold", 200, 1, 255),
        ),
        Preprocessor("invert", "invert (from white bg & black line)", _invert, has_resolution=False),
        Preprocessor("threshold", "threshold", _threshold, Slider("Binarization Threshold", 127, 0, 255)),
        Preprocessor("scribble_xdog", "scribble_xdog", _scribble_xdog, Slider("XDoG Threshold", 32, 1, 64)),
        Preprocessor("lineart_standard", "lineart_standard (from white bg & black line)", _lineart_standard),
    )
}
_BY_LABEL = {p.label: p for p in PREPROCESSORS.values()}

# The extension's preprocessors that run a neural network (depth, pose, soft edges, segmentation...): ldmkit
# does not ship or run those models. Named here so a request for one gets a useful answer.
MODEL_PREPROCESSORS = (
    "depth_midas", "depth_zoe", "depth_leres", "depth_leres++", "depth_anything", "normal_bae", "normal_midas",
    "openpose", "openpose_face", "openpose_faceonly", "openpose_full", "openpose_hand", "dw_openpose_full",
    "softedge_hed", "softedge_hedsafe", "softedge_pidinet", "softedge_pidisafe", "softedge_teed",
    "scribble_hed", "scribble_pidinet", "lineart_realistic", "lineart_coarse", "lineart_anime",
    "lineart_anime_denoise", "mlsd", "seg_ofade20k", "seg_ufade20k", "seg_ofcoco", "shuffle", "tile_resample",
    "inpaint_only", "inpaint_only+lama", "reference_only", "ip-adapter_clip_sd15",
)  # fmt: skip


def get_preprocessor(module) -> Preprocessor:
    """The preprocessor named `module` (its name or the extension's alias label)."""
    if not isinstance(module, str):
        raise InvalidRequest(f"module must be a preprocessor name, got {module!r}")
    found = PREPROCESSORS.get(module) or _BY_LABEL.get(module)
    if found is not None:
        return found
    available = ", ".join(PREPROCESSORS)
    if module in MODEL_PREPROCESSORS:
        raise InvalidRequest(
            f"module {module!r} needs a preprocessor model, which ldmkit does not run; make the control map "
            f"elsewhere and send it with module 'none' (available: {available})"
        )
    raise InvalidRequest(f"unknown module (preprocessor) {module!r}; available: {available}")


def detect(image: Image.Image, module: str, processor_res=None, threshold_a=None, threshold_b=None) -> np.ndarray:
    """The control map of `image` made by `module` at `processor_res`: (H, W, 3) uint8 RGB."""
    preprocessor = get_preprocessor(module)
    res, a, b = preprocessor.check(processor_res, threshold_a, threshold_b)
    pixels = np.asarray(image.convert("RGB"))
    if preprocessor.has_resolution:
        pixels = _resize_short_side(pixels, res)
    return np.ascontiguousarray(preprocessor.run(pixels, a, b))


def pixel_perfect_resolution(image_size: tuple[int, int], width: int, height: int, resize_mode: str) -> int:
    """The processor resolution at which the map needs no rescaling to fill the generation size (A1111's
    "pixel perfect"): the image's short side scaled by the factor `resize_mode` will scale the whole image by."""
    image_w, image_h = image_size
    scales = (height / image_h, width / image_w)
    scale = min(scales) if resize_mode == "Resize and Fill" else max(scales)
    return round(scale * min(image_w, image_h))


def fit_to_size(control_map: np.ndarray, width: int, height: int, resize_mode: str) -> np.ndarray:
    """The map at exactly width x height, as the extension's resize modes do it.

    "Just Resize" stretches; "Crop and Resize" scales to cover and crops the middle; "Resize and Fill" scales to
    fit inside and pads with the median colour of the map's border.
    """
    if resize_mode not in RESIZE_MODES:
        raise InvalidRequest(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {resize_mode!r}")
    map_h, map_w = control_map.shape[:2]
    if resize_mode == "Just Resize":
        return _resize(control_map, width, height)
    cover = resize_mode == "Crop and Resize"
    scale = (max if cover else min)(height / map_h, width / map_w)
    scaled = _resize(control_map, max(1, round(map_w * scale)), max(1, round(map_h * scale)))
    new_h, new_w = scaled.shape[:2]
    if cover:
        top, left = (new_h - height) // 2, (new_w - width) // 2
        return np.ascontiguousarray(scaled[top : top + height, left : left + width])
    border = np.concatenate([control_map[0], control_map[-1], control_map[:, 0], control_map[:, -1]])
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = np.median(border, axis=0).astype(np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = scaled
    return canvas


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a map without blurring what makes it a map.

    Maps of few colours (segmentation, poses) keep their exact colours (nearest neighbour); others shrink by area
    averaging and grow by bicubic interpolation. A black-and-white map (edges, scribbles) is made black and white
    again, so a control line stays a line rather than a grey smear.
    """
    map_h, map_w = pixels.shape[:2]
    if (map_w, map_h) == (width, height):
        return pixels
    cv2 = opencv()
    colours = _distinct_colours(pixels)
    binary = len(colours) == 2 and colours.min() < 16 and colours.max() > 240
    if 2 < len(colours) < 200:
        interpolation = cv2.INTER_NEAREST
    elif width * height < map_w * map_h:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    resized = cv2.resize(pixels, (width, height), interpolation=interpolation)
    if binary:
        gray = resized.mean(axis=2).astype(np.uint8)
        _, gray = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        resized = _gray_to_rgb(gray)
    return resized


def _distinct_colours(pixels: np.ndarray) -> np.ndarray:
    """(k, 3) uint8: the distinct RGB colours of an (H, W, 3) map. Each pixel is packed into one integer first:
    np.unique over rows of three is ~20x slower, and a map's size is checked on every resize."""
    packed = pixels[..., 0].astype(np.uint32) << 16 | pixels[..., 1].astype(np.uint32) << 8 | pixels[..., 2]
    unique = np.unique(packed)
    return np.stack([unique >> 16, (unique >> 8) & 255, unique & 255], axis=1).astype(np.uint8)


def _resize_short_side(pixels: np.ndarray, resolution: int) -> np.ndarray:
    """Scale so the short side is `resolution`, both sides rounded to multiples of 64 (the extension's rule)."""
    cv2 = opencv()
    height, width = pixels.shape[:2]
    scale = resolution / min(height, width)
    new_w, new_h = (max(64, round(side * scale / 64) * 64) for side in (width, height))
    interpolation = cv2.INTER_LANCZOS4 if scale > 1 else cv2.INTER_AREA
    return cv2.resize(pixels, (new_w, new_h), interpolation=interpolation)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def opencv():
    try:
        import cv2
    except ImportError:
        raise LdmError(
            "ControlNet preprocessors need OpenCV: pip install 'ldmkit[control]' (opencv-python-headless)"
        ) from None
    return cv2


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
