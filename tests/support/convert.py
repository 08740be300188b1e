"""Diffusers components -> an original-format (CompVis/LDM key layout) single-file checkpoint.

The inverse of diffusers' single-file conversion, after diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py, but driven by the component configs
instead of hard-coded SD block counts, so tiny test models convert too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ldmkit.loading import Components

# A rule maps a diffusers module prefix to its LDM prefix, renaming the first names inside it.
Rule = tuple[str, str, dict[str, str]]

UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
OPEN_CLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}


def save_single_file(components: Components, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `components` as one original-format .safetensors file (dtype None keeps the weights' dtype)."""
    state_dict = to_original_state_dict(components)
    tensors = {key: tensor.detach().to(dtype or tensor.dtype).contiguous() for key, tensor in state_dict.items()}
    path = Path(path)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def to_original_state_dict(components: Components) -> dict[str, torch.Tensor]:
    """UNet under model.diffusion_model., VAE under first_stage_model., text encoder under cond_stage_model."""
    unet = _rename(components.unet.state_dict(), _unet_rules(components.unet.config))
    vae = _vae_to_ldm(components.vae)
    return {
        **{"model.diffusion_model." + key: tensor for key, tensor in unet.items()},
        **{"first_stage_model." + key: tensor for key, tensor in vae.items()},
        **_text_encoder_to_ldm(components.text_encoder),
    }


def _rename(state_dict: dict[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    return {_ldm_key(key, rules): tensor for key, tensor in state_dict.items()}


def _ldm_key(key: str, rules: list[Rule]) -> str:
    for prefix, ldm_prefix, inner in rules:
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            for name, ldm_name in inner.items():
                if rest.startswith(name):
                    return ldm_prefix + ldm_name + rest[len(name) :]
            return ldm_prefix + rest
    raise ValueError(f"no original-format name for '{key}': only SD-style UNet/VAE/CLIP components convert")


def _unet_rules(config) -> list[Rule]:
    """LDM numbers the UNet's input/output blocks flatly: one per resnet (with its attention) or resampler."""
    rules: list[Rule] = [
        ("time_embedding.linear_1.", "time_embed.0.", {}),
        ("time_embedding.linear_2.", "time_embed.2.", {}),
        ("conv_in.", "input_blocks.0.0.", {}),
        ("conv_norm_out.", "out.0.", {}),
        ("conv_out.", "out.2.", {}),
        ("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET),
        ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET),
    ]
    layers, last = config.layers_per_block, len(config.down_block_types) - 1
    block = 1
    for i in range(last + 1):
        for j in range(layers):
            rules.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", UNET_RESNET))
            rules.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", {}))
            block += 1
        if i < last:
            rules.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{block}.0.op.", {}))
            block += 1
    block = 0
    for i, block_type in enumerate(config.up_block_types):
        for j in range(layers + 1):
            rules.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", UNET_RESNET))
            rules.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.", {}))
            block += 1
        if i < last:
            # The upsampler follows the block's last resnet, after its attention when it has one.
            slot = 2 if "CrossAttn" in block_type else 1
            rules.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{block - 1}.{slot}.", {}))
    return rules


def _vae_rules(config) -> list[Rule]:
    """LDM numbers the decoder's up blocks in reverse order of diffusers'."""
    rules: list[Rule] = [
        (name, name, {})
        for name in ("quant_conv.", "post_quant_conv.", "encoder.conv_in.", "encoder.conv_out.")
        + ("decoder.conv_in.", "decoder.conv_out.")
    ]
    for part in ("encoder", "decoder"):
        rules += [
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION),
        ]
    layers, last = config.layers_per_block, len(config.down_block_types) - 1
    for i in range(last + 1):
        for j in range(layers):
            rules.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET))
        for j in range(layers + 1):
            rules.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{last - i}.block.{j}.", VAE_RESNET))
        if i < last:
            rules.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", {}))
            rules.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{last - i}.upsample.", {}))
    return rules


def _vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """LDM's VAE attention projections are 1x1 convolutions, diffusers' are linear layers."""
    state_dict = _rename(vae.state_dict(), _vae_rules(vae.config))
    for key, tensor in state_dict.items():
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            state_dict[key] = tensor.reshape(*tensor.shape, 1, 1)
    return state_dict


def _text_encoder_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """SD1 keeps transformers' CLIP names; SD2's OpenCLIP (told apart by its plain gelu) has its own layout."""
    # transformers >= 5.6 saves CLIPTextModel without the "text_model." prefix that original files keep.
    state_dict = {key.removeprefix("text_model."): tensor for key, tensor in text_encoder.state_dict().items()}
    if text_encoder.config.hidden_act == "gelu":
        return {"cond_stage_model.model." + key: tensor for key, tensor in _open_clip_layout(state_dict).items()}
    return {"cond_stage_model.transformer.text_model." + key: tensor for key, tensor in state_dict.items()}


def _open_clip_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP fuses q, k and v into one in_proj per layer."""
    renamed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    out = {ldm_key: state_dict[key] for key, ldm_key in renamed.items()}
    num_layers = 1 + max(int(key.split(".")[2]) for key in state_dict if key.startswith("encoder.layers."))
    for i in range(num_layers):
        layer, ldm_layer = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            qkv = [state_dict[f"{layer}self_attn.{name}_proj.{param}"] for name in "qkv"]
            out[f"{ldm_layer}attn.in_proj_{param}"] = torch.cat(qkv)
            out |= {
                f"{ldm_layer}{ldm_name}{param}": state_dict[f"{layer}{name}{param}"]
                for name, ldm_name in OPEN_CLIP_LAYER.items()
            }
    return out


def save_vae_file(vae, path: str | Path) -> Path:
    """A VAE alone as one original-format .safetensors file, as A1111's VAE files are (bare encoder./decoder. keys)."""
    tensors = {key: tensor.detach().contiguous() for key, tensor in _vae_to_ldm(vae).items()}
    path = Path(path)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
