"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, cross-attention conditioning only."""

from __future__ import annotations

import torch

from ldmkit.families.base import Conditioning, ModelFamily
from ldmkit.prompts import CHUNK_LENGTH, check_clip_skip, encode_prompts, prompt_token_count


class StableDiffusion(ModelFamily):
    name = "sd"

    @classmethod
    def matches(cls, components) -> bool:
        # SDXL-style UNets take added conditioning ("text_time"); SD's take the text states alone.
        return getattr(components.unet.config, "addition_embed_type", None) is None

    def default_size(self, models) -> int:
        return models.unet.config.sample_size * models.vae_scale_factor

    def check(self, models, params) -> None:
        check_clip_skip(params.clip_skip, models.text_encoder)

    def context_tokens(self, models, texts) -> int:
        # Every text is padded to the most 75-token chunks any of them has; each chunk is CLIP's 77 tokens.
        chunks = max(prompt_token_count(models.tokenizer, text)[1] // CHUNK_LENGTH for text in texts)
        return chunks * (CHUNK_LENGTH + 2)

    def encode_prompt(self, models, prompts, negative_prompt, num_images, use_guidance, clip_skip, size):
        """(B or 2B, 77k, D) CLIP hidden states; A1111 prompt syntax: (emphasis:1.2), [de-emphasis], BREAK, and
        75-token chunks for long prompts (ldmkit.prompts)."""
        texts = [negative_prompt, *prompts] if use_guidance else list(prompts)
        hidden = encode_prompts(models.tokenizer, models.run_text_encoder, texts, clip_skip)  # (len(texts), 77k, D)
        if not use_guidance:
            return Conditioning(hidden.repeat_interleave(num_images, dim=0))
        uncond = hidden[:1].expand(len(prompts) * num_images, -1, -1)
        return Conditioning(torch.cat([uncond, hidden[1:].repeat_interleave(num_images, dim=0)]))

    def diffusers_pipeline(self, parts, scheduler, pipeline_class=None):
        from diffusers import StableDiffusionPipeline

        return (pipeline_class or StableDiffusionPipeline)(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            unet=parts.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
