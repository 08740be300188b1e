"""Stage 1: a small CLIP (text tower + image tower) trained contrastively on the emoji captions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

from ldmkit.loading import load_tokenizer
from ldmkit.train import common


@dataclass
class ClipTrainConfig:
    data_dir: str = ".data/emoji"
    out_dir: str = ".runs/clip"
    # text tower: hidden_size 128 keeps the 49408-token embedding at 12.6 MB in fp16 (under the 15 MB file limit)
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    # image tower: a small ViT on 64x64 downsampled images, 8x8 patches -> 64 tokens
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 256
    vision_layers: int = 4
    vision_heads: int = 4
    projection_dim: int = 128
    batch_size: int = 1024
    max_steps: int = 3000
    max_minutes: float | None = None  # stop (and finish the LR decay) at this wall time, whichever comes first
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 200
    weight_decay: float = 0.1
    log_every: int = 100
    seed: int = 0
    limit: int | None = None  # use only the first N images (smoke tests)
    # Random framing: each training image is drawn at a side of `framing` (low, high) times the frame, at a random
    # place, on white. (1, 1), the default, keeps every emoji exactly where its set draws it. An eval CLIP trained
    # so memorises that framing: cut from a scene with a margin 4% off, the real sprites lose a third of their
    # top-1 (docs/training.md, "Seventh run"). (0.6, 1.15) lets it name an object however a crop frames it.
    framing: tuple[float, float] = (1.0, 1.0)
    mixed_precision: str = "auto"


def build_model(cfg: ClipTrainConfig) -> CLIPModel:
    text = {
        "vocab_size": 49408,
        "hidden_size": cfg.text_hidden,
        "intermediate_size": 4 * cfg.text_hidden,
        "num_hidden_layers": cfg.text_layers,
        "num_attention_heads": cfg.text_heads,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    vision = {
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_size": cfg.vision_hidden,
        "intermediate_size": 4 * cfg.vision_hidden,
        "num_hidden_layers": cfg.vision_layers,
        "num_attention_heads": cfg.vision_heads,
        "num_channels": 3,
    }
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim))


def prepare_images(images_uint8: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, 3, 128, 128) uint8 -> (B, 3, s, s) float in [-1, 1], area-downsampled for the image tower."""
    images = images_uint8.float() / 127.5 - 1.0
    if images.shape[-1] != image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="area")
    return images


def random_framing(images: torch.Tensor, framing: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """(B, 3, s, s) images in [-1, 1] on white -> each redrawn at a side drawn from `framing` times the frame
    (above 1: zoomed in), shifted anywhere it stays in the frame (or covers it), with white around it."""
    low, high = framing
    if low == high == 1.0:
        return images
    batch, device = images.shape[0], images.device
    scale = low + (high - low) * torch.rand(batch, device=device, generator=generator)
    room = (1 - scale).abs()  # how far the centre may move, in units of the half-frame
    shift = (torch.rand(batch, 2, device=device, generator=generator) * 2 - 1) * room[:, None]
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale  # output -> input coordinates: a scale-s picture
    theta[:, :, 2] = -shift / scale[:, None]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # sampled as the distance below white, so the zero padding outside the picture is white
    return F.grid_sample(images.float() - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1


def contrastive_loss(image_embeds, text_embeds, logit_scale, positives) -> torch.Tensor:
    """Symmetric InfoNCE with several positives per row (the same name in 4 styles answers a name-only caption)."""
    logits = logit_scale.exp() * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T  # (B, B)
    targets = positives.float()
    loss_i = -(targets / targets.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t = -(targets.T / targets.T.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (loss_i + loss_t) / 2


def train(cfg: ClipTrainConfig) -> dict:
    """Train, checkpoint (resumable), and export the text tower to out_dir/text_encoder and the CLIP to out_dir/clip."""
    accelerator = common.make_accelerator(cfg.mixed_precision)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    dataset = common.load_dataset(Path(cfg.data_dir), cfg.limit).to(accelerator.device)
    tokens = common.tokenize(load_tokenizer(), dataset.captions).to(accelerator.device)  # (C, 77)
    # The pooled embedding sits at the first end-of-text token, so trailing padding changes nothing: trim it.
    text_len = int((tokens != 49407).sum(1).max()) + 1
    tokens = tokens[:, :text_len]

    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = common.Schedule(cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps, cfg.max_minutes)
    step, elapsed, _ = common.resume(out_dir / "ckpt.pt", accelerator, model, optimizer, "clip")

    n, batch = len(dataset), min(cfg.batch_size, len(dataset))
    progress = common.Progress(accelerator, optimizer, schedule, "clip img/s", cfg.log_every, step, elapsed)
    generator = common.process_generator(accelerator, cfg.seed, step)
    model.train()
    for _ in progress:
        index = torch.randperm(n, device=accelerator.device, generator=generator)[:batch]
        variant = torch.randint(0, 3, (batch,), device=accelerator.device, generator=generator)
        caption_ids = dataset.image_captions[index, variant]  # (B,)
        # text j describes image i if it is one of image i's captions: a name-only caption fits every style
        positives = dataset.image_captions[index][:, :, None].eq(caption_ids[None, None, :]).any(1)  # (B, B)
        with accelerator.autocast():
            pixels = random_framing(prepare_images(dataset.images[index], cfg.image_size), cfg.framing, generator)
            out = model(input_ids=tokens[caption_ids], pixel_values=pixels)
            loss = contrastive_loss(
                out.image_embeds, out.text_embeds, accelerator.unwrap_model(model).logit_scale, positives
            )
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        with torch.no_grad():
            accelerator.unwrap_model(model).logit_scale.clamp_(0, 4.6052)  # temperature >= 0.01, as in CLIP
        progress.done(loss, batch)
    step, elapsed, history = progress.step, progress.finish(), progress.history
    common.save_checkpoint(out_dir / "ckpt.pt", accelerator, model, optimizer, cfg, step, elapsed)
    if accelerator.is_main_process:
        export(accelerator.unwrap_model(model), out_dir)
    return {"steps": step, "minutes": elapsed / 60, "history": history}


def export(model: CLIPModel, out_dir: Path) -> None:
    """The text tower as a standalone CLIPTextModel (the frozen text encoder) and the whole CLIP (for eval)."""
    model = model.float().cpu()
    text_encoder = CLIPTextModel(model.config.text_config)
    # transformers 5 flattened CLIPTextModel (no .text_model); older versions wrap the same transformer
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(model.text_model.state_dict())
    text_encoder.half().save_pretrained(out_dir / "text_encoder")
    model.half().save_pretrained(out_dir / "clip")
