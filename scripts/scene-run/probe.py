"""What denoise_by_t.py and object_error.py share: the frozen parts the scene stage trains a UNet with (the shipped
VAE and text encoder), and a batch of latents noised at one timestep with its v target, as the stage noises them
(white noise, seeded per timestep so that every UNet probed sees the same noise)."""

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from ldmkit.loading import load_tokenizer
from ldmkit.train.common import tokenize
from ldmkit.train.unet import SCHEDULER_CONFIG, noised_with_v

SHIPPED = "src/ldmkit/assets/default-model"
FP32 = dict(torch_dtype=torch.float32)


def load_unet(path: str) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(path, **FP32).eval()


class Frozen:
    def __init__(self):
        self.vae = AutoencoderKL.from_pretrained(f"{SHIPPED}/vae", **FP32).eval()
        self.text_encoder = CLIPTextModel.from_pretrained(f"{SHIPPED}/text_encoder", **FP32).eval()
        self.tokenizer = load_tokenizer()
        self.alphas_cumprod = DDPMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod

    @torch.no_grad()
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> the posterior means, scaled as the UNet sees them."""
        return self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def states(self, captions: list[str]) -> torch.Tensor:
        return self.text_encoder(tokenize(self.tokenizer, captions)).last_hidden_state

    def noised(self, latents: torch.Tensor, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy latents, v target) at timestep t, the noise drawn from seed + t."""
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + t))
        return noised_with_v(latents, noise, self.alphas_cumprod, torch.full((latents.shape[0],), t))
