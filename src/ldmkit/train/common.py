"""Pieces every training stage shares: the dataset on the device, captions, LR schedule, EMA, checkpoints."""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from ldmkit.data import emoji

EMPTY_CAPTION = ""  # the unconditional caption classifier-free guidance uses


def make_accelerator(mixed_precision: str = "auto") -> Accelerator:
    """bf16 autocast on a GPU, full precision on a CPU (where bf16 is slow and tests must be exact enough)."""
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    # cpu=True lets a torchrun launch on CPUs form a gloo process group (accelerate would run it undistributed)
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


@dataclass
class Dataset:
    """The whole captioned image set as tensors on one device; batches are random index draws, no DataLoader."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    captions: list[str]  # unique captions; captions[0] is the empty caption
    image_captions: torch.Tensor  # (N, 3) int64 ids into captions: name, "name, style", "style of name"
    name_ids: torch.Tensor  # (N,) int64 id of the emoji name (same name in every style -> same id)
    style_ids: torch.Tensor  # (N,) int64 id of the style
    records: list[emoji.EmojiRecord]

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, mask: torch.Tensor) -> Dataset:
        index = mask.nonzero().squeeze(1)
        return dataclasses.replace(
            self,
            images=self.images[index.to(self.images.device)],
            image_captions=self.image_captions[index.to(self.image_captions.device)],
            name_ids=self.name_ids[index.to(self.name_ids.device)],
            style_ids=self.style_ids[index.to(self.style_ids.device)],
            records=[self.records[i] for i in index.tolist()],
        )

    def to(self, device) -> Dataset:
        return dataclasses.replace(
            self,
            images=self.images.to(device),
            image_captions=self.image_captions.to(device),
            name_ids=self.name_ids.to(device),
            style_ids=self.style_ids.to(device),
        )


def load_dataset(data_dir: Path, limit: int | None = None) -> Dataset:
    """Read `ldm data emoji` output into tensors (on the CPU) with a caption table."""
    images, records = emoji.load(Path(data_dir))
    if limit is not None:
        images, records = images[:limit], records[:limit]
    captions = [EMPTY_CAPTION]
    caption_index = {EMPTY_CAPTION: 0}
    names, styles = {}, {}
    image_captions = []
    for record in records:
        ids = []
        for caption in record.captions():
            if caption not in caption_index:
                caption_index[caption] = len(captions)
                captions.append(caption)
            ids.append(caption_index[caption])
        image_captions.append(ids)
        names.setdefault(record.name, len(names))
        styles.setdefault(record.style, len(styles))
    return Dataset(
        images=torch.from_numpy(images[:]).permute(0, 3, 1, 2).contiguous(),  # (N, 3, H, W)
        captions=captions,
        image_captions=torch.tensor(image_captions, dtype=torch.long),
        name_ids=torch.tensor([names[r.name] for r in records], dtype=torch.long),
        style_ids=torch.tensor([styles[r.style] for r in records], dtype=torch.long),
        records=list(records),
    )


def holdout_mask(dataset: Dataset, fraction: float) -> torch.Tensor:
    """True for held-out images: a stable hash of (emoji, set) so every run holds out the same images."""
    keys = [f"{r.package}/{r.key}" for r in dataset.records]
    return torch.tensor([(zlib.crc32(k.encode()) % 10_000) < fraction * 10_000 for k in keys])


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Captions -> (n, 77) token ids, padded the way the pipeline pads prompts."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1], channels_last."""
    return (images_uint8.float() / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)


class SharedClock:
    """Training seconds that every process agrees on, so LR and the time-based stop match across DDP ranks.

    Ranks whose clocks differ by a millisecond would otherwise step with different learning rates (their
    weights drift apart) or stop at different steps (the others hang in the next all-reduce). The clock is
    re-agreed (max over ranks) every `every` steps, which costs one small all-reduce and one host sync.
    """

    def __init__(self, accelerator: Accelerator, elapsed_s: float = 0.0, every: int = 10):
        self.accelerator, self.every = accelerator, every
        self.start = time.perf_counter() - elapsed_s
        self.agreed = elapsed_s

    def elapsed(self, step: int) -> float:
        """The agreed seconds, refreshed every `every` steps (call once per step, on every rank)."""
        if step % self.every == 0:
            self.agree()
        return self.agreed

    def agree(self) -> float:
        local = torch.tensor([time.perf_counter() - self.start], device=self.accelerator.device, dtype=torch.float64)
        self.agreed = float(self.accelerator.reduce(local, reduction="max"))
        return self.agreed


class Progress:
    """The bookkeeping every stage's loop shares: step count, agreed clock, LR schedule, loss meter, log lines.

    `for step in progress:` yields before each step with its learning rate set; the body ends each step
    with `progress.done(loss, batch)`; `progress.finish()` closes the history and returns the agreed seconds.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        optimizer,
        schedule: Schedule,
        label: str,
        log_every: int,
        step: int,
        elapsed_s: float,
    ):
        self.accelerator, self.optimizer, self.schedule = accelerator, optimizer, schedule
        self.label, self.log_every = label, log_every  # label: "clip step {step} ... img/s"
        self.step, self.elapsed = step, elapsed_s
        self.clock, self.meter, self.history = SharedClock(accelerator, elapsed_s), Meter(), []

    def __iter__(self):
        while self.schedule.progress(self.step, elapsed := self.clock.elapsed(self.step)) < 1.0:
            self.elapsed = elapsed
            for group in self.optimizer.param_groups:
                group["lr"] = self.schedule.lr_at(self.step, elapsed)
            yield self.step

    def done(self, loss: torch.Tensor, batch: int) -> None:
        self.meter.add(loss, batch * self.accelerator.num_processes)  # global samples
        self.step += 1
        if self.step % self.log_every == 0:
            mean, rate = self.meter.read()
            self.history.append((self.step, mean))
            stage, unit = self.label.split()
            self.accelerator.print(f"{stage} step {self.step} loss {mean:.4f} {rate:.0f} {unit} {self.elapsed:.0f}s")

    def finish(self) -> float:
        if self.meter.count:
            self.history.append((self.step, self.meter.read()[0]))
        self.elapsed = self.clock.agree()
        return self.elapsed


def process_generator(accelerator: Accelerator, seed: int, step: int) -> torch.Generator:
    """This process's random stream: each DDP rank must draw its own batches, or they average identical gradients."""
    return torch.Generator(accelerator.device).manual_seed(seed + step + 1_000_003 * accelerator.process_index)


class Schedule:
    """Linear warmup then cosine decay to min_lr, driven by progress in steps or wall time, whichever is further."""

    def __init__(self, lr: float, min_lr: float, warmup_steps: int, max_steps: int, max_minutes: float | None):
        self.lr, self.min_lr, self.warmup_steps = lr, min_lr, warmup_steps
        self.max_steps, self.max_minutes = max_steps, max_minutes

    def progress(self, step: int, elapsed_s: float) -> float:
        by_time = elapsed_s / (60 * self.max_minutes) if self.max_minutes else 0.0
        return min(1.0, max(step / self.max_steps, by_time))

    def lr_at(self, step: int, elapsed_s: float) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        ratio = self.progress(step, elapsed_s)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.lr - self.min_lr)


class EMA:
    """Exponential moving average of a model's parameters (what the UNet ships)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = [p.detach().clone().float() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm up so early weights fade fast
        torch._foreach_lerp_(self.params, [p.detach().float() for p in model.parameters()], 1 - decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for ema_p, p in zip(self.params, model.parameters()):
            p.copy_(ema_p.to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "params": self.params}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for p, saved in zip(self.params, state["params"]):
            p.copy_(saved)


def save_checkpoint(
    path: Path, accelerator: Accelerator, model, optimizer, config, step: int, elapsed_s: float, **extra
) -> None:
    """nanoGPT-style checkpoint: model, optimizer, the config that made it, step, and anything stage-specific."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": accelerator.unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": dataclasses.asdict(config),
        "step": step,
        "elapsed_s": elapsed_s,
        **extra,
    }
    if accelerator.is_main_process:
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)


def resume(path: Path, accelerator: Accelerator, model, optimizer, stage: str) -> tuple[int, float, dict | None]:
    """Restore model and optimizer from the stage's checkpoint, if there is one: (step, elapsed s, checkpoint)."""
    checkpoint = load_checkpoint(path)
    if checkpoint is None:
        return 0, 0.0, None
    accelerator.unwrap_model(model).load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    accelerator.print(f"{stage}: resumed at step {checkpoint['step']}")
    return checkpoint["step"], checkpoint["elapsed_s"], checkpoint


def load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


class Meter:
    """Running mean of a loss between log lines, and throughput."""

    def __init__(self):
        self.total, self.count, self.samples, self.t0 = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, batch_size: int) -> None:
        self.total = self.total + loss.detach().float()  # stays on the device: no sync per step
        self.count += 1
        self.samples += batch_size

    def read(self) -> tuple[float, float]:
        mean = float(self.total) / max(self.count, 1)
        rate = self.samples / max(time.perf_counter() - self.t0, 1e-9)
        self.__init__()
        return mean, rate


def optimizer_step(accelerator, model, optimizer, loss, ema: EMA, step: int) -> None:
    """One update of every stage: backward, the gradient norm clipped to 1, the optimizer's step, then the EMA."""
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    ema.update(accelerator.unwrap_model(model), step)


def start_run(accelerator: Accelerator, model, cfg, stage: str, out_dir: Path, params=None, fused: bool = False):
    """What every stage's loop starts from: the EMA of the weights, AdamW over `params` (default: the model's),
    accelerate's wrapping, the LR schedule, and the resume from out_dir/ckpt.pt. fused: AdamW's fused kernel.

    Returns (model, optimizer, ema, schedule, step, elapsed)."""
    ema = EMA(model, cfg.ema_decay)
    params = model.parameters() if params is None else params
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99), fused=fused)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.params = [p.to(accelerator.device) for p in ema.params]
    schedule = Schedule(cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps, cfg.max_minutes)
    step, elapsed, checkpoint = resume(out_dir / "ckpt.pt", accelerator, model, optimizer, stage)
    if checkpoint is not None:
        ema.load_state_dict(checkpoint["ema"])
    return model, optimizer, ema, schedule, step, elapsed
