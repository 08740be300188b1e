"""VAE decode and encode of large images in tiles, without seams.

diffusers' tiled VAE runs the whole decoder on each overlapping tile of the latents. Every tile then
normalises with its own GroupNorm statistics and attends only within itself, so neighbouring tiles
come out in different brightness and contrast, and blending their overlap does not hide it
(docs/benchmarks.md: tiles plain to see on the shipped VAE). Here:
- the parts at latent resolution (the decoder's conv_in and mid block with its attention, the
  encoder's mid block and output) run on the whole image, which is small there;
- only the full-resolution part is tiled, each tile with a margin of context that is cut off again,
  so convolutions see what they would see in the whole image;
- all tiles normalise with the same GroupNorm statistics: a first pass over the tiles collects each
  layer's per-group mean and variance over the image, and the pass that makes the output uses them.
The output then differs from the untiled decode only by the statistics' small estimation error and
by what lies beyond a tile's margin; tile memory is what diffusers' tiling uses.
These are functions of the VAE; the Pipeline calls them when its ModelState has a tile size (diffusers' own
tiling switch and methods are left alone).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from fractions import Fraction

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

MIN_TILE_PX = 512  # SD's tile size; smaller VAEs get no smaller tiles (fewer tiles, fewer joins)
# Context kept around each tile: an eighth of the tile, and at least 32 px. With 16 px (128 px tiles)
# the joins showed as steps 1.4x sharper than the untiled image's there; with 32 px and more, 1.04x.
MIN_MARGIN_PX = 32


def default_tile_px(vae) -> int:
    """diffusers' tile size for this VAE (its sample size), but at least MIN_TILE_PX."""
    return max(vae.tile_sample_min_size, MIN_TILE_PX)


def scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def needs_tiles(x: torch.Tensor, tile: int) -> bool:
    """Whether an image or latents larger than one tile (in their own pixels): diffusers' rule."""
    return max(x.shape[-2:]) > tile


def decode(vae, z: torch.Tensor, tile_px: int) -> torch.Tensor:
    """vae.decode(z).sample, computed in tiles of `tile_px` image pixels."""
    decoder = vae.decoder
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    features = decoder.mid_block(decoder.conv_in(z), None)
    features = features.to(next(iter(decoder.up_blocks.parameters())).dtype)

    def upsample(x):
        for block in decoder.up_blocks:
            x = block(x, None)
        return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(x)))

    factor = scale_factor(vae)
    tile = tile_px // factor
    margin = max(tile // 8, MIN_MARGIN_PX // factor)
    return run_tiled(upsample, [decoder.up_blocks, decoder.conv_norm_out], features, tile, margin, Fraction(factor), 1)


def encode(vae, x: torch.Tensor, tile_px: int) -> DiagonalGaussianDistribution:
    """vae.encode(x).latent_dist, computed in tiles of `tile_px` image pixels."""
    encoder, factor = vae.encoder, scale_factor(vae)

    def downsample(pixels):
        pixels = encoder.conv_in(pixels)
        for block in encoder.down_blocks:
            pixels = block(pixels)
        return pixels

    margin = max(tile_px // 8 // factor, MIN_MARGIN_PX // factor) * factor  # whole latent pixels
    features = run_tiled(downsample, [encoder.down_blocks], x, tile_px, margin, Fraction(1, factor), factor)
    moments = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(encoder.mid_block(features))))
    return DiagonalGaussianDistribution(vae.quant_conv(moments) if vae.quant_conv is not None else moments)


def run_tiled(fn, modules, x: torch.Tensor, tile: int, margin: int, scale: Fraction, align: int) -> torch.Tensor:
    """fn(x) computed over windows of at most `tile` (in x's pixels), each the tile's own part plus
    `margin` of context on every side that is not the image's edge. The GroupNorm layers in `modules`
    (those fn runs) share statistics pooled over the whole image. `scale` is fn's output size over its
    input size; tiles start at multiples of `align`, so that fn's strided layers keep the image's grid."""
    rows, cols = _spans(x.shape[-2], tile - 2 * margin, align), _spans(x.shape[-1], tile - 2 * margin, align)
    if len(rows) == 1 and len(cols) == 1:
        return fn(x)
    norms = SharedGroupNorm(modules)
    for collect in (True, False):  # the first pass only collects statistics
        norms.start_pass()
        output = None
        for top, bottom in rows:
            for left, right in cols:
                up, down = max(top - margin, 0), min(bottom + margin, x.shape[-2])
                before, after = max(left - margin, 0), min(right + margin, x.shape[-1])
                # the tile's own part of its window, as fractions (top, bottom, left, right)
                own = [(top - up) / (down - up), (bottom - up) / (down - up)]
                own += [(left - before) / (after - before), (right - before) / (after - before)]
                with norms.tile(own, collect=collect):
                    out = fn(x[..., up:down, before:after])
                if collect:
                    continue
                if output is None:
                    size = [int(n * scale) for n in x.shape[-2:]]
                    output = out.new_empty(*x.shape[:-3], out.shape[-3], *size)
                rows_out = slice(int(top * scale), int(bottom * scale))
                cols_out = slice(int(left * scale), int(right * scale))
                kept = out[..., int((top - up) * scale) :, int((left - before) * scale) :]
                output[..., rows_out, cols_out] = kept[
                    ..., : rows_out.stop - rows_out.start, : cols_out.stop - cols_out.start
                ]
    return output


def _spans(length: int, core: int, align: int) -> list[tuple[int, int]]:
    """[start, end) parts of nearly equal size, at most `core` long, cutting at multiples of `align`."""
    count = math.ceil(length / max(core, align))
    cuts = [min(length, round(length * i / count / align) * align) for i in range(count + 1)]
    cuts[-1] = length
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


class SharedGroupNorm:
    """Makes the GroupNorm layers inside `modules` normalise with statistics shared by all tiles.

    A collecting pass adds each tile's own part (margins excluded) to image-wide sums per layer and
    normalises with the sums so far; the next pass normalises with the pooled mean and variance of the
    whole image. Statistics are per image and group, as GroupNorm's are, kept in float32 (float64 sums).
    """

    def __init__(self, modules):
        self.layers = [m for module in modules for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
        self.sums: dict[torch.nn.GroupNorm, list] = {}
        self.pooled: dict[torch.nn.GroupNorm, tuple[torch.Tensor, torch.Tensor]] = {}

    def start_pass(self):
        """After a collecting pass: pool what it collected; the next pass normalises with that."""
        if self.sums:
            self.pooled = {layer: _mean_var(*sums) for layer, sums in self.sums.items()}
            self.sums = {}

    @contextlib.contextmanager
    def tile(self, own: list[float], collect: bool):
        """While fn runs on one tile; a collecting pass counts the tile's `own` part of its window."""
        for layer in self.layers:
            layer.forward = functools.partial(self.forward, layer, own, collect)
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.forward  # back to the class's forward

    def forward(self, layer, own, collect, x):
        n = x.shape[0]
        if collect:
            h, w = x.shape[-2:]
            part = x[..., round(own[0] * h) : round(own[1] * h), round(own[2] * w) : round(own[3] * w)]
            part = part.float().reshape(n, layer.num_groups, -1)
            var, mean = torch.var_mean(part, dim=-1, correction=0)
            count = part.shape[-1]
            sums = self.sums.setdefault(layer, [0, 0.0, 0.0])
            sums[0] += count
            sums[1] = sums[1] + mean.double() * count
            sums[2] = sums[2] + (var.double() + mean.double() ** 2) * count
        # While collecting, normalise with the statistics of the tiles so far, this one included: closer
        # to the untiled decode than each tile's own (docs/benchmarks.md), and the same for all tiles later.
        mean, var = self.pooled[layer] if layer in self.pooled else _mean_var(*self.sums[layer])
        grouped = x.float().reshape(n, layer.num_groups, -1)
        y = ((grouped - mean[..., None]) * torch.rsqrt(var[..., None] + layer.eps)).reshape(x.shape)
        if layer.weight is not None:
            y = y * layer.weight.float()[:, None, None] + layer.bias.float()[:, None, None]
        return y.to(x.dtype)


def _mean_var(count, total, total_squares):
    mean = total / count
    return mean.float(), (total_squares / count - mean**2).clamp_min(0).float()
