"""Assemble the three trained stages into one diffusers folder (StableDiffusionPipeline layout, fp16)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ldmkit import model_defaults
from ldmkit.loading import CONFIGS_DIR, load_tokenizer

MAX_SHARD = "10MB"  # no shipped file over 15 MB; a tensor larger than a shard gets its own file


def assemble(
    text_encoder_dir: Path,
    vae_dir: Path,
    unet_dir: Path,
    scheduler_dir: Path,
    out_dir: Path,
    licenses: Path | None = None,
    default_guidance: float | None = None,
) -> Path:
    """Write model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ as save_pretrained does.

    `default_guidance` is written to the folder's ldmkit.json (ldmkit.model_defaults). Without it, an ldmkit.json
    already in `out_dir` is kept: it was measured for the model exported there before, so measure again (`ldm eval
    --guidance`) after a new recipe and give the new one (`ldm train export --default-guidance`)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float16),
        text_encoder=CLIPTextModel.from_pretrained(text_encoder_dir, torch_dtype=torch.float16),
        tokenizer=load_tokenizer(),
        unet=UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float16),
        scheduler=DDPMScheduler.from_pretrained(scheduler_dir),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    defaults = out_dir / model_defaults.FILE_NAME
    kept_defaults = defaults.read_bytes() if defaults.is_file() else None
    if out_dir.exists():
        shutil.rmtree(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True, max_shard_size=MAX_SHARD)
    if default_guidance is not None:
        model_defaults.write_default_guidance(out_dir, default_guidance)
    elif kept_defaults is not None:
        defaults.write_bytes(kept_defaults)
    write_tokenizer(out_dir / "tokenizer")
    if licenses is not None:
        shutil.copy(licenses, out_dir / "LICENSES.md")
    return out_dir


def write_tokenizer(folder: Path) -> None:
    """SD's tokenizer layout (vocab.json + merges.txt, 1.5 MB) instead of a 3.6 MB tokenizer.json."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(CONFIGS_DIR / "clip-tokenizer" / name, folder / name)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 77,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def folder_report(folder: Path) -> dict:
    """Total bytes and the largest file of a model folder (the shipping limits are 60 MB and 15 MB)."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    return {
        "total_bytes": sum(p.stat().st_size for p in files),
        "largest_file": str(largest.relative_to(folder)),
        "largest_bytes": largest.stat().st_size,
        "files": len(files),
    }


if __name__ == "__main__":
    import sys

    print(json.dumps(folder_report(Path(sys.argv[1])), indent=1))
