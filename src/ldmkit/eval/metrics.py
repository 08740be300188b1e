"""Metrics for the default model: VAE reconstruction PSNR and CLIP text retrieval accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldmkit.loading import load_tokenizer
from ldmkit.train.clip import prepare_images
from ldmkit.train.common import to_model_range, tokenize


@torch.no_grad()
def reconstruction_psnr(vae, images_uint8: torch.Tensor, device, batch_size: int = 256) -> float:
    """Mean per-image PSNR (dB, 8-bit range) of VAE encode (posterior mean) -> decode."""
    dtype = next(vae.parameters()).dtype
    psnrs = []
    for i in range(0, images_uint8.shape[0], batch_size):
        images = to_model_range(images_uint8[i : i + batch_size].to(device))
        decoded = vae.decode(vae.encode(images.to(dtype)).latent_dist.mean).sample.float()
        decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round()
        mse = ((decoded - images_uint8[i : i + batch_size].to(device).float()) ** 2).mean(dim=(1, 2, 3))
        psnrs.append(10 * torch.log10(255.0**2 / mse.clamp(min=1e-10)))
    return float(torch.cat(psnrs).mean())


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output from get_*_features; older versions return the tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def text_features(clip, captions: list[str], device, batch_size: int = 1024) -> torch.Tensor:
    tokens = tokenize(load_tokenizer(), captions)
    feats = [
        _features(clip.get_text_features(input_ids=tokens[i : i + batch_size].to(device)))
        for i in range(0, len(tokens), batch_size)
    ]
    return F.normalize(torch.cat(feats).float(), dim=-1)


@torch.no_grad()
def image_features(clip, images_uint8: torch.Tensor, device, batch_size: int = 512) -> torch.Tensor:
    size = clip.config.vision_config.image_size
    dtype = next(clip.parameters()).dtype
    feats = [
        _features(
            clip.get_image_features(
                pixel_values=prepare_images(images_uint8[i : i + batch_size].to(device), size).to(dtype)
            )
        )
        for i in range(0, images_uint8.shape[0], batch_size)
    ]
    return F.normalize(torch.cat(feats).float(), dim=-1)


def retrieval_accuracy(
    image_feats: torch.Tensor, candidate_feats: torch.Tensor, targets: torch.Tensor, ks=(1, 5)
) -> dict[str, float]:
    """Fraction of images whose own caption (targets: index into candidates) ranks within the top k."""
    similarity = image_feats @ candidate_feats.T  # (N, C)
    target_score = similarity.gather(1, targets.view(-1, 1).to(similarity.device))
    rank = (similarity > target_score).sum(1)  # 0 = best
    return {f"top{k}": float((rank < k).float().mean()) for k in ks}
