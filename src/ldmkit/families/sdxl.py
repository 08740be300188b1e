"""Stable Diffusion XL: two text encoders, a pooled text embedding and the image size as extra UNet conditioning.

What differs from SD (Podell et al. 2023, "SDXL"; the behaviour of diffusers' SDXL pipelines and AUTOMATIC1111):
- the cross-attention states are CLIP ViT-L's and OpenCLIP bigG's penultimate hidden states side by side
  (768 + 1280 = 2048 dims; the refiner has bigG alone, 1280);
- the UNet also takes `added_cond_kwargs`: bigG's projected pooled embedding ("text_embeds") and six numbers
  ("time_ids"): original size (h, w), crop top-left (0, 0) and target size (h, w), each the image's size; the
  refiner takes an aesthetic score in place of the target size (6.0, or 2.5 for the unconditional half);
- an empty negative prompt conditions on zeros (hidden states and pooled) where the model says so
  (model_index.json's force_zeros_for_empty_prompt: base and inpainting, not the refiner);
- 1024 px and the VAE's scaling factor 0.13025 come from the configs; the Pipeline's decode retries an fp16
  VAE overflow in fp32.
"""

from __future__ import annotations

import torch

from ldmkit.families.base import Conditioning, ModelFamily
from ldmkit.prompts import CHUNK_LENGTH, check_clip_skip, encode_prompts_sdxl, prompt_token_count

AESTHETIC_SCORE = 6.0  # diffusers' and A1111's defaults for the refiner's aesthetic-score conditioning
NEGATIVE_AESTHETIC_SCORE = 2.5


class StableDiffusionXL(ModelFamily):
    name = "sdxl"

    @classmethod
    def matches(cls, components) -> bool:
        return getattr(components.unet.config, "addition_embed_type", None) == "text_time"

    def default_size(self, models) -> int:
        return models.unet.config.sample_size * models.vae_scale_factor

    def check(self, models, params) -> None:
        for text_encoder in _text_encoders(models):
            check_clip_skip(params.clip_skip, text_encoder)

    def context_tokens(self, models, texts) -> int:
        # Both encoders chunk alike (the same BPE); tokenizer_2 is the one every SDXL model has.
        chunks = max(prompt_token_count(models.tokenizer_2, text)[1] // CHUNK_LENGTH for text in texts)
        return chunks * (CHUNK_LENGTH + 2)

    def encode_prompt(self, models, prompts, negative_prompt, num_images, use_guidance, clip_skip, size):
        """(B or 2B, 77k, 2048) hidden states, with text_embeds (B or 2B, 1280) and time_ids (B or 2B, 6) for
        the UNet; with guidance the unconditional half first. A1111 prompt syntax (emphasis, BREAK, 75-token
        chunks) applies to both encoders, each restoring its own mean as A1111's embedders do."""
        zero_negative = (
            use_guidance and negative_prompt == "" and models.pipeline_config.get("force_zeros_for_empty_prompt", True)
        )
        texts = [negative_prompt, *prompts] if use_guidance and not zero_negative else list(prompts)
        hidden, pooled = _encode(models, texts, clip_skip)  # (len(texts), 77k, D), (len(texts), P)
        if zero_negative:
            hidden, pooled = (
                torch.cat([torch.zeros_like(hidden[:1]), hidden]),
                torch.cat([torch.zeros_like(pooled[:1]), pooled]),
            )
        rows = len(prompts) * num_images
        time_ids = _time_ids(models, size, negative=False)
        if not use_guidance:
            return Conditioning(
                hidden.repeat_interleave(num_images, dim=0),
                _added_conditioning(pooled.repeat_interleave(num_images, dim=0), time_ids.expand(rows, -1)),
            )
        negative_time_ids = _time_ids(models, size, negative=True)
        context = torch.cat([hidden[:1].expand(rows, -1, -1), hidden[1:].repeat_interleave(num_images, dim=0)])
        text_embeds = torch.cat([pooled[:1].expand(rows, -1), pooled[1:].repeat_interleave(num_images, dim=0)])
        time_ids = torch.cat([negative_time_ids.expand(rows, -1), time_ids.expand(rows, -1)])
        return Conditioning(context, _added_conditioning(text_embeds, time_ids))

    def diffusers_pipeline(self, parts, scheduler, pipeline_class=None):
        """StableDiffusionXLPipeline; for a refiner (no CLIP ViT-L) its Img2Img, for a 9-channel UNet its Inpaint."""
        import diffusers

        if pipeline_class is None:
            if parts.unet.config.in_channels == 9:
                pipeline_class = diffusers.StableDiffusionXLInpaintPipeline
            elif parts.text_encoder is None:
                pipeline_class = diffusers.StableDiffusionXLImg2ImgPipeline
            else:
                pipeline_class = diffusers.StableDiffusionXLPipeline
        flags = {"force_zeros_for_empty_prompt": parts.pipeline_config.get("force_zeros_for_empty_prompt", True)}
        if pipeline_class is not diffusers.StableDiffusionXLPipeline:
            flags["requires_aesthetics_score"] = _requires_aesthetics_score(parts)
        return pipeline_class(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            text_encoder_2=parts.text_encoder_2,
            tokenizer=parts.tokenizer,
            tokenizer_2=parts.tokenizer_2,
            unet=parts.unet,
            scheduler=scheduler,
            add_watermarker=False,
            **flags,
        )


def _text_encoders(models) -> list:
    return [encoder for encoder in (models.text_encoder, models.text_encoder_2) if encoder is not None]


def _encode(models, texts: list[str], clip_skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both encoders' states side by side (CLIP ViT-L first, as sgm concatenates them) and bigG's pooled output."""
    hidden, pooled = encode_prompts_sdxl(models.tokenizer_2, models.run_text_encoder_2, texts, clip_skip, pooled=True)
    if models.text_encoder is not None:
        clip_l, _ = encode_prompts_sdxl(models.tokenizer, models.run_text_encoder, texts, clip_skip)
        hidden = torch.cat([clip_l, hidden], dim=-1)
    return hidden, pooled


def _time_ids(models, size: tuple[int, int], negative: bool) -> torch.Tensor:
    """(1, 6): original size, crop top-left, target size, as (height, width) pairs; the refiner's (1, 5) ends in
    an aesthetic score instead of the target size. Generated images are their own original, uncropped."""
    width, height = size
    if _requires_aesthetics_score(models):
        last = [NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE]
    else:
        last = [height, width]
    return torch.tensor([[height, width, 0, 0, *last]], device=models.device, dtype=models.dtype)


def _requires_aesthetics_score(parts) -> bool:
    return bool(parts.pipeline_config.get("requires_aesthetics_score", False))


def _added_conditioning(text_embeds: torch.Tensor, time_ids: torch.Tensor) -> dict:
    return {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}
