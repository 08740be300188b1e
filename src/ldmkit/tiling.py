"""Seamless tiling (AUTOMATIC1111's 'Tiling'): circular padding in the convolutions of the UNet and the VAE decoder,
so that every layer sees the image wrap around at its edges and copies of the image tile without seams.

A transform of one request: `Pipeline.tiling_applied` sets the padding, records it in the model state and puts the
layers back as they were afterwards.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def circular_padding(*modules: torch.nn.Module):
    """Every Conv2d in `modules` pads circularly while the context is open, then pads as it did before."""
    convs = [layer for module in modules for layer in module.modules() if isinstance(layer, torch.nn.Conv2d)]
    before = [conv.padding_mode for conv in convs]
    for conv in convs:
        conv.padding_mode = "circular"  # nn.Conv2d pads by its own `padding` in this mode before convolving
    try:
        yield
    finally:
        for conv, mode in zip(convs, before):
            conv.padding_mode = mode
