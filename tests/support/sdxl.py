"""Tiny random SDXL components (diffusers' SDXL test shapes, smaller) and the original single-file key layout.

`make_tiny_sdxl_components` builds base, refiner or inpainting models whose UNet uses SDXL's
`addition_embed_type="text_time"` conditioning: pooled text (text encoder 2's projection) + 6 (5 for the
refiner) Fourier-embedded size/crop numbers. `to_original_sdxl_state_dict` writes components in sgm's
layout (conditioner.embedders.*, model.diffusion_model.*, first_stage_model.*), the inverse of what
diffusers' single-file conversion reads.
"""

from __future__ import annotations

import json
import struct

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldmkit.loading import Components, load_tokenizer
from support.convert import _open_clip_layout, _rename, _unet_rules, _vae_rules

SDXL_SCHEDULER_CONFIG = {  # the bundled SDXL base scheduler config, written out
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "set_alpha_to_one": False,
    "clip_sample": False,
    "interpolation_type": "linear",
    "skip_prk_steps": True,
}
TIME_EMBED_DIM = 4  # per size/crop number; SDXL's is 256
HIDDEN = 8  # each text encoder's width; SDXL's are 768 and 1280


def tiny_text_config(hidden_act: str, pad_token_id: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
        hidden_size=HIDDEN,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=2,
        num_hidden_layers=3,
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=HIDDEN,
    )


def make_tiny_sdxl_components(seed: int = 0, kind: str = "base", scaling_factor: float = 0.13025) -> Components:
    """kind: "base" (two encoders), "refiner" (bigG alone, aesthetic score) or "inpainting" (9-channel UNet)."""
    torch.manual_seed(seed)
    refiner = kind == "refiner"
    context_dim = HIDDEN if refiner else 2 * HIDDEN  # CLIP-L and bigG hidden states side by side
    time_ids = 5 if refiner else 6
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=9 if kind == "inpainting" else 4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=HIDDEN + time_ids * TIME_EMBED_DIM,
        cross_attention_dim=context_dim,
        norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
        scaling_factor=scaling_factor,
        force_upcast=True,
    )
    text_encoder = None if refiner else CLIPTextModel(tiny_text_config("quick_gelu", pad_token_id=49407)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config("gelu", pad_token_id=0)).eval()
    return Components(
        tokenizer=None if refiner else load_tokenizer(),
        text_encoder=text_encoder,
        unet=unet.eval(),
        vae=vae.eval(),
        scheduler_config=dict(SDXL_SCHEDULER_CONFIG),
        source=f"tiny-sdxl-{kind}",
        name=f"tiny-sdxl-{kind}",
        tokenizer_2=load_tokenizer(pad_token="!"),
        text_encoder_2=text_encoder_2,
        pipeline_config={"force_zeros_for_empty_prompt": not refiner, "requires_aesthetics_score": refiner},
    )


# ---- diffusers -> original (sgm) key layout ----

ADD_EMBEDDING_RULES = [
    ("add_embedding.linear_1.", "label_emb.0.0.", {}),
    ("add_embedding.linear_2.", "label_emb.0.2.", {}),
]
CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
BASE_BIGG_PREFIX = "conditioner.embedders.1.model."
REFINER_BIGG_PREFIX = "conditioner.embedders.0.model."  # the refiner has bigG alone


def unet_to_original(state_dict: dict, config) -> dict[str, torch.Tensor]:
    unet = _rename(state_dict, ADD_EMBEDDING_RULES + _unet_rules(config))
    return {"model.diffusion_model." + key: tensor for key, tensor in unet.items()}


def vae_to_original(state_dict: dict, config) -> dict[str, torch.Tensor]:
    vae = _rename(state_dict, _vae_rules(config))
    for key, tensor in vae.items():  # sgm's VAE attention projections are 1x1 convolutions
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            vae[key] = tensor.reshape(*tensor.shape, 1, 1)
    return {"first_stage_model." + key: tensor for key, tensor in vae.items()}


def clip_l_to_original(state_dict: dict) -> dict[str, torch.Tensor]:
    """transformers' (flattened) CLIPTextModel keys under sgm's FrozenCLIPEmbedder."""
    return {CLIP_L_PREFIX + key.removeprefix("text_model."): tensor for key, tensor in state_dict.items()}


def bigg_to_original(state_dict: dict, prefix: str) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection keys in OpenCLIP's layout; OpenCLIP's projection is the Linear's transpose."""
    layers = {key.removeprefix("text_model."): tensor for key, tensor in state_dict.items()}
    original = {prefix + key: tensor for key, tensor in _open_clip_layout(layers).items()}
    original[prefix + "text_projection"] = state_dict["text_projection.weight"].T.contiguous()
    return original


def components_to_original(components: Components) -> dict[str, torch.Tensor]:
    """The whole original-layout state dict; a refiner (no CLIP-L) has bigG as embedder 0."""
    c = components
    original = unet_to_original(c.unet.state_dict(), c.unet.config) | vae_to_original(c.vae.state_dict(), c.vae.config)
    if c.text_encoder is None:
        return original | bigg_to_original(c.text_encoder_2.state_dict(), REFINER_BIGG_PREFIX)
    original |= clip_l_to_original(c.text_encoder.state_dict())
    return original | bigg_to_original(c.text_encoder_2.state_dict(), BASE_BIGG_PREFIX)


def write_safetensors_streamed(path, parts: list) -> None:
    """A .safetensors file written one part at a time, so only one part's tensors are in memory.

    `parts` are (layout, make) pairs: `layout` maps names to meta tensors (shape and dtype, in write order),
    `make()` returns the real tensors of those names. The format: an 8-byte header length, a JSON header
    of dtypes, shapes and byte offsets, then the raw bytes in header order.
    """
    dtypes = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for layout, _ in parts:
        for name, tensor in layout.items():
            size = tensor.numel() * tensor.element_size()
            header[name] = {
                "dtype": dtypes[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for layout, make in parts:
            tensors = make()
            for name, meta in layout.items():
                tensor = tensors[name].contiguous()
                assert tensor.shape == meta.shape and tensor.dtype == meta.dtype, name
                file.write(tensor.view(-1).view(torch.uint8).numpy().data)
