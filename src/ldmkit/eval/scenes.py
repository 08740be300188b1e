"""Composition metrics that need no human: prompts as people type them, spatial, colour, counting, seed diversity.

Each prompt set is fixed here; a metric reads the generated pixels with simple rules or with the project's
CLIP (trained on the emoji set, so it is a fair judge of "is this an X" on a plain background):
* typed: user phrasings ("a cup of coffee") -> is one of the accepted names in CLIP's top 5 of all names?
  typed_unseen: the same phrasings in frames no training caption uses ("a frog sticker"), the held-out check
  now that `ldm train phrasing` and the scene stage train on captions such as "a cat".
* spatial: "X on the left and Y on the right" -> CLIP on a square crop of each half finds its own object.
* colour: "a blue banana" -> the hue of the object's saturated pixels is within 40 degrees of the colour's.
* count: "three bananas" -> connected foreground blobs (background estimated from the border) equal the number.
* diversity: mean pairwise CLIP distance between 8 seeds of a prompt, relative to the same measure over the
  data's images of that name (its four styles).
"""

from __future__ import annotations

import numpy as np
import torch

from ldmkit.data.words import COLOUR_HUES, hue_distance

# (prompt, accepted names): names as the data set spells them
TYPED = (
    ("a cat", ("cat", "cat face")),
    ("the rocket", ("rocket",)),
    ("a cute dog", ("dog", "dog face")),
    ("cats", ("cat", "cat face")),
    ("green dragon", ("dragon", "dragon face")),
    ("a cup of coffee", ("hot beverage",)),
    ("a car", ("automobile", "racing car", "sport utility vehicle")),
    ("a castle", ("castle", "japanese castle")),
    ("a volcano", ("volcano",)),
    ("an otter", ("otter",)),
    ("a robot", ("robot", "robot face")),
    ("a frog", ("frog", "frog face")),
    ("a house", ("house", "house with garden")),
    ("the sun", ("sun", "sun with face", "sun behind cloud")),
    ("a dinosaur", ("sauropod", "t rex")),
    ("some cheese", ("cheese wedge",)),
    ("an ice cream", ("ice cream", "soft ice cream")),
    ("a birthday cake", ("birthday cake",)),
    ("a guitar", ("guitar",)),
    ("a bicycle", ("bicycle",)),
    ("an airplane", ("airplane", "small airplane")),
    ("a ghost emoji", ("ghost",)),
    ("a penguin icon", ("penguin",)),
    ("a unicorn", ("unicorn", "unicorn face")),
    ("an owl", ("owl",)),
    ("a turtle", ("turtle",)),
    ("a teddy bear", ("teddy bear",)),
    ("a balloon", ("balloon",)),
    ("an umbrella", ("umbrella", "umbrella with rain drops")),
    ("a snowman", ("snowman", "snowman without snow")),
    ("a mushroom", ("mushroom",)),
    ("a cactus", ("cactus",)),
    ("a fox", ("fox", "fox face")),
    ("a panda", ("panda", "panda face")),
    ("a slice of pizza", ("pizza",)),
    ("a yellow banana", ("banana",)),
    ("a puppy", ("dog", "dog face")),
    ("a kitten", ("cat", "cat face")),
    ("a cute penguin", ("penguin",)),
    ("the moon", ("full moon", "crescent moon", "first quarter moon", "new moon", "full moon face")),
)
# Frames that the caption generators (data.scenes FRAMES and STYLE_TEMPLATES) never write; tests/test_train.py
# checks that the phrasing stage's captions keep clear of their words.
UNSEEN_FRAMES = ("an image of {x}", "{x} sticker", "{x} clipart", "draw {x}", "my {x}")
UNSEEN_WORDS = ("image", "sticker", "clipart", "draw", "my")
SPATIAL = (
    ("cat face", "rocket"),
    ("banana", "red apple"),
    ("dog face", "pizza"),
    ("ghost", "otter"),
    ("frog", "rocket"),
    ("penguin", "banana"),
    ("red apple", "cat face"),
    ("rocket", "ghost"),
    ("pizza", "frog"),
    ("otter", "penguin"),
    ("unicorn", "banana"),
    ("robot", "red apple"),
)
COLOUR = (
    ("blue", "banana"),
    ("green", "strawberry"),
    ("purple", "carrot"),
    ("pink", "frog"),
    ("red", "frog"),
    ("blue", "lemon"),
    ("green", "tangerine"),
    ("yellow", "strawberry"),
    ("blue", "crab"),
    ("purple", "banana"),
    ("blue-green", "red apple"),
    ("orange", "frog"),
)
COUNT = (
    (2, "banana", "bananas"),
    (3, "banana", "bananas"),
    (4, "banana", "bananas"),
    (2, "rocket", "rockets"),
    (3, "rocket", "rockets"),
    (4, "rocket", "rockets"),
    (2, "red apple", "red apples"),
    (3, "red apple", "red apples"),
    (5, "red apple", "red apples"),
    (3, "balloon", "balloons"),
    (2, "cat face", "cat faces"),
    (4, "star", "stars"),
)
NUMBER = {2: "two", 3: "three", 4: "four", 5: "five"}
DIVERSITY = ("cat", "rocket", "otter, 3d render", "red apple", "a dog", "pizza")
DIVERSITY_NAMES = ("cat", "rocket", "otter", "red apple", "dog", "pizza")
DIVERSITY_SEEDS = 8


def _article(name: str) -> str:
    return "an" if name[0] in "aeiou" else "a"


def prompt_sets() -> dict[str, list[str]]:
    """Every composition prompt, per set, in a fixed order (images are generated in this order, seed 0)."""
    return {
        "typed": [p for p, _ in TYPED],
        "typed_unseen": [UNSEEN_FRAMES[i % len(UNSEEN_FRAMES)].format(x=p) for i, (p, _) in enumerate(TYPED)],
        "spatial": [f"{_article(a)} {a} on the left and {_article(b)} {b} on the right" for a, b in SPATIAL],
        "colour": [f"{_article(c)} {c} {n}" for c, n in COLOUR],
        "count": [f"{NUMBER[n]} {plural}" for n, _, plural in COUNT],
        "diversity": [p for p in DIVERSITY for _ in range(DIVERSITY_SEEDS)],
    }


def seeds_for(set_name: str, count: int) -> list[int]:
    return [i % DIVERSITY_SEEDS for i in range(count)] if set_name == "diversity" else [0] * count


def border_colour(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3) float: the median colour of each image's outermost pixels, taken as its background."""
    x = images.float()
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)  # (N, 3, 2H+2W)
    return border.median(dim=2).values


def foreground(images: torch.Tensor, threshold: float = 40.0) -> np.ndarray:
    """(N, 3, H, W) uint8 -> (N, H, W) bool: pixels far from the border's median colour."""
    background = border_colour(images)[:, :, None, None]
    return ((images.float() - background).abs().sum(1) > threshold).numpy()


def count_objects(mask: np.ndarray, min_fraction: float = 0.006) -> int:
    from scipy import ndimage

    closed = ndimage.binary_closing(mask, iterations=2)
    labels, n = ndimage.label(closed)
    if n == 0:
        return 0
    sizes = ndimage.sum(closed, labels, range(1, n + 1))
    return int((sizes >= min_fraction * mask.size).sum())


def object_hue(image: torch.Tensor, mask: np.ndarray) -> float | None:
    """Circular mean hue (degrees) of the saturated foreground pixels of one (3, H, W) uint8 image."""
    rgb = image.float().permute(1, 2, 0).numpy() / 255.0
    high, low = rgb.max(-1), rgb.min(-1)
    chosen = mask & ((high - low) / np.maximum(high, 1e-6) > 0.3) & (high > 0.2)
    if chosen.sum() < 20:
        return None
    r, g, b = (rgb[..., k][chosen] for k in range(3))
    angle = np.arctan2(np.sqrt(3.0) * (g - b), 2.0 * r - g - b)
    return float(np.degrees(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean())) % 360.0)


def white_background(images: torch.Tensor, level: int = 225) -> np.ndarray:
    """(N, 3, H, W) uint8 -> (N,) bool: the median of the image's border is at least `level` in every channel."""
    return (border_colour(images).min(dim=1).values >= level).numpy()


def object_crops(images: torch.Tensor, margin: float = 0.08) -> torch.Tensor:
    """Each (3, H, W) uint8 image cut to the square around its foreground's box (plus `margin` of its side), resized
    back to (H, W): an object drawn at half the canvas reaches the eval CLIP, trained on emoji that fill the frame,
    at the scale it knows. An image that is all foreground, or has none, is kept whole."""
    import torch.nn.functional as F
    from scipy import ndimage

    _, _, h, w = images.shape
    crops = []
    for image, mask in zip(images, foreground(images)):
        mask = ndimage.binary_opening(mask, iterations=2)  # stray specks would stretch the box to the frame
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if len(rows) == 0:
            crops.append(image)
            continue
        side = max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]) * (1 + 2 * margin)
        side = int(min(max(side, 8), h, w))
        top = int(np.clip((rows[0] + rows[-1] + 1 - side) / 2, 0, h - side))
        left = int(np.clip((cols[0] + cols[-1] + 1 - side) / 2, 0, w - side))
        crop = image[None, :, top : top + side, left : left + side].float()
        crops.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0].round().byte())
    return torch.stack(crops)


def centre_square(images: torch.Tensor, half: str) -> torch.Tensor:
    """The square crop centred vertically in the left or right half of each image."""
    _, _, h, w = images.shape
    side = min(w // 2, h)
    top = (h - side) // 2
    left = (w // 2 - side) // 2 + (w // 2 if half == "right" else 0)
    return images[:, :, top : top + side, left : left + side]


def score(
    images: dict[str, torch.Tensor], clip, names: list[str], data_images: dict[str, torch.Tensor], device
) -> dict:
    """All composition metrics for the images of `prompt_sets()` (uint8, generated in its order)."""
    from ldmkit.eval import metrics

    name_index = {n: i for i, n in enumerate(names)}
    name_feats = metrics.text_features(clip, names, device)

    def rank_of(feats: torch.Tensor, accepted: list[tuple[str, ...]]) -> torch.Tensor:
        similarity = feats @ name_feats.T
        best = torch.stack(
            [similarity[i, [name_index[a] for a in acc if a in name_index]].max() for i, acc in enumerate(accepted)]
        )
        return (similarity > best[:, None]).sum(1)

    out: dict = {}
    typed_ranks = rank_of(metrics.image_features(clip, images["typed"], device), [acc for _, acc in TYPED])
    out["typed_top1"] = float((typed_ranks < 1).float().mean())
    out["typed_top5"] = float((typed_ranks < 5).float().mean())
    crop_ranks = rank_of(metrics.image_features(clip, object_crops(images["typed"]), device), [a for _, a in TYPED])
    out["typed_object_crop_top1"] = float((crop_ranks < 1).float().mean())
    out["typed_object_crop_top5"] = float((crop_ranks < 5).float().mean())
    if "typed_unseen" in images:  # image sets saved before it was added lack it
        unseen_ranks = rank_of(metrics.image_features(clip, images["typed_unseen"], device), [a for _, a in TYPED])
        out["typed_unseen_top1"] = float((unseen_ranks < 1).float().mean())
        out["typed_unseen_top5"] = float((unseen_ranks < 5).float().mean())

    hits_left, hits_right = [], []
    for half, hits, column in (("left", hits_left, 0), ("right", hits_right, 1)):
        crops = centre_square(images["spatial"], half)
        ranks = rank_of(metrics.image_features(clip, crops, device), [(pair[column],) for pair in SPATIAL])
        hits.extend((ranks < 5).tolist())
    out["spatial_both_top5"] = float(np.mean([a and b for a, b in zip(hits_left, hits_right)]))
    out["spatial_each_top5"] = float(np.mean(hits_left + hits_right))

    masks = foreground(images["colour"])
    hue_hits = []
    for i, (colour, _) in enumerate(COLOUR):
        hue = object_hue(images["colour"][i], masks[i])
        hue_hits.append(hue is not None and hue_distance(hue, COLOUR_HUES[colour]) <= 40)
    colour_ranks = rank_of(metrics.image_features(clip, images["colour"], device), [(n,) for _, n in COLOUR])
    out["colour_hue"] = float(np.mean(hue_hits))
    out["colour_identity_top5"] = float((colour_ranks < 5).float().mean())
    out["colour_both"] = float(np.mean([h and bool(r < 5) for h, r in zip(hue_hits, colour_ranks)]))

    masks = foreground(images["count"])
    counts = [count_objects(m) for m in masks]
    out["count_exact"] = float(np.mean([c == n for c, (n, _, _) in zip(counts, COUNT)]))
    out["count_within_one"] = float(np.mean([abs(c - n) <= 1 for c, (n, _, _) in zip(counts, COUNT)]))
    out["counts"] = counts

    feats = metrics.image_features(clip, images["diversity"], device).view(len(DIVERSITY), DIVERSITY_SEEDS, -1)
    ratios = {}
    for i, (prompt, name) in enumerate(zip(DIVERSITY, DIVERSITY_NAMES)):
        generated = _mean_pairwise_distance(feats[i])
        real = data_images.get(name)
        data = _mean_pairwise_distance(metrics.image_features(clip, real, device)) if real is not None else None
        ratios[prompt] = {"generated": generated, "data": data, "ratio": generated / data if data else None}
    out["diversity"] = ratios
    valid = [r["ratio"] for r in ratios.values() if r["ratio"] is not None]
    out["diversity_ratio_mean"] = float(np.mean(valid)) if valid else None
    return out


def _mean_pairwise_distance(feats: torch.Tensor) -> float:
    n = feats.shape[0]
    if n < 2:
        return 0.0
    similarity = feats @ feats.T
    return float((1 - similarity).sum() / (n * (n - 1)))
