"""Each image's start noise from its seed, with AUTOMATIC1111's variation seed and seed resize.

A1111's recipe (modules/rng.py, read for its behaviour): the seed's noise is drawn at the "resize from" size's latent
shape (or the image's), spherically interpolated towards the variation seed's noise of that shape by the variation
strength, then placed centred into the seed's noise at the image's latent shape (cropped where the "from" shape is
larger; where it is smaller the border keeps the fresh noise). With neither option the noise is the seed's plain
draw, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PARALLEL_COSINE = 0.9995  # A1111's threshold: above this mean cosine the two noises are blended linearly


@dataclass(frozen=True)
class NoiseRecipe:
    """How one batch's start noise is drawn: its images' variation seeds and the size the noise is resized from."""

    subseeds: tuple[int, ...] = ()  # one per image of the batch; used while subseed_strength != 0
    subseed_strength: float = 0.0
    resize_from: tuple[int, int] | None = None  # (h, w) latent pixels of the "from" size; None: off

    @property
    def is_plain(self) -> bool:
        return self.subseed_strength == 0 and self.resize_from is None

    def draw(self, generators: list[torch.Generator], shape: tuple[int, int, int]) -> torch.Tensor:
        """(B, C, h, w) float32 noise on the CPU, image i from generators[i] (which advances past it)."""
        return torch.stack([self._image_noise(i, g, shape) for i, g in enumerate(generators)])

    def _image_noise(self, index: int, generator: torch.Generator, shape: tuple[int, int, int]) -> torch.Tensor:
        channels = shape[0]
        from_shape = shape if self.resize_from is None else (channels, *self.resize_from)
        resized = from_shape != shape
        start = generator.get_state()
        noise = torch.randn(from_shape, generator=generator, dtype=torch.float32)
        if self.subseed_strength != 0:
            variation = torch.Generator("cpu").manual_seed(self.subseeds[index])
            subnoise = torch.randn(from_shape, generator=variation, dtype=torch.float32)
            noise = slerp(self.subseed_strength, noise, subnoise)
        if not resized:
            return noise
        # The image's own noise is the seed's first draw at its shape too (A1111 seeds both from the seed), and the
        # generator goes on from there (later draws: ancestral noise, the hires pass) as without seed resize.
        generator.set_state(start)
        target = torch.randn(shape, generator=generator, dtype=torch.float32)
        return place_centred(noise, target)


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from `low` (t=0) to `high` (t=1) of (C, H, W) noise, as A1111 runs it: each vector
    along the height axis (one per channel and column) on its own great circle."""
    low_unit = low / low.norm(dim=1, keepdim=True)
    high_unit = high / high.norm(dim=1, keepdim=True)
    cosine = (low_unit * high_unit).sum(1)  # (C, W)
    if cosine.mean() > PARALLEL_COSINE:  # (nearly) the same noise: the angle is too small to divide by
        return torch.lerp(low, high, t)
    omega = torch.acos(cosine)
    sin_omega = torch.sin(omega)
    low_weight = (torch.sin((1.0 - t) * omega) / sin_omega).unsqueeze(1)
    high_weight = (torch.sin(t * omega) / sin_omega).unsqueeze(1)
    return low_weight * low + high_weight * high


def place_centred(noise: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`target` (C, H, W) with `noise` (C, h, w) over its centre: cropped where larger, a border of `target` left
    where smaller. Offsets round down as A1111's do, so an odd difference leaves the target's last row or column."""
    out = target.clone()
    (dst_y, src_y, rows), (dst_x, src_x, cols) = (
        _centred_span(target.shape[axis], noise.shape[axis]) for axis in (1, 2)
    )
    out[:, dst_y : dst_y + rows, dst_x : dst_x + cols] = noise[:, src_y : src_y + rows, src_x : src_x + cols]
    return out


def _centred_span(target_size: int, noise_size: int) -> tuple[int, int, int]:
    """(where it lands in the target, where it starts in the noise, length) along one axis."""
    offset = (target_size - noise_size) // 2
    if offset >= 0:
        return offset, 0, noise_size
    return 0, -offset, noise_size + 2 * offset


# Its Brownian tree is seeded with each image's seed (ldmkit.samplers), as A1111 seeds it: ENSD does not move it.
_SEEDED_BY_IMAGE = ("DPM++ SDE",)


def step_noise_generators(
    sampler, step_options: dict, generators: list[torch.Generator], seeds: list[int], ensd: int
) -> list[torch.Generator] | None:
    """The generators of a sampler's per-step noise; None for a sampler that draws none.

    They are the images' own generators, going on after the start noise; with A1111's eta noise seed delta
    (ENSD) they are fresh ones seeded seed + ENSD, as A1111 reseeds them once the start noise is drawn.
    """
    if not (sampler.stochastic or step_options):
        return None
    if ensd == 0 or sampler.algorithm.name in _SEEDED_BY_IMAGE:
        return generators
    return [torch.Generator("cpu").manual_seed(seed + ensd) for seed in seeds]


def uses_ensd(sampler, step_options: dict, eta: float | None, ensd: int) -> bool:
    """Whether ENSD changes this sampler's images (A1111 writes 'ENSD' in the infotext only then)."""
    draws = sampler.stochastic or bool(step_options)
    return ensd != 0 and draws and eta != 0 and sampler.algorithm.name not in _SEEDED_BY_IMAGE
