"""Tiny random ControlNets matching the tiny UNet (support.tiny), and the original (lllyasviel) key layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel
from PIL import Image


def control_image(seed: int = 0, size: tuple[int, int] = (24, 16)) -> Image.Image:
    """A random RGB control map of size (width, height): the same one for the same seed."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# diffusers' ControlNet pipeline tests' tiny ControlNet, with conftest's UNet widths (cross-attention 8, 2 groups).
TINY_CONTROLNET = {
    "block_out_channels": (4, 8),
    "layers_per_block": 1,
    "in_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "cross_attention_dim": 8,
    "conditioning_embedding_out_channels": (16, 32),  # one stride-2 conv: the tiny VAE's factor 2
    "norm_num_groups": 2,
}


def make_tiny_controlnet(seed: int = 0, **overrides) -> ControlNetModel:
    """Random weights everywhere, including the zero convolutions (trained ControlNets' are not zero)."""
    torch.manual_seed(seed)
    controlnet = ControlNetModel(**{**TINY_CONTROLNET, **overrides})
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if "controlnet_down_blocks" in name or "controlnet_mid_block" in name or "cond_embedding.conv_out" in name:
                param.normal_(0, 0.5)
    return controlnet.eval()


def write_config(controlnet: ControlNetModel, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in controlnet.config.items() if k != "_use_default_values"}
    (folder / "config.json").write_text(json.dumps(config, default=list))
    return folder


_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def original_state_dict(controlnet: ControlNetModel, prefix: str = "control_model.") -> dict:
    """The ControlNet's weights (copies) under the original ControlNet's (cldm) key names, as lllyasviel's files
    have them: the inverse of diffusers' convert_controlnet_checkpoint, written out independently."""
    config = controlnet.config
    per_block = config.layers_per_block + 1  # resnets, then a downsampler: each an input block of the original
    hint_out = 2 * (2 * (len(config.conditioning_embedding_out_channels) - 1) + 1)  # conv, SiLU, ..., conv_out
    original = {}
    for key, tensor in controlnet.state_dict().items():
        new = _original_key(key, per_block, hint_out)
        assert new is not None, f"no original name for {key}"
        original[prefix + new] = tensor.detach().clone()
    return original


def _original_key(key: str, per_block: int, hint_out: int) -> str | None:
    simple = {
        "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL's added conditioning, as sgm names it
        "add_embedding.linear_2.": "label_emb.0.2.",
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
        "controlnet_cond_embedding.conv_out.": f"input_hint_block.{hint_out}.",
        "controlnet_mid_block.": "middle_block_out.0.",
    }
    for old, new in simple.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", key):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
    if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block = 1 + int(m[1]) * per_block + int(m[3])
        if m[2] == "resnets":
            return f"input_blocks.{block}.0.{_resnet_rest(m[4])}"
        return f"input_blocks.{block}.1.{m[4]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet_rest(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    return None


def _resnet_rest(rest: str) -> str:
    for old, new in _RESNET_NAMES.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def make_tiny_sdxl_controlnet(unet, seed: int = 0, conditioning_channels=(16, 32)) -> ControlNetModel:
    """A ControlNet shaped from a tiny SDXL UNet (support.sdxl) as diffusers' `from_unet` shapes SDXL ControlNets:
    it takes the UNet's text_time added conditioning. Random weights, zero convolutions included."""
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=conditioning_channels, load_weights_from_unet=False
    )
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if "controlnet_down_blocks" in name or "controlnet_mid_block" in name or "cond_embedding.conv_out" in name:
                param.normal_(0, 0.5)
    return controlnet.eval()
