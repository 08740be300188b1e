"""Stage 3: a UNet2DConditionModel denoising VAE latents, cross-attending to the frozen CLIP text encoder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from ldmkit.loading import load_tokenizer
from ldmkit.train import common
from ldmkit.train.vae import encode_posteriors

# SD's noise schedule (scaled_linear betas, 1000 steps). v-prediction: the v objective weights all noise levels
# evenly in x0 terms, so a small model trained for minutes gets the high-noise steps (global layout, the white
# background) right; epsilon prediction is nearly uninformative there. Every diffusers sampler supports v.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "set_alpha_to_one": False,
}


@dataclass
class UnetTrainConfig:
    data_dir: str = ".data/emoji"
    out_dir: str = ".runs/unet"
    text_encoder_dir: str = ".runs/clip/text_encoder"
    vae_dir: str = ".runs/vae/vae"
    # 16.6M params (33 MB fp16); 50 CFG forwards of 16x16 latents take ~1.6 s on a 2-core CPU
    block_out_channels: tuple[int, ...] = (64, 128, 192)
    layers_per_block: int = 2
    attention_heads: tuple[int, ...] = (2, 4, 6)  # 32-dim heads
    norm_num_groups: int = 32
    batch_size: int = 512
    max_steps: int = 20_000
    max_minutes: float | None = None  # stop (and finish the LR decay) at this wall time, whichever comes first
    lr: float = 5e-4
    min_lr: float = 2e-5
    warmup_steps: int = 300
    weight_decay: float = 0.01
    caption_dropout: float = 0.1  # empty caption, so classifier-free guidance has an unconditional model
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023): faster convergence
    noise_discount: float = 0.0  # > 0: multi-resolution noise (see `pyramid_noise`); 0: white noise
    ema_decay: float = 0.999
    log_every: int = 200
    seed: int = 0
    limit: int | None = None
    mixed_precision: str = "auto"


def build_model(cfg: UnetTrainConfig, cross_attention_dim: int, sample_size: int) -> UNet2DConditionModel:
    levels = len(cfg.block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=tuple(cfg.attention_heads),  # diffusers' historical name: it sets the head count
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=cfg.norm_num_groups,
    )


@torch.no_grad()
def encode_captions(text_encoder: CLIPTextModel, captions: list[str], device, batch_size: int = 1024) -> torch.Tensor:
    """Every unique caption -> (C, 77, hidden) last hidden states, once, with the frozen text encoder."""
    tokens = common.tokenize(load_tokenizer(), captions)
    states = [
        text_encoder(tokens[i : i + batch_size].to(device)).last_hidden_state for i in range(0, len(tokens), batch_size)
    ]
    return torch.cat(states)


def draw_pairs(index, image_captions, posterior_mean, posterior_std, scaling_factor, caption_dropout, generator):
    """For the images `index` (B,): one of each image's three captions, emptied with probability `caption_dropout`
    (id 0 is ""), and one latent sample of its posterior.

    Returns (caption ids (B,), which were emptied (B,) bool, latents (B, 4, h, w)).
    """
    batch, device = len(index), index.device
    variant = torch.randint(0, 3, (batch,), device=device, generator=generator)
    caption_ids = image_captions[index, variant]
    dropped = torch.rand(batch, device=device, generator=generator) < caption_dropout
    caption_ids = torch.where(dropped, torch.zeros_like(caption_ids), caption_ids)
    noise = torch.randn(posterior_mean[index].shape, device=device, generator=generator)
    latents = (posterior_mean[index] + posterior_std[index] * noise) * scaling_factor
    return caption_ids, dropped, latents


def pyramid_noise(shape, discount: float, device, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise of `shape` (B, C, H, W); with discount > 0, plus coarser Gaussian fields (H/2, H/4, ... down to
    1x1, each upsampled and weighted discount^level), renormalised to unit std per sample.

    Why: under SD's schedule even the last timestep keeps sqrt(0.0047) ~ 7% of the image, and averaged over a
    large region (a sky, a white background: hundreds of 32x32 latents) that faint signal outweighs white noise.
    A model trained so learns to read the layout off the noise, and at sampling time pure noise then decides
    it (a seed that "looks like" a sky gives a sky whatever the prompt says). Extra low-frequency noise hides
    that signal in training, so the layout has to come from the text (the idea of offset and multi-resolution
    noise, Guttenberg 2023 and Whitaker 2023; sampling is unchanged).
    """
    noise = torch.randn(shape, device=device, generator=generator)
    if discount <= 0:
        return noise
    batch, channels, height, width = shape
    level = 1
    while True:
        h, w = max(1, height >> level), max(1, width >> level)
        coarse = torch.randn((batch, channels, h, w), device=device, generator=generator)
        noise = noise + discount**level * F.interpolate(coarse, size=(height, width), mode="bilinear")
        if h == 1 and w == 1:
            break
        level += 1
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)


def noised_with_v(latents, noise, alphas_cumprod, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy latents, v target) at each sample's timestep: x_t = alpha x + sigma eps, v = alpha eps - sigma x."""
    alpha = alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
    return alpha * latents + sigma * noise, alpha * noise - sigma * latents


def diffusion_loss(
    unet, latents, text_states, alphas_cumprod, cfg: UnetTrainConfig, generator, teacher=None, distill: float = 0.0,
    teacher_states=None, noise_discount: float | None = None, memory_format=torch.channels_last, pixel_weight=None,
) -> torch.Tensor:  # fmt: skip
    """v-prediction MSE at uniformly drawn timesteps, Min-SNR weighted. With a `teacher` (called as `unet` is, on
    the same noisy latents, with `teacher_states` or else `text_states`), the target is `distill` of the teacher's
    prediction and the rest the data's v. `noise_discount` overrides cfg's for this batch; `memory_format` is the
    UNet's layout. `pixel_weight` (B, 1, h, w) at the latents' size weighs each latent pixel's error within its own
    sample (each sample's weights are normalised to mean 1, so samples keep equal shares)."""
    batch = latents.shape[0]
    timesteps = torch.randint(0, alphas_cumprod.shape[0], (batch,), device=latents.device, generator=generator)
    discount = cfg.noise_discount if noise_discount is None else noise_discount
    noise = pyramid_noise(latents.shape, discount, latents.device, generator)
    noisy, target = noised_with_v(latents, noise, alphas_cumprod, timesteps)
    noisy = noisy.contiguous(memory_format=memory_format)
    if teacher is not None and distill > 0:
        with torch.no_grad():
            taught = teacher(noisy, timesteps, text_states if teacher_states is None else teacher_states).sample.float()
        target = (1 - distill) * target + distill * taught
    prediction = unet(noisy, timesteps, text_states).sample
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    weight = snr.clamp(max=cfg.min_snr_gamma) / (snr + 1)  # Min-SNR-gamma for v targets
    squared = F.mse_loss(prediction.float(), target, reduction="none")
    if pixel_weight is None:
        per_sample = squared.mean(dim=(1, 2, 3))
    else:
        per_sample = (squared * pixel_weight).mean(dim=(1, 2, 3)) / pixel_weight.mean(dim=(1, 2, 3))
    return (weight * per_sample).mean()


def train(cfg: UnetTrainConfig) -> dict:
    """Train with EMA (resumable); export the EMA UNet to out_dir/unet and the scheduler config."""
    accelerator = common.make_accelerator(cfg.mixed_precision)
    device = accelerator.device
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    dataset = common.load_dataset(Path(cfg.data_dir), cfg.limit)

    # Everything the loop reads is computed once and kept on the device: latent posteriors and caption states.
    text_encoder = CLIPTextModel.from_pretrained(cfg.text_encoder_dir, torch_dtype=torch.float32).to(device).eval()
    vae = AutoencoderKL.from_pretrained(cfg.vae_dir, torch_dtype=torch.float32).to(device).eval()
    with accelerator.autocast():
        text_states = encode_captions(text_encoder, dataset.captions, device)  # (C, 77, hidden)
    if device.type == "cuda":
        text_states = text_states.to(torch.bfloat16)  # 16k captions x 77 x 128: 0.3 GB in bf16
    # the latents in full precision, outside autocast (once: they were encoded twice on a GPU, the first discarded)
    posterior_mean, posterior_std = encode_posteriors(vae, dataset.images, device)  # (N, 4, h, w) each
    scaling_factor = vae.config.scaling_factor
    del text_encoder, vae
    image_captions = dataset.image_captions.to(device)
    alphas_cumprod = DDPMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod.to(device)

    model = build_model(cfg, text_states.shape[-1], posterior_mean.shape[-1]).to(memory_format=torch.channels_last)
    model, optimizer, ema, schedule, step, elapsed = common.start_run(accelerator, model, cfg, "unet", out_dir)

    n, batch = len(dataset), min(cfg.batch_size, len(dataset))
    progress = common.Progress(accelerator, optimizer, schedule, "unet samples/s", cfg.log_every, step, elapsed)
    generator = common.process_generator(accelerator, cfg.seed, step)
    model.train()
    for step in progress:
        index = torch.randint(0, n, (batch,), device=device, generator=generator)
        caption_ids, _, latents = draw_pairs(
            index, image_captions, posterior_mean, posterior_std, scaling_factor, cfg.caption_dropout, generator
        )
        with accelerator.autocast():
            loss = diffusion_loss(model, latents, text_states[caption_ids], alphas_cumprod, cfg, generator)
        common.optimizer_step(accelerator, model, optimizer, loss, ema, step)
        progress.done(loss, batch)
    step, elapsed, history = progress.step, progress.finish(), progress.history
    common.save_checkpoint(out_dir / "ckpt.pt", accelerator, model, optimizer, cfg, step, elapsed, ema=ema.state_dict())
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(model)
        export(unet, ema, out_dir)
        (out_dir / "train.json").write_text(json.dumps({"steps": step, "minutes": elapsed / 60, "history": history}))
    return {"steps": step, "minutes": elapsed / 60, "history": history}


def export(unet: UNet2DConditionModel, ema: common.EMA, out_dir: Path) -> None:
    """The EMA weights as an fp16 diffusers folder out_dir/unet, and the scheduler config next to it."""
    shipped = UNet2DConditionModel.from_config(unet.config)
    ema.copy_to(shipped)
    shipped.half().save_pretrained(out_dir / "unet")
    DDPMScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(out_dir / "scheduler")
