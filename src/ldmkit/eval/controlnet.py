"""`ldm eval --controlnet`: does a generated image follow its edge map? Edge F1 with and without the ControlNet.

For held-out images (the ControlNet stage's holdout: it never trained on them), the `canny` preprocessor makes the
control map; an image is generated from it, its own canny edges are taken the same way, and the two edge sets are
compared with a tolerance of a pixel or two. The same prompts without the ControlNet (which is what weight 0 gives)
are the baseline: the shipped UNet has seen these emoji, so with their caption it draws much of the shape unaided.
The empty prompt asks the control map alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldmkit.control_preprocess import RESOLUTION_RANGE, get_preprocessor, opencv
from ldmkit.control_units import ControlUnit
from ldmkit.errors import LdmError
from ldmkit.eval.generate import EVAL_SAMPLER, grid
from ldmkit.pipeline import Pipeline
from ldmkit.train.common import holdout_mask, load_dataset

TOLERANCES = (1, 2)  # pixels (Chebyshev distance) an edge may be off and still count


def edge_f1(edges: np.ndarray, reference: np.ndarray, tolerance: int) -> dict[str, float]:
    """Precision, recall and F1 of edge pixels `edges` against `reference` (boolean (H, W) arrays).

    A predicted edge pixel is correct if a reference edge lies within `tolerance` pixels (a (2t+1)^2 square);
    a reference edge pixel is found if a predicted edge lies that close. Two empty maps agree perfectly (1.0).
    """
    if edges.shape != reference.shape:
        raise ValueError(f"edge maps differ in size: {edges.shape} and {reference.shape}")
    edges, reference = edges.astype(bool), reference.astype(bool)
    if not edges.any() and not reference.any():
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    near_reference = _dilate(reference, tolerance)
    near_edges = _dilate(edges, tolerance)
    precision = float((edges & near_reference).sum() / edges.sum()) if edges.any() else 0.0
    recall = float((reference & near_edges).sum() / reference.sum()) if reference.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _dilate(mask: np.ndarray, tolerance: int) -> np.ndarray:
    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    return opencv().dilate(mask.astype(np.uint8), kernel).astype(bool)


CANNY_THRESHOLDS = (100, 200)  # the canny preprocessor's defaults


def canny_edges(image: Image.Image | np.ndarray) -> np.ndarray:
    """Boolean (H, W) Canny edges at the image's own size, with the canny preprocessor's default thresholds (at
    128 px this is exactly the map `control_unit` makes)."""
    pixels = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else image
    return opencv().Canny(np.ascontiguousarray(pixels), *CANNY_THRESHOLDS) > 0


def evaluate_controlnet(
    model_dir: Path,
    controlnet: Path,
    data_dir: Path,
    count: int = 32,
    steps: int = 25,
    guidance: float | None = None,
    seed: int = 0,
    holdout_fraction: float = 0.02,
    device=None,
) -> dict:
    """Edge F1 of images generated from the canny maps of `count` held-out images, with and without the ControlNet,
    for each image's caption ("name, style") and for the empty prompt."""
    dataset = load_dataset(Path(data_dir))
    held_out = dataset.subset(holdout_mask(dataset, holdout_fraction))
    if len(held_out) == 0:
        raise LdmError(f"no held-out images in {data_dir} at holdout_fraction {holdout_fraction}")
    pipe = load_pipeline(model_dir, device)
    guidance = pipe.default_guidance if guidance is None else guidance  # None: the model's own, recorded as a number
    side = pipe.default_size  # a 256 px model is asked at its own size: the emoji drawn over the whole frame
    images = [Image.fromarray(held_out.images[i].permute(1, 2, 0).numpy()) for i in range(min(count, len(held_out)))]
    if images and images[0].size != (side, side):
        images = [image.resize((side, side), Image.BILINEAR) for image in images]
    captions = [held_out.records[i].captions()[1] for i in range(len(images))]
    references = [canny_edges(image) for image in images]
    size = images[0].size
    results: dict = {
        "controlnet": str(controlnet),
        "model": str(model_dir),
        "images": len(images),
        "held_out": True,
        "steps": steps,
        "guidance": guidance,
        "sampler": EVAL_SAMPLER,
        "control": "canny (100/200) at the image size, weight 1",
        "tolerances_px": list(TOLERANCES),
    }
    for prompt_kind, prompts in (("caption", captions), ("empty", [""] * len(images))):
        without = _generate(pipe, prompts, seed, steps, guidance, size)
        with_ = [
            _generate(pipe, [prompt], seed, steps, guidance, size, control_unit(controlnet, image))[0]
            for prompt, image in zip(prompts, images)
        ]
        for label, generated in (("without", without), ("with", with_)):
            scores = [
                [edge_f1(canny_edges(g), r, t) for g, r in zip(generated, references)] for t in TOLERANCES
            ]  # (tolerances, images)
            results[f"{prompt_kind}_{label}"] = {
                f"tol{t}": {key: float(np.mean([s[key] for s in per_image])) for key in ("precision", "recall", "f1")}
                for t, per_image in zip(TOLERANCES, scores)
            }
    return results


def control_unit(controlnet: Path, image: Image.Image, module: str = "canny", weight: float = 1.0) -> ControlUnit:
    """A unit making its map from `image` at the image's own size (processor_res = its short side, at least the
    preprocessors' minimum of 64)."""
    res = max(RESOLUTION_RANGE[0], min(image.size)) if get_preprocessor(module).has_resolution else None
    return ControlUnit(model=str(controlnet), image=image, module=module, weight=weight, processor_res=res)


def load_pipeline(model_dir: Path, device=None) -> Pipeline:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Pipeline.from_pretrained(Path(model_dir), device=device, dtype=torch.float32)


def _generate(pipe: Pipeline, prompts: list[str], seed: int, steps: int, guidance: float | None, size, unit=None):
    """(H, W, 3) uint8 arrays, one per prompt; one ControlNet unit (one map) per call, so then one prompt."""
    result = pipe.generate(
        prompts,
        seed=[seed] * len(prompts),
        steps=steps,
        guidance=guidance,
        sampler=EVAL_SAMPLER,
        width=size[0],
        height=size[1],
        controls=None if unit is None else [unit],
    )
    return [np.asarray(image) for image in result.images]


def control_grid(
    pipe: Pipeline,
    controlnet: Path,
    rows: list[tuple[Image.Image, str, str]],
    seeds=(0, 1, 2, 3, 4),
    steps: int = 25,
    guidance: float | None = None,
) -> Image.Image:
    """One row per (image, preprocessor, prompt): the control map the ControlNet saw, then one image per seed."""
    size = pipe.default_size
    tiles = []
    for image, module, prompt in rows:
        result = pipe.generate(
            prompt,
            seed=list(seeds),
            num_images=len(seeds),
            steps=steps,
            guidance=guidance,
            sampler=EVAL_SAMPLER,
            width=size,
            height=size,
            controls=[control_unit(controlnet, image, module)],
        )
        tiles.append(np.asarray(result.control_maps[0].convert("RGB")))
        tiles.extend(np.asarray(generated) for generated in result.images)
    return grid(torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2), columns=len(seeds) + 1)


def docs_grid(
    model_dir: Path, controlnet: Path, data_dir: Path, held_out_rows: int = 4, holdout_fraction: float = 0.02, **kwargs
) -> Image.Image:
    """The grid in docs/training.md: held-out images' canny maps with the empty prompt, then each demo sketch
    through `invert` with the empty prompt and with its name; columns: the map the ControlNet saw, then seeds."""
    dataset = load_dataset(Path(data_dir))
    held_out = dataset.subset(holdout_mask(dataset, holdout_fraction))
    rows = [
        (Image.fromarray(held_out.images[i].permute(1, 2, 0).numpy()), "canny", "")
        for i in range(min(held_out_rows, len(held_out)))
    ]
    for name, sketch in demo_sketches():
        rows += [(sketch, "invert", ""), (sketch, "invert", name)]
    return control_grid(load_pipeline(model_dir), controlnet, rows, **kwargs)


def demo_sketches(size: int = 512) -> list[tuple[str, Image.Image]]:
    """Rough black-on-white drawings, as a person would make on the sketch pad: (name, image)."""
    cv2 = opencv()
    pen = max(2, size // 64)
    drawings = []

    def canvas():
        return np.full((size, size), 255, np.uint8)

    def scaled(points):
        return (np.array(points, np.float64) * size).round().astype(np.int32)

    apple = canvas()
    cv2.circle(apple, (size // 2, int(size * 0.58)), int(size * 0.3), 0, pen, cv2.LINE_AA)
    cv2.polylines(apple, [scaled([(0.5, 0.3), (0.53, 0.15)])], False, 0, pen, cv2.LINE_AA)
    cv2.ellipse(apple, (int(size * 0.62), int(size * 0.18)), (size // 10, size // 22), -20, 0, 360, 0, pen)
    drawings.append(("apple", apple))

    heart = canvas()
    t = np.linspace(0, 2 * np.pi, 80)
    x, y = 16 * np.sin(t) ** 3, 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    cv2.polylines(heart, [scaled(np.stack([0.5 + x / 40, 0.47 - y / 40], 1))], True, 0, pen, cv2.LINE_AA)
    drawings.append(("heart", heart))

    star = canvas()
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 0.42, 0.17)
    cv2.polylines(
        star, [scaled(np.stack([0.5 + radii * np.cos(angles), 0.53 + radii * np.sin(angles)], 1))], True, 0, pen
    )
    drawings.append(("star", star))

    face = canvas()
    cv2.circle(face, (size // 2, size // 2), int(size * 0.4), 0, pen, cv2.LINE_AA)
    for eye_x in (0.36, 0.64):
        cv2.circle(face, (int(size * eye_x), int(size * 0.4)), size // 24, 0, -1, cv2.LINE_AA)
    cv2.ellipse(face, (size // 2, int(size * 0.55)), (int(size * 0.2), int(size * 0.14)), 0, 10, 170, 0, pen)
    drawings.append(("smiling face", face))

    cat = canvas()
    cv2.circle(cat, (size // 2, int(size * 0.58)), int(size * 0.32), 0, pen, cv2.LINE_AA)
    for ear in ([(0.25, 0.4), (0.22, 0.1), (0.42, 0.28)], [(0.75, 0.4), (0.78, 0.1), (0.58, 0.28)]):
        cv2.polylines(cat, [scaled(ear)], False, 0, pen, cv2.LINE_AA)
    for eye_x in (0.4, 0.6):
        cv2.circle(cat, (int(size * eye_x), int(size * 0.55)), size // 28, 0, -1, cv2.LINE_AA)
    drawings.append(("cat face", cat))
    return [(name, Image.fromarray(image).convert("RGB")) for name, image in drawings]
