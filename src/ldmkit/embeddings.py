"""Textual inversion embeddings (A1111 .pt/.safetensors, diffusers learned_embeds) registered as words of the prompt.

diffusers' `load_textual_inversion` adds the tokens: NAME for the first vector, NAME_1, NAME_2... for the others;
`ldmkit.prompts` expands NAME into all of them, as A1111 does, so writing the file's name in a prompt uses it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import safetensors.torch
import torch
from diffusers.loaders import TextualInversionLoaderMixin
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from ldmkit.errors import LdmError

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
DIFFUSERS_FILE_STEM = "learned_embeds"  # a diffusers concept folder: <name>/learned_embeds.bin


def load_embeddings(
    embeddings_dir: str | os.PathLike, tokenizer: PreTrainedTokenizerBase, text_encoder: CLIPTextModel
) -> dict[str, Path]:
    """Register every embedding file under `embeddings_dir` as a prompt word; returns {name: file}.

    The name is the file's stem (a diffusers concept folder's name for its learned_embeds file). Every new file
    is read and checked before any is registered, so a refused file leaves the model as it was. Names
    registered by an earlier call are kept, so calling again after files were added loads only the new ones.
    """
    files: dict[str, Path] = {}
    for path in _embedding_files(Path(embeddings_dir)):
        name = embedding_name(path)
        if name in files:
            raise LdmError(f"two embeddings are named '{name}': {files[name]} and {path}; rename one")
        files[name] = path
    new = {name: path for name, path in files.items() if name not in tokenizer.added_tokens_encoder}
    vectors = {name: read_embedding(path, expected_size=_vector_size(text_encoder)) for name, path in new.items()}
    for name, name_vectors in vectors.items():
        _register(name, name_vectors, tokenizer, text_encoder)
    return files


def _embedding_files(embeddings_dir: Path) -> list[Path]:
    if not embeddings_dir.is_dir():
        raise LdmError(f"embeddings folder not found: {embeddings_dir}")
    files = (p for p in embeddings_dir.rglob("*") if p.suffix.lower() in EMBEDDING_SUFFIXES and p.is_file())
    return sorted(p for p in files if p.stat().st_size > 0)  # A1111 skips empty files too


def embedding_name(path: Path) -> str:
    """The word that calls an embedding up in a prompt."""
    return path.parent.name if path.stem == DIFFUSERS_FILE_STEM else path.stem


def read_embedding(path: str | os.PathLike, expected_size: int | None = None) -> torch.Tensor:
    """(vectors, D) float32 embedding vectors of an A1111 or diffusers file; pickles are read with weights_only."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            data = safetensors.torch.load_file(path, device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise LdmError(
            f"cannot read embedding {path}: its pickle holds more than tensors, which are never loaded"
        ) from None
    except Exception as error:
        raise LdmError(f"cannot read embedding {path}: {error}") from None
    vectors = _vectors(data, path).detach().float()
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    if vectors.ndim != 2:
        raise LdmError(f"embedding {path} has vectors of shape {tuple(vectors.shape)}, not (count, size)")
    if expected_size is not None and vectors.shape[1] != expected_size:
        raise LdmError(
            f"embedding {path.name} has vectors of size {vectors.shape[1]}, but this model's text encoder uses "
            f"{expected_size}: it was made for another model family (SD1 uses 768, SD2 1024)"
        )
    return vectors


def _vectors(data, path: Path) -> torch.Tensor:
    """The one tensor of an embedding file, whichever of the known layouts it uses."""
    if isinstance(data, dict) and "string_to_param" in data:  # A1111 .pt: {"string_to_param": {"*": tensor}, ...}
        data = data["string_to_param"]
    elif isinstance(data, dict) and {"clip_g", "clip_l"} <= data.keys():
        raise LdmError(f"embedding {path.name} is an SDXL embedding; only SD1.x/SD2.x embeddings can be used")
    # A1111 .safetensors {"emb_params": tensor}, diffusers {token: tensor}, or what string_to_param held
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        return next(iter(data.values()))
    raise LdmError(f"{path} is not a textual inversion embedding (expected one tensor, A1111 or diffusers layout)")


def _vector_size(text_encoder: CLIPTextModel) -> int:
    return text_encoder.get_input_embeddings().weight.shape[1]


class _EmbeddingLoader(TextualInversionLoaderMixin):
    """diffusers' loader without a pipeline: the mixin reads these two attributes only to handle offload hooks."""

    hf_device_map = None
    components: dict = {}


def _register(
    name: str, vectors: torch.Tensor, tokenizer: PreTrainedTokenizerBase, text_encoder: CLIPTextModel
) -> None:
    if name in tokenizer.get_vocab():
        raise LdmError(f"embedding name '{name}' is already a word of the CLIP vocabulary; rename its file")
    _EmbeddingLoader().load_textual_inversion(vectors, token=name, tokenizer=tokenizer, text_encoder=text_encoder)


def embedding_token_groups(tokenizer: PreTrainedTokenizerBase) -> dict[int, list[int]]:
    """{id of NAME: ids of NAME, NAME_1, ...} for each multi-vector embedding registered in the tokenizer."""
    added = tokenizer.added_tokens_encoder
    groups = {}
    for token, first_id in added.items():
        ids = [first_id]
        while f"{token}_{len(ids)}" in added:
            ids.append(added[f"{token}_{len(ids)}"])
        if len(ids) > 1:
            groups[first_id] = ids
    return groups


def used_embeddings(tokenizer: PreTrainedTokenizerBase, prompts: list[str], embeddings: dict[str, Path]) -> list[str]:
    """Names of the embeddings that the prompts use, in order of first use (matched as the tokenizer matches them)."""
    name_by_id = {tokenizer.convert_tokens_to_ids(name): name for name in embeddings}
    ids = tokenizer(prompts, add_special_tokens=False, truncation=False, verbose=False).input_ids
    used = dict.fromkeys(name_by_id[i] for prompt_ids in ids for i in prompt_ids if i in name_by_id)
    return list(used)


def embedding_shorthash(path: str | os.PathLike) -> str:
    """A1111's short hash of an embedding: the first 12 hex digits of the whole file's sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def ti_hashes_infotext(tokenizer: PreTrainedTokenizerBase, prompts: list[str], embeddings: dict[str, Path]) -> dict:
    """{"TI hashes": "name: hash, ..."} for the embeddings used by the prompts (prompt first, then negative)."""
    if not embeddings:
        return {}  # nothing to look for (and a model may have no CLIP tokenizer: the SDXL refiner)
    used = used_embeddings(tokenizer, prompts, embeddings)
    # A1111 drops ':' and ',' from names: they would break the "name: hash, ..." list.
    entries = [f"{name.replace(':', '').replace(',', '')}: {embedding_shorthash(embeddings[name])}" for name in used]
    return {"TI hashes": ", ".join(entries)} if entries else {}
