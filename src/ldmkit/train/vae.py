"""Stage 2: an AutoencoderKL (f=8, 4 latent channels) trained on reconstruction plus a small KL term."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ldmkit.errors import LdmError
from ldmkit.train import common


@dataclass
class VaeTrainConfig:
    data_dir: str = ".data/emoji"
    out_dir: str = ".runs/vae"
    # 4 levels -> downsampling 8 (128x128 image -> 16x16x4 latents); 4.4M params, 8.7 MB in fp16
    block_out_channels: tuple[int, ...] = (48, 96, 128, 128)
    layers_per_block: int = 1
    norm_num_groups: int = 16
    latent_channels: int = 4
    batch_size: int = 128
    max_steps: int = 20_000
    max_minutes: float | None = None  # stop (and finish the LR decay) at this wall time, whichever comes first
    lr: float = 1e-3
    min_lr: float = 2e-5
    warmup_steps: int = 200
    kl_weight: float = 1e-6  # per latent element, against per-pixel reconstruction: keeps latents near N(0, s^2)
    mse_weight: float = 1.0  # L1 + MSE: L1 keeps edges sharp, MSE is what PSNR measures
    holdout_fraction: float = 0.02  # images never trained on, for the PSNR in `ldm eval`
    init_dir: str | None = None  # start from this VAE (diffusers folder) instead of random weights
    # train only the decoder (with init_dir): the latent space, and so every UNet trained on it, stays as it was,
    # while the decoder learns to draw what the new data adds (scene backgrounds); the scaling factor is kept
    decoder_only: bool = False
    scenes: bool = False  # train on scenes pasted on the GPU (backgrounds, several objects) instead of single emoji
    scene_size: int = 256  # their side in pixels; batch_size counts 128x128 images, so the batch shrinks to match
    workers: int = 6  # CPU processes drawing scene layouts
    log_every: int = 200
    seed: int = 0
    limit: int | None = None
    mixed_precision: str = "auto"


def build_model(cfg: VaeTrainConfig) -> AutoencoderKL:
    levels = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=list(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=128,
    )


class Autoencode(torch.nn.Module):
    """encode -> posterior sample -> decode as one forward: DDP synchronises gradients through forward calls."""

    def __init__(self, vae: AutoencoderKL, decoder_only: bool = False):
        super().__init__()
        self.vae, self.decoder_only = vae, decoder_only
        if decoder_only:
            vae.encoder.requires_grad_(False)
            vae.quant_conv.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.decoder_only):
            posterior = self.vae.encode(images).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior.mean, posterior.logvar


def vae_loss(model: Autoencode, images: torch.Tensor, cfg: VaeTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, reconstruction MSE) for a batch in [-1, 1]."""
    reconstruction, mean, logvar = model(images)
    l1 = F.l1_loss(reconstruction.float(), images.float())
    mse = F.mse_loss(reconstruction.float(), images.float())
    kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float()).sum(dim=(1, 2, 3))
    kl = kl.mean() / mean[0].numel()  # per latent element
    return l1 + cfg.mse_weight * mse + cfg.kl_weight * kl, mse


def train(cfg: VaeTrainConfig) -> dict:
    """Train (resumable), then compute the latent scaling factor and export out_dir/vae (fp16 diffusers folder)."""
    accelerator = common.make_accelerator(cfg.mixed_precision)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    dataset = common.load_dataset(Path(cfg.data_dir), cfg.limit)
    train_set = dataset.subset(~common.holdout_mask(dataset, cfg.holdout_fraction)).to(accelerator.device)

    if cfg.decoder_only and not cfg.init_dir:
        raise LdmError("decoder_only needs init_dir: the encoder whose latent space is kept")
    base = AutoencoderKL.from_pretrained(cfg.init_dir, torch_dtype=torch.float32) if cfg.init_dir else build_model(cfg)
    model = Autoencode(base.to(memory_format=torch.channels_last), cfg.decoder_only)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = common.Schedule(cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps, cfg.max_minutes)
    step, elapsed, _ = common.resume(out_dir / "ckpt.pt", accelerator, model, optimizer, "vae")

    n, batch = len(train_set), min(cfg.batch_size, len(train_set))
    progress = common.Progress(accelerator, optimizer, schedule, "vae img/s", cfg.log_every, step, elapsed)
    generator = common.process_generator(accelerator, cfg.seed, step)
    draw = scene_images(cfg, accelerator, step, generator) if cfg.scenes else None
    model.train()
    for _ in progress:
        if draw is not None:
            images = next(draw)  # (B, 3, S, S) scenes, B = batch_size * (128 / S)^2
        else:
            index = torch.randint(0, n, (batch,), device=accelerator.device, generator=generator)
            images = common.to_model_range(train_set.images[index])  # (B, 3, 128, 128)
        with accelerator.autocast():
            loss, _ = vae_loss(model, images, cfg)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        progress.done(loss, batch)
    step, elapsed, history = progress.step, progress.finish(), progress.history

    vae = accelerator.unwrap_model(model).vae
    vae.eval()
    if cfg.decoder_only:  # same latents as before: the UNets trained on them expect this factor
        scaling_factor = vae.config.scaling_factor
    else:
        if draw is not None:  # the latents the UNet will see: scenes
            sample = torch.cat([next(draw) for _ in range(max(1, 1024 // cfg.batch_size))])
            train_set = dataclasses.replace(train_set, images=((sample + 1) * 127.5).round().to(torch.uint8))
        scaling_factor = latent_scaling_factor(vae, train_set.images, accelerator)
    vae.register_to_config(scaling_factor=scaling_factor)
    common.save_checkpoint(
        out_dir / "ckpt.pt", accelerator, model, optimizer, cfg, step, elapsed, scaling_factor=scaling_factor
    )
    if accelerator.is_main_process:
        export(vae, out_dir)
        (out_dir / "train.json").write_text(json.dumps({"steps": step, "minutes": elapsed / 60, "history": history}))
    return {"steps": step, "minutes": elapsed / 60, "history": history, "scaling_factor": scaling_factor}


def scene_images(cfg: VaeTrainConfig, accelerator, step: int, generator):
    """Endless batches of scenes in [-1, 1], channels_last, drawn and pasted on the training device."""
    from ldmkit.data.scenes import load_sampler
    from ldmkit.train.compose import Compositor, scene_batches, to_device

    sprites, sampler = load_sampler(Path(cfg.data_dir), cfg.limit)
    compositor = Compositor(sprites, accelerator.device)
    size = cfg.scene_size
    batch = max(1, cfg.batch_size * 128 * 128 // (size * size))
    seed = cfg.seed + step + 7919 * accelerator.process_index
    stream = scene_batches(sampler, ((size, size, 1.0),), batch, cfg.workers, seed, None)
    for height, width, scene_batch, *_ in stream:
        with torch.no_grad():
            images = compositor(to_device(scene_batch, accelerator.device), height, width, generator)
        yield images.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def encode_posteriors(
    vae: AutoencoderKL, images_uint8: torch.Tensor, device, batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) uint8 -> posterior mean and std, each (N, 4, H/8, W/8) float32, unscaled."""
    means, stds = [], []
    dtype = next(vae.parameters()).dtype
    for i in range(0, images_uint8.shape[0], batch_size):
        images = common.to_model_range(images_uint8[i : i + batch_size].to(device)).to(dtype)
        dist = vae.encode(images).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(vae: AutoencoderKL, images_uint8: torch.Tensor, accelerator) -> float:
    """1 / std of sampled latents over (a sample of) the training set, as SD does: unit-variance diffusion inputs."""
    with accelerator.autocast():
        mean, std = encode_posteriors(vae, images_uint8[:4096], accelerator.device)
    return float(1.0 / (mean + std * torch.randn_like(std)).std())


def export(vae: AutoencoderKL, out_dir: Path) -> None:
    """fp16 diffusers folder out_dir/vae; its config carries the scaling factor."""
    copy = AutoencoderKL.from_config(vae.config)
    copy.register_to_config(scaling_factor=vae.config.scaling_factor)  # from_config drops it
    copy.load_state_dict({k: v.detach().float().cpu() for k, v in vae.state_dict().items()})
    copy.half().save_pretrained(out_dir / "vae")
