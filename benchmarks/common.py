"""What several scenarios share: the SD1.5-shaped random model on disk, where results go, the environment."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path


def save_random_sd15(folder: Path) -> Path:
    """SD1.5-shaped random fp16 weights (ldm bench's) as a diffusers folder, written once: speed does not depend
    on the values."""
    if (folder / "model_index.json").exists():
        return folder
    import torch

    from ldmkit.bench import random_sd15
    from ldmkit.loading import save_pretrained

    components = random_sd15(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    for module in (components.unet, components.vae, components.text_encoder):
        module.half()
    return save_pretrained(components, folder)


def out_dir(path: str | Path) -> Path:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def describe_environment(out: Path) -> dict:
    """Versions and the GPUs, printed and written to OUT/env.json, so every result names its setup."""
    import diffusers
    import torch
    import transformers

    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "gpus": gpus,
        "commit": git_commit(),
    }
    print(json.dumps(env), flush=True)
    (out / "env.json").write_text(json.dumps(env, indent=1))
    return env


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return result.stdout.strip() or None
