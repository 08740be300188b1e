"""Stage `phrasing`: the shipped model's text encoder learns the ways people type names ("a cat", "a cup of coffee").

The 128 px UNet learned each emoji from three captions ("otter", "otter, 3d render", "3d render of otter") as the
frozen text encoder states them. Typed any other way, prompts miss: in "a cat" the token "a" is the letter-a
button's. Here a copy of that encoder (the student) reads captions drawn as people write them (the scene data's
single-emoji captions: articles, adjectives, "emoji"/"icon" frames, style phrases before or after, emojilib
keywords such as "coffee", dropped articles) and learns to give the states the frozen encoder (the teacher) gives
the caption's canonical form. The UNet, the VAE and the ControlNet are unchanged; about half the captions are
canonical already and are learned as themselves, so the names and styles drawn before stay.

CLIP's text encoder is causal: a token's state sees only the tokens before it, so "a" cannot be told it starts
"a cat". The targets are aligned so that every one can be reached (`target_positions`): the typed caption's last
content tokens take the canonical content tokens' states from the right, its earlier words the start token's
state, its end token and padding the canonical end token's and padding's.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPTextModel

from ldmkit.data import scenes
from ldmkit.loading import DEFAULT_MODEL_DIR, load_tokenizer
from ldmkit.train import common
from ldmkit.train.export import MAX_SHARD

END_OF_TEXT = 49407  # CLIP's end token, which is also its padding


@dataclass
class PhrasingTrainConfig:
    data_dir: str = ".data/emoji"
    out_dir: str = ".runs/phrasing"
    text_encoder_dir: str = str(DEFAULT_MODEL_DIR / "text_encoder")  # the teacher, and the student's start
    batch_size: int = 128  # caption pairs per step
    empty_share: float = 0.05  # the empty prompt (guidance's unconditional half) must stay as it is
    max_steps: int = 100_000
    max_minutes: float | None = None
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.995  # runs are short (about 1,000 steps on a 2-core CPU in 15 minutes)
    log_every: int = 100
    seed: int = 0
    limit: int | None = None
    mixed_precision: str = "auto"


def target_positions(student_ids: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) token ids of the typed and the canonical captions -> (B, L): for each student position, the teacher
    position whose state it learns (see the module's docstring)."""
    batch, length = student_ids.shape
    n_student = (student_ids == END_OF_TEXT).int().argmax(-1)[:, None] - 1  # content tokens (after the start token)
    n_teacher = (teacher_ids == END_OF_TEXT).int().argmax(-1)[:, None] - 1
    position = torch.arange(length, device=student_ids.device)[None].expand(batch, length)
    from_end = n_student - position  # 0 at the student's last content token
    aligned = (position >= 1) & (from_end >= 0) & (from_end < torch.minimum(n_student, n_teacher))
    target = torch.where(aligned, n_teacher - from_end, torch.zeros_like(position))  # unaligned words: the start
    target = torch.where(position == n_student + 1, (n_teacher + 1).expand(batch, length), target)
    padding = torch.clamp(torch.maximum(position, n_teacher + 2), max=length - 1)
    return torch.where(position > n_student + 1, padding, target)


def draw_pairs(sampler: scenes.SceneSampler, rng: random.Random, count: int, empty_share: float):
    """`count` (typed caption, canonical caption) pairs; the empty prompt is its own canonical form."""
    return [("", "") if rng.random() < empty_share else sampler.caption_pair(rng) for _ in range(count)]


def train(cfg: PhrasingTrainConfig) -> dict:
    accelerator = common.make_accelerator(cfg.mixed_precision)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    _, sampler = scenes.load_sampler(cfg.data_dir, cfg.limit)
    tokenizer = load_tokenizer()
    teacher = CLIPTextModel.from_pretrained(cfg.text_encoder_dir, torch_dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    student, optimizer, ema, schedule, step, elapsed = common.start_run(accelerator, student, cfg, "phrasing", out_dir)
    teacher.to(accelerator.device)
    progress = common.Progress(accelerator, optimizer, schedule, "phrasing pairs/s", cfg.log_every, step, elapsed)
    # a stream per process and per resume, as the other stages draw theirs
    rng = random.Random(cfg.seed + step + 1_000_003 * accelerator.process_index)
    for step in progress:
        pairs = draw_pairs(sampler, rng, cfg.batch_size, cfg.empty_share)
        typed = common.tokenize(tokenizer, [t for t, _ in pairs]).to(accelerator.device)
        canonical = common.tokenize(tokenizer, [c for _, c in pairs]).to(accelerator.device)
        with torch.no_grad():
            teacher_states = teacher(canonical).last_hidden_state
        index = target_positions(typed, canonical)[:, :, None].expand_as(teacher_states)
        with accelerator.autocast():
            states = student(typed).last_hidden_state
        loss = F.mse_loss(states.float(), torch.gather(teacher_states, 1, index))
        common.optimizer_step(accelerator, student, optimizer, loss, ema, step)
        progress.done(loss, cfg.batch_size)
    step, elapsed, history = progress.step, progress.finish(), progress.history
    common.save_checkpoint(
        out_dir / "ckpt.pt", accelerator, student, optimizer, cfg, step, elapsed, ema=ema.state_dict()
    )
    if accelerator.is_main_process:
        export(accelerator.unwrap_model(student), ema, out_dir)
    return {"steps": step, "minutes": elapsed / 60, "history": history}


def export(student: CLIPTextModel, ema: common.EMA, out_dir: Path) -> None:
    """The EMA weights as out_dir/text_encoder (fp16, shards under 15 MB): a drop-in for the model's text_encoder."""
    shipped = copy.deepcopy(student).float().cpu()
    ema.copy_to(shipped)
    shipped.half().save_pretrained(out_dir / "text_encoder", max_shard_size=MAX_SHARD)
