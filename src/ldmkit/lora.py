"""LoRA for one request: `<lora:NAME:weight>` prompt tags, files in a LoRA folder, applied then removed again.

diffusers loads the files (kohya/A1111 and diffusers/peft layouts, UNet and text encoder) as unfused peft
adapters: the model's own weights are never modified, so removing the adapters restores them bit for bit.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ldmkit.errors import InvalidRequest, LdmError

LORA_SUFFIX = ".safetensors"
# A1111's extra-network tag: <lora:NAME> or <lora:NAME:WEIGHT>
_LORA_TAG = re.compile(r"<lora:([^>]+)>")


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its `<lora:NAME:WEIGHT>` tags, and the (NAME, WEIGHT) pairs; WEIGHT defaults to 1.0."""
    loras = [_parse_tag(match.group(1)) for match in _LORA_TAG.finditer(prompt)]
    return strip_lora_tags(prompt), loras


def strip_lora_tags(prompt: str) -> str:
    return _LORA_TAG.sub("", prompt)  # A1111 removes the tag alone, leaving the spaces around it


def prompt_loras(prompts: tuple[str, ...] | list[str]) -> list[tuple[str, float]]:
    """The distinct (NAME, WEIGHT) pairs the prompts' tags ask for, in order of first use.

    A tag repeated is one LoRA (applied once); the same NAME with two weights is refused, as neither can be meant.
    Names are checked here (no folders), before any file is looked up.
    """
    weights: dict[str, float] = {}
    for prompt in prompts:
        for name, weight in extract_lora_tags(prompt)[1]:
            check_lora_name(name)
            if weights.setdefault(name, weight) != weight:
                raise InvalidRequest(f"<lora:{name}> is given two weights, {weights[name]} and {weight}; give one")
    return list(weights.items())


def check_lora_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise InvalidRequest(f"LoRA name '{name}' must be a file name without folders")


def _parse_tag(args: str) -> tuple[str, float]:
    name, *weights = args.split(":")
    if len(weights) > 1:
        raise InvalidRequest(f"<lora:{args}>: only one weight is supported, as in <lora:{name}:0.8>")
    try:
        weight = float(weights[0]) if weights else 1.0
    except ValueError:
        raise InvalidRequest(f"<lora:{args}>: the weight '{weights[0]}' is not a number") from None
    if not math.isfinite(weight):
        raise InvalidRequest(f"<lora:{args}>: the weight must be a finite number")
    return name, weight


def resolve_lora(name: str, lora_dir: str | os.PathLike) -> Path:
    """The file `NAME.safetensors` in `lora_dir` or one of its subfolders (A1111 names a LoRA by its file stem)."""
    check_lora_name(name)
    lora_dir = Path(lora_dir)
    matches = sorted(p for p in lora_dir.rglob(f"*{LORA_SUFFIX}") if p.stem == name and p.is_file())
    if not matches:
        raise LdmError(f"LoRA '{name}' not found: no {name}{LORA_SUFFIX} in the LoRA folder")
    if len(matches) > 1:
        raise LdmError(f"LoRA '{name}' is ambiguous: {', '.join(p.relative_to(lora_dir).as_posix() for p in matches)}")
    return matches[0]


def check_lora_file(path: Path) -> None:
    """Refuse (InvalidRequest) before any compute a file that is no LoRA: not .safetensors, unreadable or empty,
    or without LoRA layers (kohya's lora_up/lora_down, peft's lora_A/lora_B). Reads the header only."""
    if path.suffix != LORA_SUFFIX:
        raise InvalidRequest(f"LoRA file {path.name} is not a {LORA_SUFFIX} file")
    try:
        with safe_open(path, "pt") as file:
            keys = list(file.keys())
    except (SafetensorError, OSError) as error:
        raise InvalidRequest(f"LoRA file {path.name} is not a readable safetensors file ({error})") from None
    if not any("lora" in key.lower() for key in keys):
        raise InvalidRequest(f"LoRA file {path.name} holds no LoRA layers ({len(keys)} tensors, none named lora)")


@contextmanager
def applied_loras(
    host, loras: list[tuple[str | os.PathLike, float]], should_stop: Callable[[], bool] | None = None
) -> Iterator[None]:
    """Apply LoRA files with their weights to the UNet and text encoder of `host`, and remove them on exit.

    `host` is a diffusers pipeline around the models (ldmkit.families' diffusers_pipeline: no copies), whose LoRA
    loader reads kohya/A1111 and diffusers/peft files. The weight scales the file's update as in A1111
    (weight * alpha / rank * up @ down). Requests must not overlap on the same modules: the adapters live in
    them while the context is open, and on exit every LoRA layer leaves them, so a LoRA loaded in some other way
    would go too. should_stop() is asked before each file: once it says True, no more are loaded (the caller is
    stopping and uses none); it may raise to leave at once.
    """
    if not loras:
        yield
        return
    names = []
    try:
        for path, _ in loras:
            if should_stop is not None and should_stop():
                break
            names.append(f"ldmkit_lora_{len(names)}")
            _load(host, Path(path), names[-1])
        if names:
            host.set_adapters(names, adapter_weights=[weight for _, weight in loras[: len(names)]])
        yield
    finally:
        host.unload_lora_weights()  # takes the peft layers out again, leaving the original modules


def _load(host, path: Path, adapter_name: str) -> None:
    if path.suffix != LORA_SUFFIX or not path.is_file():
        raise LdmError(f"LoRA file not found or not {LORA_SUFFIX}: {path.name}")
    try:
        with warnings.catch_warnings(), _quiet_logger("diffusers.loaders.peft"):
            # peft warns about every adapter after the first; several at once is what we ask for.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            host.load_lora_weights(str(path), adapter_name=adapter_name)
    except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as error:
        raise LdmError(f"cannot apply LoRA {path.name} to this model: {error}") from None


@contextmanager
def _quiet_logger(name: str):
    """diffusers logs a failed LoRA load before raising it; the raised error is reported once, as one line."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


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
