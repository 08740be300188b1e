"""Draw `ldmkit.data.scenes.Scene`s on the GPU: procedural backgrounds, sprites pasted with alpha, recolour, grade.

Pasting is one `grid_sample` per object slot over the whole batch, from a bank of premultiplied sprites kept on
the device with two blurred copies (so small objects are not aliased); thousands of scenes a second cost little
next to the VAE and UNet, and nothing is stored on disk.
"""

from __future__ import annotations

import math
import os
import random
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ldmkit.data.scenes import BACKGROUND_IDS, GRADE_IDS, MAX_OBJECTS, Scene, SceneSampler


class SceneBatch:
    """Scenes as tensors: (B, K) slots, K = MAX_OBJECTS; `rows[k]` lists the scenes whose slot k holds an object."""

    def __init__(self, scenes: list[Scene], device):
        b, k = len(scenes), MAX_OBJECTS
        rows = [[0.0] * 6 * k for _ in range(b)]
        valid = [[False] * k for _ in range(b)]  # slot j of scene i holds an object
        for i, scene in enumerate(scenes):
            for j, o in enumerate(scene.objects[:k]):
                rows[i][j::k] = [float(o.sprite), o.cx, o.cy, o.size, o.hue, float(o.flip)]
                valid[i][j] = True
        fields = torch.tensor(rows, device=device).view(b, 6, k).permute(1, 0, 2)
        self.sprite = fields[0].long()
        self.cx, self.cy, self.size, self.hue, self.flip = fields[1], fields[2], fields[3], fields[4], fields[5] > 0
        # Which scenes fill each slot, and which have each background, as index lists made here from Python lists: the
        # compositor then never asks the GPU (an `.any()` or `.nonzero()` on a device tensor makes the CPU wait for
        # all queued work; that was twice per slot and once per background, every step)
        self.rows = [
            torch.tensor([i for i in range(b) if valid[i][j]], dtype=torch.long, device=device) for j in range(k)
        ]
        self.background_rows = {
            name: torch.tensor(
                [i for i, s in enumerate(scenes) if s.background == name], dtype=torch.long, device=device
            )
            for name in BACKGROUND_IDS
        }
        self.background = torch.tensor([BACKGROUND_IDS[s.background] for s in scenes], device=device)
        self.grade = torch.tensor([GRADE_IDS[s.grade] for s in scenes], device=device)


class Drawn(NamedTuple):
    """One batch of a SceneStream. canonical_tokens: close-up batches' captions as the 128 px model's data words them
    (Scene.canonical; dropped captions stay dropped), for a teacher; None for other batches."""

    height: int
    width: int
    batch: SceneBatch
    tokens: torch.Tensor | None
    canonical_tokens: torch.Tensor | None = None


class CloseUp(NamedTuple):
    """A share of batches of single emoji on a small square canvas (`sampler` draws only classic scenes)."""

    share: float
    side: int
    sampler: SceneSampler


class SceneStream(torch.utils.data.IterableDataset):
    """Endless `Drawn` batches (tokens None without captions); each worker process draws its own seeded stream.

    sizes: ((height, width, share), ...); batch_size is for the first size and shrinks with the canvas area, so
    every step costs about the same. close_up: that share of batches is drawn by its sampler on its canvas instead.
    """

    def __init__(
        self,
        sampler: SceneSampler,
        sizes,
        batch_size: int,
        seed: int,
        caption_dropout: float | None,
        close_up: CloseUp | None = None,
    ):
        self.sampler, self.sizes, self.batch_size, self.seed = sampler, sizes, batch_size, seed
        self.caption_dropout = caption_dropout  # None: no captions (the VAE needs only pixels)
        self.close_up = close_up if close_up and close_up.share > 0 else None  # none: no draw, old streams unchanged

    def __iter__(self):
        from ldmkit.loading import load_tokenizer
        from ldmkit.train.common import tokenize

        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1000 + (info.id if info else 0))
        tokenizer = load_tokenizer()
        shapes, weights = [(h, w) for h, w, _ in self.sizes], [p for _, _, p in self.sizes]
        while True:
            sampler = self.sampler
            if self.close_up and rng.random() < self.close_up.share:
                height = width = self.close_up.side
                sampler = self.close_up.sampler
            else:
                height, width = rng.choices(shapes, weights)[0]
            batch = max(1, round(self.batch_size * shapes[0][0] * shapes[0][1] / (height * width)))
            unit = min(height, width)
            drawn = [sampler.sample(rng, width / unit, height / unit) for _ in range(batch)]
            tokens = canonical = None
            if self.caption_dropout is not None:
                kept = [rng.random() >= self.caption_dropout for _ in drawn]
                tokens = tokenize(tokenizer, [s.caption if keep else "" for s, keep in zip(drawn, kept)])
                if sampler is not self.sampler:  # a close-up batch
                    canonical = tokenize(tokenizer, [s.canonical if keep else "" for s, keep in zip(drawn, kept)])
            yield Drawn(height, width, SceneBatch(drawn, "cpu"), tokens, canonical)


def scene_batches(
    sampler, sizes, batch_size: int, workers: int, seed: int, caption_dropout: float | None, close_up=None
):
    """An iterator over SceneStream batches, drawn by `workers` CPU processes (0: in this process)."""
    stream = SceneStream(sampler, sizes, batch_size, seed, caption_dropout, close_up)
    if workers == 0:
        return iter(stream)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4))


def to_device(batch: SceneBatch, device) -> SceneBatch:
    for name in ("sprite", "cx", "cy", "size", "hue", "flip", "background", "grade"):
        setattr(batch, name, getattr(batch, name).to(device, non_blocking=True))
    batch.rows = [rows.to(device, non_blocking=True) for rows in batch.rows]
    batch.background_rows = {name: rows.to(device, non_blocking=True) for name, rows in batch.background_rows.items()}
    return batch


class Compositor:
    def __init__(self, sprites_uint8: torch.Tensor, device):
        """sprites: (N, S, S, 4) uint8 RGBA (straight alpha; array or tensor), as `ldm data emoji` writes them."""
        levels = []
        for start in range(0, sprites_uint8.shape[0], 1024):
            chunk = torch.as_tensor(sprites_uint8[start : start + 1024])
            rgba = chunk.to(device).permute(0, 3, 1, 2).float() / 255.0
            rgba = torch.cat([rgba[:, :3] * rgba[:, 3:], rgba[:, 3:]], 1)  # premultiplied: edges blend right
            size = rgba.shape[-1]
            blurred = [rgba] + [
                F.interpolate(F.avg_pool2d(rgba, f), size=size, mode="bilinear", align_corners=False) for f in (2, 4)
            ]
            levels.append(torch.stack([(x * 255).round().to(torch.uint8) for x in blurred]))
        self.bank = torch.cat(levels, dim=1)  # (3, N, 4, S, S) uint8 premultiplied
        self.sprite_size = self.bank.shape[-1]

    def __call__(
        self, batch: SceneBatch, height: int, width: int, generator: torch.Generator, coverage: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, height, width) float in [-1, 1]; with `coverage`, also (B, 1, height, width): how much of each
        pixel the objects cover (0: background only, 1: opaque object)."""
        device = self.bank.device
        unit = min(height, width)  # pixels per layout unit
        canvas = paint_backgrounds(batch.background, height, width, generator, batch.background_rows)
        covered = canvas.new_zeros(canvas.shape[0], 1, height, width) if coverage else None
        for k, rows in enumerate(batch.rows):
            if len(rows) == 0:  # a shape, not a value: no wait for the GPU
                continue
            size = batch.size[rows, k]
            pixels = size * unit
            level = (pixels < 0.75 * self.sprite_size).long() + (pixels < 0.375 * self.sprite_size).long()
            src = self.bank[level, batch.sprite[rows, k]].float() / 255.0  # (n, 4, S, S)
            src = torch.cat(
                [hue_rotate(src[:, :3], batch.hue[rows, k]).clamp(min=0).minimum(src[:, 3:]), src[:, 3:]], 1
            )
            scale_x, scale_y = width / pixels, height / pixels
            theta = torch.zeros(len(rows), 2, 3, device=device)
            flip = torch.where(batch.flip[rows, k], -1.0, 1.0)
            theta[:, 0, 0] = scale_x * flip
            theta[:, 0, 2] = (width - 2 * batch.cx[rows, k] * unit) / pixels * flip
            theta[:, 1, 1] = scale_y
            theta[:, 1, 2] = (height - 2 * batch.cy[rows, k] * unit) / pixels
            grid = F.affine_grid(theta, [len(rows), 4, height, width], align_corners=False)
            layer = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            canvas[rows] = canvas[rows] * (1 - layer[:, 3:]) + layer[:, :3]
            if covered is not None:
                covered[rows] = covered[rows] * (1 - layer[:, 3:]) + layer[:, 3:]
        canvas = apply_grades(canvas, batch.grade).clamp(0, 1) * 2 - 1
        return (canvas, covered.clamp(0, 1)) if covered is not None else canvas


def hue_rotate(rgb: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate colours about the grey axis (red -> green at +120 degrees); linear, so premultiplied RGB is fine."""
    theta = torch.deg2rad(degrees).view(-1, 1, 1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    third, root = 1.0 / 3.0, math.sqrt(1.0 / 3.0)
    # Rodrigues' formula for the unit axis (1, 1, 1) / sqrt(3)
    a = cos + (1 - cos) * third
    b = (1 - cos) * third - root * sin
    c = (1 - cos) * third + root * sin
    matrix = torch.cat([torch.cat([a, b, c], 2), torch.cat([c, a, b], 2), torch.cat([b, c, a], 2)], 1)  # (n, 3, 3)
    return torch.einsum("nij,njhw->nihw", matrix, rgb)


def apply_grades(images: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
    grey = images.mean(1, keepdim=True)
    earth = (0.35 * images + 0.65 * grey) * torch.tensor([1.05, 0.92, 0.72], device=images.device).view(1, 3, 1, 1)
    pastel = 0.55 * (0.6 * images + 0.4 * grey) + 0.45
    g = grades.view(-1, 1, 1, 1)
    return torch.where(g == GRADE_IDS["earth"], earth + 0.06, torch.where(g == GRADE_IDS["pastel"], pastel, images))


# --- backgrounds ----------------------------------------------------------------------------------------------


def paint_backgrounds(
    kinds: torch.Tensor, height: int, width: int, generator: torch.Generator, rows_by_name: dict | None = None
) -> torch.Tensor:
    """(B,) background ids -> (B, 3, H, W) in [0, 1]; `rows_by_name` (SceneBatch.background_rows) saves finding
    each background's rows on the device."""
    device = kinds.device
    canvas = torch.ones(len(kinds), 3, height, width, device=device)
    for name, kind in BACKGROUND_IDS.items():
        rows = rows_by_name[name] if rows_by_name is not None else (kinds == kind).nonzero().squeeze(1)
        if name != "white" and len(rows):
            canvas[rows] = PAINTERS[name](Field(len(rows), height, width, device, generator))
    return canvas


class Field:
    """Coordinates in layout units (shorter side 1) and random draws for n backgrounds of one kind."""

    def __init__(self, n: int, height: int, width: int, device, generator):
        unit = min(height, width)
        self.n, self.device, self.generator = n, device, generator
        self.h, self.w = height / unit, width / unit
        self.y = ((torch.arange(height, device=device) + 0.5) / unit).view(1, 1, height, 1)
        self.x = ((torch.arange(width, device=device) + 0.5) / unit).view(1, 1, 1, width)
        self.shape = (height, width)

    def uniform(self, lo: float, hi: float, channels: int = 1) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(self.n, channels, 1, 1, device=self.device, generator=self.generator)

    def colour(self, rgb, jitter: float = 0.06) -> torch.Tensor:
        base = torch.tensor(rgb, device=self.device).view(1, 3, 1, 1)
        return (base + self.uniform(-jitter, jitter, 3)).clamp(0, 1)

    def noise(self, cells: int) -> torch.Tensor:
        """Smooth noise in [0, 1] with about `cells` features across the shorter side."""
        per_cell = min(self.shape) / cells
        grid = [math.ceil(side / per_cell) + 3 for side in self.shape]
        rough = torch.rand(self.n, 1, *grid, device=self.device, generator=self.generator)
        big = F.interpolate(rough, size=[math.ceil(g * per_cell) for g in grid], mode="bicubic", align_corners=False)
        return big[:, :, : self.shape[0], : self.shape[1]].clamp(0, 1)

    def mix(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return a + (b - a) * t

    def below(self, horizon: torch.Tensor, softness: float = 0.01) -> torch.Tensor:
        return torch.sigmoid((self.y - horizon) / softness)


def _sky(f: Field, sun: bool = True) -> torch.Tensor:
    sky = f.mix(f.colour((0.25, 0.5, 0.92)), f.colour((0.65, 0.83, 1.0)), (f.y / f.h).clamp(0, 1))
    clouds = ((f.noise(4) - 0.55) * 6).clamp(0, 1) * f.uniform(0, 0.9)
    sky = f.mix(sky, torch.ones_like(sky), clouds * (f.y < 0.6 * f.h))
    if sun:
        sx, sy, r = f.uniform(0.1, f.w - 0.1), f.uniform(0.07, 0.3), f.uniform(0.06, 0.11)
        d = ((f.x - sx) ** 2 + (f.y - sy) ** 2).sqrt()
        glow = torch.exp(-((d / (2.5 * r)) ** 2)) * 0.5
        sky = f.mix(sky, f.colour((1.0, 0.95, 0.6), 0.02), glow)
        sky = f.mix(sky, f.colour((1.0, 0.85, 0.25), 0.04), torch.sigmoid((r - d) / 0.005))
    return sky


def _night(f: Field) -> torch.Tensor:
    sky = f.mix(f.colour((0.02, 0.03, 0.12), 0.02), f.colour((0.12, 0.12, 0.32), 0.04), (f.y / f.h).clamp(0, 1))
    stars = (torch.rand(f.n, 1, *f.shape, device=f.device, generator=f.generator) > 0.996).float()
    return sky + stars * 0.9


def _ground(f: Field, horizon, sky, ground) -> torch.Tensor:
    return f.mix(sky, ground, f.below(horizon))


def _pool(f: Field) -> torch.Tensor:
    water = f.colour((0.2, 0.72, 0.88), 0.05)
    n1, n2 = f.noise(3), f.noise(3)
    freq = f.uniform(14, 22)
    v = torch.sin(freq * f.x + 5 * n1) * torch.sin(freq * f.y + 5 * n2)
    caustic = (1 - v.abs() * 4).clamp(0, 1) ** 2 * 0.45
    image = water * (0.85 + 0.3 * f.noise(2)) + caustic
    edge = f.uniform(-0.1, 0.12)  # a tiled pool edge at the top in some
    tiles = (((f.x * 12).frac() < 0.06) | ((f.y * 12).frac() < 0.06)).float() * 0.15
    return f.mix(image, 0.95 - tiles + torch.zeros_like(image), (f.y < edge).float())


def _sea(f: Field) -> torch.Tensor:
    horizon = f.uniform(0.2, 0.45)
    waves = torch.sin(40 * f.y + 3 * f.noise(3) * 6) * 0.5 + 0.5
    sea = f.mix(f.colour((0.05, 0.35, 0.65)), f.colour((0.15, 0.5, 0.8)), waves * 0.6)
    return _ground(f, horizon, _sky(f), sea)


def _beach(f: Field) -> torch.Tensor:
    h1 = f.uniform(0.15, 0.3)
    h2 = h1 + f.uniform(0.1, 0.2) + 0.03 * torch.sin(8 * f.x + f.uniform(0, 6))
    sea = f.colour((0.1, 0.5, 0.78))
    sand = f.colour((0.93, 0.83, 0.6)) * (0.9 + 0.15 * f.noise(12))
    return _ground(f, h2, _ground(f, h1, _sky(f), sea), sand)


def _grass(f: Field) -> torch.Tensor:
    horizon = f.uniform(0.15, 0.45)
    grass = f.mix(f.colour((0.45, 0.75, 0.3)), f.colour((0.2, 0.55, 0.15)), ((f.y - horizon) / f.h).clamp(0, 1))
    grass = grass * (0.85 + 0.25 * f.noise(16))
    return _ground(f, horizon, _sky(f), grass)


def _snow(f: Field) -> torch.Tensor:
    horizon = f.uniform(0.2, 0.45) + 0.04 * torch.sin(5 * f.x + f.uniform(0, 6))
    sky = f.mix(f.colour((0.6, 0.75, 0.92)), f.colour((0.85, 0.9, 0.97)), (f.y / f.h).clamp(0, 1))
    snow = f.colour((0.95, 0.97, 1.0), 0.02) - 0.12 * f.noise(6) * torch.tensor([1.0, 0.7, 0.2], device=f.device).view(
        1, 3, 1, 1
    )
    return _ground(f, horizon, sky, snow)


def _desert(f: Field) -> torch.Tensor:
    horizon = f.uniform(0.25, 0.5) + 0.05 * torch.sin(f.uniform(2, 5) * f.x + f.uniform(0, 6))
    shade = torch.sin(f.uniform(4, 9) * (f.x + 0.6 * f.y) + 3 * f.noise(2)) * 0.5 + 0.5
    sand = f.mix(f.colour((0.95, 0.75, 0.45)), f.colour((0.8, 0.55, 0.3)), shade * 0.7)
    return _ground(f, horizon, _sky(f), sand)


def _planet(f: Field) -> torch.Tensor:
    palettes = torch.tensor(
        [[0.55, 0.3, 0.6], [0.35, 0.55, 0.5], [0.7, 0.4, 0.25], [0.45, 0.4, 0.65], [0.6, 0.55, 0.35]],
        device=f.device,
    )
    choice = torch.randint(0, len(palettes), (f.n,), device=f.device, generator=f.generator)
    ground = palettes[choice].view(-1, 3, 1, 1) * (0.8 + 0.35 * f.noise(5))
    craters = ((f.noise(10) - 0.7) * 8).clamp(0, 1)
    ground = ground * (1 - 0.35 * craters)
    sky = _night(f) * 0.6 + f.colour((0.15, 0.05, 0.25), 0.08) * 0.6
    px, py, r = f.uniform(0.15, f.w - 0.15), f.uniform(0.1, 0.25), f.uniform(0.08, 0.18)
    disc = torch.sigmoid((r - ((f.x - px) ** 2 + (f.y - py) ** 2).sqrt()) / 0.006)
    sky = f.mix(sky, f.colour((0.8, 0.6, 0.5), 0.2), disc)
    horizon = f.uniform(0.3, 0.5) + 0.04 * torch.sin(f.uniform(3, 7) * f.x + f.uniform(0, 6))
    return _ground(f, horizon, sky, ground)


def _room(f: Field) -> torch.Tensor:
    wall = f.colour((0.85, 0.8, 0.7), 0.12) * (0.95 + 0.08 * f.noise(3))
    floor = f.colour((0.55, 0.36, 0.2), 0.06) * (0.85 + 0.2 * (torch.sin(f.x * 30 + 2 * f.noise(2)) * 0.5 + 0.5))
    horizon = f.uniform(0.6, 0.8) * f.h
    skirting = ((f.y > horizon - 0.03) & (f.y < horizon)).float()
    image = _ground(f, horizon, wall, floor)
    return f.mix(image, torch.full_like(image, 0.95), skirting)


PAINTERS = {
    "sky": _sky,
    "night": _night,
    "pool": _pool,
    "sea": _sea,
    "beach": _beach,
    "grass": _grass,
    "snow": _snow,
    "desert": _desert,
    "planet": _planet,
    "room": _room,
}
