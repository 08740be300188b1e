"""Stage 4: the text encoder and a 256x256 UNet trained together on scenes synthesised on the fly.

Every step draws fresh scenes (`ldmkit.data.scenes`) in CPU worker processes (layout + caption + tokens), pastes
them on the GPU (`ldmkit.train.compose`), encodes them with the frozen VAE and trains the UNet and the text
encoder jointly on the v objective: the text encoder has to carry word order ("a cat on the left and a rocket
on the right", "X wearing Y") because the denoiser needs it, which a frozen contrastive tower never had to.
Canvas sizes vary per step (square, portrait, landscape, larger), with the layout in size-free units, so 256,
512 and non-square requests draw one coherent picture.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from ldmkit.data import scenes
from ldmkit.errors import LdmError
from ldmkit.train import common
from ldmkit.train.compose import CloseUp, Compositor, scene_batches, to_device
from ldmkit.train.profiling import StepProfiler
from ldmkit.train.unet import SCHEDULER_CONFIG, diffusion_loss

LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


@dataclass
class SceneTrainConfig:
    data_dir: str = ".data/emoji"
    out_dir: str = ".runs/scene"
    vae_dir: str = ".runs/vae/vae"  # frozen; convolutional, so 128 px training carries to 256 px scenes
    text_encoder_dir: str = ".runs/clip/text_encoder"  # the starting point: it already knows the emoji names
    unet_dir: str | None = None  # start from this UNet (an exported scene model's) instead of a new one
    # or build a new one and copy in every weight of this UNet whose name and shape match (e.g. the shipped 128 px
    # model's, with block_out_channels=[64,128,192], layers_per_block=2, attention_heads=[2,4,6]: all of it with
    # top_attention, else all but its top level's attention), so training starts from a UNet that knows the emoji
    init_unet_dir: str | None = None
    # classic, single, pair, count, wearing, floating: a curriculum raises the first two while identity is learned
    scene_shares: tuple[float, ...] = scenes.SceneSampler.DEFAULT_SHARES
    # a classic emoji's side, drawn from this range: 0.5 on a 256 px canvas is 128 px, the scale the sprites (and the
    # shipped 128 px UNet) have; 1.0 fills the canvas with a 2x-upsampled sprite
    classic_size: tuple[float, float] = (1.0, 1.0)
    # the share of classic captions that carry the style phrase; None: about 58% (the tenth run mixed up the three
    # flat sets' styles, docs/training.md)
    classic_style: float | None = None
    # the share of steps that draw only classic emoji filling a close_up_side canvas (their square's side drawn from
    # close_up_size): the 128 px model's data at its own scale. A 0.9-1.0 emoji on 128 px is as many latent pixels
    # as a 0.45-0.5 one on 256 px, so the UNet learns the same drawing at a quarter of the pixels a step, where a
    # classic scene on 256 px spends three quarters of them on white; 0 leaves the stream as it was
    close_up: float = 0.0
    close_up_side: int = 128
    close_up_size: tuple[float, float] = (0.9, 1.0)
    # a UNet that draws close-ups well (the shipped 128 px model's, with text_encoder_dir's encoder): on close-up
    # steps the target is close_up_distill of its prediction and the rest the data's, so the new model keeps what the
    # old one does well (knowledge distillation, on white noise, the teacher's; one forward of it on those steps)
    close_up_teacher: str | None = None
    close_up_distill: float = 0.5
    # a latent pixel's loss weight is 1 + object_weight x the share of it the objects cover (each sample's weights
    # normalised to mean 1): in a scene most pixels are background, and the thirteenth run's UNet drew the
    # backgrounds but not the objects on them (scripts/scene-run/object_error.py); 0 weighs every pixel alike
    object_weight: float = 0.0
    # 16.9M params (34 MB fp16); no attention at the 32x32 level keeps 50 CPU forwards at ~2.2x the old 16x16 cost
    block_out_channels: tuple[int, ...] = (64, 128, 192, 192)
    layers_per_block: int = 1
    attention_heads: tuple[int, ...] = (2, 4, 6, 6)
    # cross-attention at the top (full latent) level too: the shipped layout, so init_unet_dir copies all of it;
    # measured on this 2-core CPU, (64,128,192) x2 at 32x32 latents: 2.58 s per 25 guided steps with it, 1.56 without
    top_attention: bool = False
    norm_num_groups: int = 32
    # (height, width, share of steps): the batch shrinks with the area so every step costs about the same
    sizes: tuple = ((256, 256, 0.6), (256, 384, 0.1), (384, 256, 0.1), (384, 384, 0.1), (512, 512, 0.1))
    batch_size: int = 256  # at the first size; smaller at larger sizes
    max_steps: int = 100_000
    max_minutes: float | None = None  # the whole run's budget: the LR schedule ends there
    session_minutes: float | None = None  # stop this process after this long (checkpointed; resume continues)
    lr: float = 5e-4
    text_lr_scale: float = 0.4  # the text encoder starts trained: move it more gently (0: keep it frozen)
    min_lr: float = 2e-5
    warmup_steps: int = 300
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    # multi-resolution training noise (train.unet.pyramid_noise): at 32x32 latents white noise lets the model read
    # backgrounds off the seed; 0.6 makes the mean of a quadrant or half ~3x noisier than white noise does
    noise_discount: float = 0.0
    ema_decay: float = 0.999
    # the UNet's memory layout ("channels_last" or "contiguous") and AdamW's fused CUDA kernel: a step is bound by
    # kernel launches and layout copies more than by the GPU (twelfth run's profile); `python -m benchmarks scene-step
    # --variants` times each choice on its own
    unet_layout: str = "channels_last"
    fused_adamw: bool = False
    # torch.compile the frozen VAE encoder: on one H200 (batch 256 at 256 px, bf16) its encode took 96 ms eager and
    # 29 ms compiled (14 s to compile, once per canvas size), next to 126 ms for the UNet's step
    compile_vae: bool = False
    workers: int = 6  # CPU processes drawing scenes and tokenizing captions
    checkpoint_minutes: float = 3.0
    log_every: int = 100
    # profile this many steps after profile_skip more (compiles done) and print where the time went (train.profiling)
    profile_steps: int = 0
    profile_skip: int = 60
    seed: int = 0
    limit: int | None = None
    mixed_precision: str = "auto"


class TextToNoise(torch.nn.Module):
    """Text encoder and UNet as one module, so DDP synchronises both and one EMA tracks both."""

    def __init__(self, text_encoder: CLIPTextModel, unet: UNet2DConditionModel):
        super().__init__()
        self.text_encoder, self.unet = text_encoder, unet

    def forward(self, noisy, timesteps, tokens):
        return self.unet(noisy, timesteps, self.text_encoder(tokens).last_hidden_state)


class _Bound(torch.nn.Module):
    """diffusion_loss calls unet(noisy, t, states); here the 'states' are tokens and the text encoder runs inside."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, noisy, timesteps, tokens):
        return _Sample(self.model(noisy, timesteps, tokens))


class _Sample:
    def __init__(self, output):
        self.sample = output.sample


def build_unet(cfg: SceneTrainConfig, cross_attention_dim: int) -> UNet2DConditionModel:
    levels = len(cfg.block_out_channels)
    top = "CrossAttn" if cfg.top_attention else ""
    return UNet2DConditionModel(
        sample_size=32,  # 256x256 by default: the pipeline's default size is sample_size * 8
        in_channels=4,
        out_channels=4,
        down_block_types=(f"{top}DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + (f"{top}UpBlock2D",),
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=tuple(cfg.attention_heads),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=cfg.norm_num_groups,
    )


def copy_matching(model: torch.nn.Module, source: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    """Copy each tensor of `source` into the model's tensor of the same name and shape; returns (copied, the model's
    names left as they were)."""
    copied, left = 0, []
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in source and source[name].shape == tensor.shape:
                tensor.copy_(source[name])
                copied += 1
            else:
                left.append(name)
    if copied == 0:
        raise LdmError("init_unet_dir: no weight matches the scene UNet by name and shape; check block_out_channels")
    return copied, left


def train(cfg: SceneTrainConfig) -> dict:
    """Train (resumable from out_dir/ckpt.pt); export EMA weights to out_dir/{unet,text_encoder,scheduler}."""
    if not (isinstance(cfg.close_up, (int, float)) and 0 <= cfg.close_up <= 1):
        raise LdmError(f"close_up: expected a share from 0 to 1, got {cfg.close_up}")
    if cfg.close_up and not 0 < cfg.close_up_size[0] <= cfg.close_up_size[1] <= 1:
        raise LdmError(f"close_up_size: expected 0 < low <= high <= 1, got {cfg.close_up_size}")
    if cfg.close_up_teacher and not (cfg.close_up and 0 < cfg.close_up_distill <= 1):
        raise LdmError("close_up_teacher needs close_up > 0 and close_up_distill from 0 (excluded) to 1")
    if cfg.close_up_teacher and not (Path(cfg.close_up_teacher) / "config.json").is_file():
        raise LdmError(f"close_up_teacher {cfg.close_up_teacher}: not a diffusers UNet folder (no config.json)")
    if not (isinstance(cfg.object_weight, (int, float)) and cfg.object_weight >= 0):
        raise LdmError(f"object_weight: expected a number from 0 up, got {cfg.object_weight!r}")
    if cfg.unet_layout not in LAYOUTS:
        raise LdmError(f"unet_layout: expected one of {', '.join(LAYOUTS)}, got {cfg.unet_layout!r}")
    if not isinstance(cfg.fused_adamw, bool):
        raise LdmError(f"fused_adamw: expected true or false, got {cfg.fused_adamw!r}")
    layout = LAYOUTS[cfg.unet_layout]
    accelerator = common.make_accelerator(cfg.mixed_precision)
    device = accelerator.device
    try:
        profiler = StepProfiler(cfg.profile_steps if accelerator.is_main_process else 0, cfg.profile_skip, device)
    except ValueError as error:
        raise LdmError(str(error)) from None
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    sprites, sampler = scenes.load_sampler(
        Path(cfg.data_dir), cfg.limit, cfg.scene_shares, cfg.classic_size, cfg.classic_style
    )
    compositor = Compositor(sprites, device)
    del sprites
    close_up = CloseUp(cfg.close_up, cfg.close_up_side, sampler.classic_only(cfg.close_up_size))

    vae = AutoencoderKL.from_pretrained(cfg.vae_dir, torch_dtype=torch.float32).to(device).eval().requires_grad_(False)
    vae = vae.to(memory_format=torch.channels_last)
    if cfg.compile_vae:
        vae.encoder = torch.compile(vae.encoder)
    text_encoder = CLIPTextModel.from_pretrained(cfg.text_encoder_dir, torch_dtype=torch.float32)
    if cfg.unet_dir and cfg.init_unet_dir:
        raise LdmError("unet_dir and init_unet_dir both set: start from one UNet")
    if cfg.unet_dir:
        unet = UNet2DConditionModel.from_pretrained(cfg.unet_dir, torch_dtype=torch.float32)
    else:
        unet = build_unet(cfg, text_encoder.config.hidden_size)
        if cfg.init_unet_dir:
            copied, left = copy_matching(unet, UNet2DConditionModel.from_pretrained(cfg.init_unet_dir).state_dict())
            if accelerator.is_main_process:
                new = f": {', '.join(left[:4])}{', ...' if len(left) > 4 else ''}" if left else ""
                print(f"init_unet_dir: {copied} tensors copied, {len(left)} new{new}", flush=True)
    unet = unet.to(memory_format=layout)
    model = TextToNoise(text_encoder, unet).to(device)
    groups = [{"params": list(model.unet.parameters()), "scale": 1.0}]
    if cfg.text_lr_scale > 0:
        groups.append({"params": list(model.text_encoder.parameters()), "scale": cfg.text_lr_scale})
    else:  # frozen: no gradients, no optimizer state (and the EMA copy stays the weights it started from)
        model.text_encoder.requires_grad_(False)
    model, optimizer, ema, schedule, step, elapsed = common.start_run(
        accelerator, model, cfg, "scene", out_dir, groups, fused=cfg.fused_adamw
    )
    teacher = None
    if cfg.close_up_teacher:  # frozen, with a frozen copy of the text encoder the run started from
        teacher = _Bound(
            TextToNoise(
                CLIPTextModel.from_pretrained(cfg.text_encoder_dir, torch_dtype=torch.float32),
                UNet2DConditionModel.from_pretrained(cfg.close_up_teacher, torch_dtype=torch.float32),
            )
            .to(device)
            .eval()
            .requires_grad_(False)
        )
    alphas_cumprod = DDPMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod.to(device)
    scaling_factor = vae.config.scaling_factor

    seed = cfg.seed + step + 7919 * accelerator.process_index
    stream = scene_batches(sampler, cfg.sizes, cfg.batch_size, cfg.workers, seed, cfg.caption_dropout, close_up)
    progress = common.Progress(accelerator, optimizer, schedule, "scene samples/s", cfg.log_every, step, elapsed)
    generator = common.process_generator(accelerator, cfg.seed, step)
    bound = _Bound(model)
    last_save = session_start = elapsed
    model.train()
    for step in progress:
        if cfg.session_minutes and progress.elapsed - session_start > 60 * cfg.session_minutes:
            break  # the agreed clock: every rank stops at the same step
        for group in optimizer.param_groups:
            group["lr"] *= group["scale"]
        asked = time.perf_counter()
        height, width, scene_batch, tokens, canonical_tokens = next(stream)
        profiler.waited(time.perf_counter() - asked)
        scene_batch = to_device(scene_batch, device)
        with torch.no_grad(), accelerator.autocast():
            if cfg.object_weight:  # the objects' cover too, drawn only when the loss weighs it
                images, covered = compositor(scene_batch, height, width, generator, coverage=True)
            else:
                images, covered = compositor(scene_batch, height, width, generator), None
            # (the VAE stays channels-last, the layout its compiled encode was measured in)
            posterior = vae.encode(images.contiguous(memory_format=torch.channels_last)).latent_dist
            noise = torch.randn(posterior.mean.shape, device=device, generator=generator)
            latents = (posterior.mean + posterior.std * noise).float() * scaling_factor
            pixel_weight = None
            if covered is not None:  # the objects' cover of each latent pixel (the VAE's 8x8 pixels)
                pixel_weight = 1 + cfg.object_weight * F.adaptive_avg_pool2d(covered.float(), latents.shape[-2:])
        with accelerator.autocast():
            taught = {}
            if teacher is not None and canonical_tokens is not None:  # a close-up, asked in the teacher's words
                # on white noise, the noise the teacher (the 128 px model) was trained on: its answer to
                # multi-resolution noise may read the coarse noise as a background, which it would then teach
                taught = dict(teacher=teacher, distill=cfg.close_up_distill, teacher_states=canonical_tokens.to(device),
                              noise_discount=0.0)  # fmt: skip
            loss = diffusion_loss(
                bound, latents, tokens.to(device), alphas_cumprod, cfg, generator, memory_format=layout,
                pixel_weight=pixel_weight, **taught,
            )  # fmt: skip
        common.optimizer_step(accelerator, model, optimizer, loss, ema, step)
        progress.done(loss, latents.shape[0])
        profiler.step_done()
        if progress.elapsed - last_save > 60 * cfg.checkpoint_minutes:
            last_save = progress.elapsed
            common.save_checkpoint(
                out_dir / "ckpt.pt", accelerator, model, optimizer, cfg, progress.step, progress.elapsed,
                ema=ema.state_dict(),
            )  # fmt: skip
    step, elapsed, history = progress.step, progress.finish(), progress.history
    common.save_checkpoint(out_dir / "ckpt.pt", accelerator, model, optimizer, cfg, step, elapsed, ema=ema.state_dict())
    if accelerator.is_main_process:
        export(accelerator.unwrap_model(model), ema, out_dir)
        (out_dir / "train.json").write_text(json.dumps({"steps": step, "minutes": elapsed / 60, "history": history}))
    return {"steps": step, "minutes": elapsed / 60, "history": history}


def export(model: TextToNoise, ema: common.EMA, out_dir: Path) -> None:
    """EMA weights as fp16 diffusers folders out_dir/unet and out_dir/text_encoder, and the scheduler config."""
    shipped = TextToNoise(CLIPTextModel(model.text_encoder.config), UNet2DConditionModel.from_config(model.unet.config))
    ema.copy_to(shipped)
    shipped.unet.half().save_pretrained(out_dir / "unet")
    shipped.text_encoder.half().save_pretrained(out_dir / "text_encoder")
    DDPMScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(out_dir / "scheduler")
