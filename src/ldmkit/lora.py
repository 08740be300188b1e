"""LoRA for one request: `<lora:NAME:weight>` prompt tags, files in a LoRA folder, applied then removed again.

diffusers loads the files (kohya/A1111 and diffusers/peft layouts, UNet and text encoder) as unfused peft
adapters: the model's own weights are never modified, so removing the adapters restores them bit for bit.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors import safe_open

from ldmkit.errors import InvalidRequest, LdmError

LORA_SUFFIX = ".safetensors"
# A1111's extra-network tag: <lora:NAME> or <lora:NAME:WEIGHT>
_LORA_TAG = re.compile(r"<lora:([^>]+)>")


class LoraTarget(Protocol):
    """What a LoRA is applied to: `Components`, or a pipeline holding the same modules."""

    tokenizer: object
    text_encoder: object
    unet: object
    vae: object


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its `<lora:NAME:WEIGHT>` tags, and the (NAME, WEIGHT) pairs; WEIGHT defaults to 1.0."""
    loras = [_parse_tag(match.group(1)) for match in _LORA_TAG.finditer(prompt)]
    return _LORA_TAG.sub("", prompt), loras  # A1111 removes the tag alone, leaving the spaces around it


def _parse_tag(args: str) -> tuple[str, float]:
    name, *weights = args.split(":")
    if len(weights) > 1:
        raise InvalidRequest(f"<lora:{args}>: only one weight is supported, as in <lora:{name}:0.8>")
    try:
        return name, float(weights[0]) if weights else 1.0
    except ValueError:
        raise InvalidRequest(f"<lora:{args}>: the weight '{weights[0]}' is not a number") from None


def resolve_lora(name: str, lora_dir: str | os.PathLike) -> Path:
    """The file `NAME.safetensors` in `lora_dir` or one of its subfolders (A1111 names a LoRA by its file stem)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise InvalidRequest(f"LoRA name '{name}' must be a file name without folders")
    lora_dir = Path(lora_dir)
    matches = sorted(p for p in lora_dir.rglob(f"*{LORA_SUFFIX}") if p.stem == name and p.is_file())
    if not matches:
        raise LdmError(f"LoRA '{name}' not found: no {name}{LORA_SUFFIX} in the LoRA folder")
    if len(matches) > 1:
        raise LdmError(f"LoRA '{name}' is ambiguous: {', '.join(p.relative_to(lora_dir).as_posix() for p in matches)}")
    return matches[0]


@contextmanager
def applied_loras(target: LoraTarget, loras: list[tuple[str | os.PathLike, float]]) -> Iterator[None]:
    """Apply LoRA files with their weights to the target's UNet and text encoder, and remove them on exit.

    The weight scales the file's update as in A1111 (weight * alpha / rank * up @ down). Requests must not
    overlap on the same modules: the adapters live in them while the context is open, and on exit every
    LoRA layer leaves them, so a LoRA loaded in some other way would go too.
    """
    if not loras:
        yield
        return
    host = _diffusers_host(target)
    names = [f"ldmkit_lora_{i}" for i in range(len(loras))]
    try:
        for name, (path, _) in zip(names, loras, strict=True):
            _load(host, Path(path), name)
        host.set_adapters(names, adapter_weights=[weight for _, weight in loras])
        yield
    finally:
        host.unload_lora_weights()  # takes the peft layers out again, leaving the original modules


def _diffusers_host(target: LoraTarget) -> StableDiffusionPipeline:
    """A throwaway diffusers pipeline around the target's own modules (no copies), for its LoRA loader."""
    return StableDiffusionPipeline(
        vae=target.vae,
        text_encoder=target.text_encoder,
        tokenizer=target.tokenizer,
        unet=target.unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),  # unused; these settings keep diffusers quiet
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _load(host: StableDiffusionPipeline, path: Path, adapter_name: str) -> None:
    if path.suffix != LORA_SUFFIX or not path.is_file():
        raise LdmError(f"LoRA file not found or not {LORA_SUFFIX}: {path.name}")
    try:
        with warnings.catch_warnings():
            # peft warns about every adapter after the first; several at once is what we ask for.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            host.load_lora_weights(str(path), adapter_name=adapter_name)
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        raise LdmError(f"cannot apply LoRA {path.name} to this model: {error}") from None


def lora_hashes_infotext(loras: list[tuple[str, str | os.PathLike]]) -> dict:
    """{"Lora hashes": "name: hash, ..."} as A1111 writes it, for (name as written in the prompt, file) pairs."""
    # A1111 drops ':' and ',' from names: they would break the "name: hash, ..." list.
    hashes = {name.replace(":", "").replace(",", ""): lora_shorthash(path) for name, path in loras}
    return {"Lora hashes": ", ".join(f"{name}: {short}" for name, short in hashes.items())} if hashes else {}


def lora_shorthash(path: str | os.PathLike) -> str:
    """A1111's short LoRA hash: the first 12 hex digits of the file's full hash."""
    path = Path(path)
    stat = path.stat()
    return _lora_hash(path.resolve(), stat.st_mtime_ns, stat.st_size)[:12]


@lru_cache(maxsize=256)
def _lora_hash(path: Path, mtime_ns: int, size: int) -> str:
    """kohya's `sshs_model_hash` if the file stores one, else the "addnet" hash: sha256 of the tensor data after
    the header, so editing metadata keeps the hash. Cached per version of the file (mtime, size)."""
    with safe_open(path, "pt") as file:
        stored = (file.metadata() or {}).get("sshs_model_hash")
    if stored:
        return stored
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        file.seek(8 + header_size)
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
