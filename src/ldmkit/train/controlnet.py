"""Stage 4: a ControlNet for a trained model, so an edge map or a rough sketch gives an emoji of that shape.

The ControlNet starts as a copy of the model's UNet encoder (diffusers' `ControlNetModel.from_unet`: its residual
outputs are zero convolutions, so at step 0 it changes nothing) and learns on control maps made from the training
images by the inference preprocessors (`train.control_maps`). The UNet, VAE and text encoder stay frozen; the loss
is the UNet stage's v-prediction objective with the ControlNet's residuals added to the frozen UNet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from ldmkit.errors import LdmError
from ldmkit.loading import DEFAULT_MODEL_DIR
from ldmkit.train import common, control_maps
from ldmkit.train.clip import random_framing
from ldmkit.train.unet import diffusion_loss, draw_pairs, encode_captions
from ldmkit.train.vae import encode_posteriors

EXPORT_SUBDIR = "controlnets"  # out_dir/controlnets/<name>: a folder to pass as --controlnet-dir (ckpt.pt stays out)


@dataclass
class ControlNetTrainConfig:
    data_dir: str = ".data/emoji"
    out_dir: str = ".runs/controlnet"
    model_dir: str = str(DEFAULT_MODEL_DIR)  # the model whose frozen UNet the ControlNet guides
    name: str = "emoji-lines"  # the exported ControlNet's folder name, which is its name for --control NAME=IMAGE
    # The map encoder, 128 px -> 16x16 (one level per halving; the last feeds the UNet's first width). Half SD's
    # (16, 32, 96, 256) at the two coarse levels: it runs at every step on the same map and was 54% of the
    # ControlNet's FLOPs; line maps need little width.
    conditioning_channels: tuple[int, ...] = (16, 32, 64, 128)
    batch_size: int = 512
    max_steps: int = 20_000
    max_minutes: float | None = None  # stop (and finish the LR decay) at this wall time, whichever comes first
    lr: float = 2e-4  # the copied encoder is already trained: below the UNet stage's 5e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.0
    # The first run (0.15, no shifts) learned nothing: the UNet has nearly memorized its images, so a caption
    # alone already gives the image. Empty captions, and shifted/mirrored pairs whose place only the map tells,
    # make the map worth learning from.
    caption_dropout: float = 0.5  # empty caption: the control map alone must give the shape
    max_shift: int = 3  # latent pixels (x8 image pixels) each pair is moved by at most, per axis; 0: none
    mirror: bool = True  # mirror half of the uncaptioned pairs left-right
    # A model that draws larger than the 128 px emoji (the scene model: 256 px, a lone emoji at about half the side,
    # scene objects and sketches up to the whole frame) learns from pairs drawn at its size: each image placed on a
    # white canvas of this side, `placements` times, at a side drawn from `object_scale` (fractions of the canvas)
    # and a random place; the maps are made from the placed images. None: the images as they are.
    canvas: int | None = None
    object_scale: tuple[float, float] = (0.45, 1.0)
    placements: int = 2
    min_snr_gamma: float = 5.0  # as the UNet stage (diffusion_loss reads it)
    noise_discount: float = 0.0  # the training noise of its UNet (0: white; see unet.pyramid_noise)
    ema_decay: float = 0.995  # a run is ~1-2k steps: a shorter horizon than the UNet stage's 0.999
    holdout_fraction: float = 0.02  # the VAE stage's held-out images (same hash): kept out here for `ldm eval`
    map_workers: int | None = None  # processes making control maps (default: all cores)
    log_every: int = 100
    seed: int = 0
    limit: int | None = None
    mixed_precision: str = "auto"


def controlled(controlnet, unet, control: torch.Tensor):
    """The frozen UNet with the ControlNet's residuals added, called as diffusion_loss calls a UNet."""

    def forward(sample, timestep, text_states):
        down, mid = controlnet(
            sample, timestep, encoder_hidden_states=text_states, controlnet_cond=control, return_dict=False
        )
        return unet(
            sample, timestep, text_states, down_block_additional_residuals=down, mid_block_additional_residual=mid
        )

    return forward


def augment_pairs(latents, control, white_latent, max_shift: int, mirrorable: torch.Tensor, generator):
    """Each (latents, map) pair moved by the same random offset (whole latent pixels; the map by that times its
    scale) with the white background's latent and an empty map filling in, and, where `mirrorable` (B,) is true,
    mirrored left-right half the time."""
    batch, _, h, w = latents.shape
    if max_shift > 0:
        device = latents.device
        dy, dx = torch.randint(-max_shift, max_shift + 1, (2, batch), device=device, generator=generator)
        factor = control.shape[-1] // w
        latents = _shifted(latents, dy, dx, white_latent[0, :, :1, :1])
        control = _shifted(control, dy * factor, dx * factor, torch.zeros(control.shape[1], 1, 1, device=device))
    if bool(mirrorable.any()):
        flip = (torch.rand(batch, device=latents.device, generator=generator) < 0.5) & mirrorable
        latents = torch.where(flip[:, None, None, None], latents.flip(-1), latents)
        control = torch.where(flip[:, None, None, None], control.flip(-1), control)
    return latents, control


def place_on_canvas(
    images: torch.Tensor, side: int, object_scale: tuple[float, float], placements: int, seed: int, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, s, s) uint8 images on white -> ((N * placements, 3, side, side) uint8, source index of each): every
    image drawn `placements` times at a side drawn from `object_scale` times the canvas, at a random place, on white
    (the CLIP stage's `random_framing`, on the image first scaled to the canvas)."""
    low, high = object_scale
    if not 0 < low <= high <= 1:
        raise LdmError(f"object_scale must be 0 < low <= high <= 1 (fractions of the canvas), got {object_scale}")
    if placements < 1:
        raise LdmError(f"placements must be at least 1, got {placements}")
    generator = torch.Generator().manual_seed(seed)
    source = torch.arange(len(images)).repeat_interleave(placements)
    placed = torch.empty((len(source), 3, side, side), dtype=torch.uint8)
    for start in range(0, len(source), chunk):  # in chunks: a whole data set of float canvases is gigabytes
        part = images[source[start : start + chunk]].float()
        if part.shape[-1] != side:
            part = F.interpolate(part, size=(side, side), mode="bilinear", antialias=True)
        framed = random_framing(part / 127.5 - 1, object_scale, generator)
        placed[start : start + chunk] = ((framed + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return placed, source


def _shifted(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) with sample b moved down dy[b] and right dx[b]; uncovered pixels get fill (C, 1, 1)."""
    batch, _, height, width = x.shape
    rows = torch.arange(height, device=x.device)[None, :] - dy[:, None]  # (B, H): where each output row comes from
    cols = torch.arange(width, device=x.device)[None, :] - dx[:, None]
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]  # (B, H, W)
    b = torch.arange(batch, device=x.device)[:, None, None]
    moved = x[b, :, rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]]  # (B, H, W, C)
    moved = moved.permute(0, 3, 1, 2)
    return torch.where(inside[:, None], moved, fill.to(x.dtype).expand(x.shape[1], height, width))


def check_model(model_dir: Path, cfg: ControlNetTrainConfig) -> dict:
    """The model's scheduler config, once the folder is known to be a v-prediction diffusers model whose latents
    the map encoder fits (checked before any work)."""
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        if not (model_dir / part).is_dir():
            raise LdmError(f"--model {model_dir}: no {part} folder (expected a diffusers model folder)")
    levels = len(AutoencoderKL.load_config(model_dir / "vae")["block_out_channels"])  # latents: 1/2^(levels-1)
    if len(cfg.conditioning_channels) != levels:
        raise LdmError(
            f"conditioning_channels needs {levels} entries, one per halving of the image down to {model_dir}'s "
            f"latents (1/{2 ** (levels - 1)}), got {tuple(cfg.conditioning_channels)}"
        )
    scheduler_config = DDPMScheduler.load_config(model_dir / "scheduler")
    if scheduler_config.get("prediction_type") != "v_prediction":
        raise LdmError(
            f"{model_dir}: the ControlNet stage trains with the v-prediction loss; this model predicts "
            f"{scheduler_config.get('prediction_type', 'epsilon')}"
        )
    return scheduler_config


def load_frozen(model_dir: Path, scheduler_config: dict, device):
    """(text encoder, VAE, UNet, alphas_cumprod) of the model, fp32, frozen."""
    alphas_cumprod = DDPMScheduler.from_config(scheduler_config).alphas_cumprod.to(device)
    text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=torch.float32)
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False).eval().to(device)
    return text_encoder, vae, unet, alphas_cumprod


def train(cfg: ControlNetTrainConfig) -> dict:
    """Train with EMA (resumable); export the EMA ControlNet as an fp16 folder out_dir/controlnets/<name>."""
    model_dir, out_dir = Path(cfg.model_dir), Path(cfg.out_dir)
    scheduler_config = check_model(model_dir, cfg)
    dataset = common.load_dataset(Path(cfg.data_dir), cfg.limit)
    held_out = common.holdout_mask(dataset, cfg.holdout_fraction)
    dataset = dataset.subset(~held_out)
    if len(dataset) == 0:
        raise LdmError(f"no training images left in {cfg.data_dir} after holding out {cfg.holdout_fraction:.0%}")
    images, image_captions = dataset.images, dataset.image_captions
    if cfg.canvas:
        images, source = place_on_canvas(images, cfg.canvas, cfg.object_scale, cfg.placements, cfg.seed)
        image_captions = image_captions[source]
    # the map worker processes fork before this process touches the GPU
    maps = control_maps.make_maps(images.permute(0, 2, 3, 1).numpy(), cfg.seed, cfg.map_workers)

    accelerator = common.make_accelerator(cfg.mixed_precision)
    device = accelerator.device
    torch.manual_seed(cfg.seed)
    # Everything the loop reads is computed once and kept on the device: latents, caption states, control maps.
    maps = torch.from_numpy(maps).to(device)  # (N, kinds, H, W) uint8
    text_encoder, vae, unet, alphas_cumprod = load_frozen(model_dir, scheduler_config, device)
    with accelerator.autocast():
        text_states = encode_captions(text_encoder, dataset.captions, device)  # (C, 77, hidden)
    # fp32 latents, as the UNet stage trained on (it encodes them again outside autocast on a GPU)
    posterior_mean, posterior_std = encode_posteriors(vae, images, device)  # (N, 4, h, w) each
    if device.type == "cuda":
        text_states = text_states.to(torch.bfloat16)
    scaling_factor = vae.config.scaling_factor
    with torch.no_grad(), accelerator.autocast():  # what shifted pairs are padded with: the white background
        white = torch.ones(1, 3, *images.shape[-2:], device=device)
        white_latent = vae.encode(white).latent_dist.mean.float() * scaling_factor
    del text_encoder, vae
    unet.to(memory_format=torch.channels_last)
    image_captions = image_captions.to(device)

    model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(cfg.conditioning_channels))
    model = model.to(memory_format=torch.channels_last)
    model, optimizer, ema, schedule, step, elapsed = common.start_run(accelerator, model, cfg, "controlnet", out_dir)

    n, kinds, batch = len(images), maps.shape[1], min(cfg.batch_size, len(images))
    progress = common.Progress(accelerator, optimizer, schedule, "controlnet samples/s", cfg.log_every, step, elapsed)
    generator = common.process_generator(accelerator, cfg.seed, step)
    model.train()
    for step in progress:
        index = torch.randint(0, n, (batch,), device=device, generator=generator)
        kind = torch.randint(0, kinds, (batch,), device=device, generator=generator)
        control = (maps[index, kind].float() / 255.0)[:, None].expand(-1, 3, -1, -1)  # (B, 3, H, W) in [0, 1]
        caption_ids, dropped, latents = draw_pairs(
            index, image_captions, posterior_mean, posterior_std, scaling_factor, cfg.caption_dropout, generator
        )
        # mirrored only without a caption, which could name a direction ("right arrow")
        mirrorable = dropped if cfg.mirror else torch.zeros_like(dropped)
        latents, control = augment_pairs(latents, control, white_latent, cfg.max_shift, mirrorable, generator)
        denoiser = controlled(model, unet, control.contiguous(memory_format=torch.channels_last))
        with accelerator.autocast():
            loss = diffusion_loss(denoiser, latents, text_states[caption_ids], alphas_cumprod, cfg, generator)
        common.optimizer_step(accelerator, model, optimizer, loss, ema, step)
        progress.done(loss, batch)
    step, elapsed, history = progress.step, progress.finish(), progress.history
    common.save_checkpoint(out_dir / "ckpt.pt", accelerator, model, optimizer, cfg, step, elapsed, ema=ema.state_dict())
    result = {"steps": step, "minutes": elapsed / 60, "history": history, "train_images": n}
    if accelerator.is_main_process:
        folder = export(accelerator.unwrap_model(model), ema, out_dir / EXPORT_SUBDIR / cfg.name)
        result.update(export=str(folder), export_bytes=sum(p.stat().st_size for p in folder.iterdir()))
        (out_dir / "train.json").write_text(json.dumps(result))
    return result


def export(controlnet: ControlNetModel, ema: common.EMA, folder: Path) -> Path:
    """The EMA weights as an fp16 diffusers ControlNet folder, in files under 10 MB (the shipped model's rule)."""
    shipped = ControlNetModel.from_config(controlnet.config)
    ema.copy_to(shipped)
    shipped.half().save_pretrained(folder, max_shard_size="10MB")
    return folder
