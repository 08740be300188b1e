"""Textual inversion embeddings (A1111 .pt/.safetensors, diffusers learned_embeds; SDXL's clip_l/clip_g files)
registered as words of the prompt.

An embedding of k vectors adds k tokens to the tokenizer, NAME for the first vector and NAME_1 ... NAME_{k-1} for
the others (the names diffusers' `load_textual_inversion` gives them), and k rows to the text encoder's token
embedding. This module records which tokens each embedding took, and `ldmkit.prompts` expands NAME into all of
them, as A1111 does, so writing the file's name in a prompt uses it. All new embeddings are registered together:
one tokenizer call and one new embedding matrix, whatever their number (each call costs time in proportion to the
tokens already added, so one call per vector was quadratic). An SDXL file's two sets of vectors go to the two
tokenizer/encoder pairs under the same names, so both encoders read NAME as the embedding.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import weakref
from pathlib import Path

import safetensors.torch
import torch
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from ldmkit.errors import LdmError

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
DIFFUSERS_FILE_STEM = "learned_embeds"  # a diffusers concept folder: <name>/learned_embeds.bin
SDXL_KEYS = ("clip_l", "clip_g")  # an SDXL embedding's vectors for CLIP ViT-L and for OpenCLIP bigG


def load_embeddings(
    embeddings_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None,
    text_encoder: CLIPTextModel | None,
    tokenizer_2: PreTrainedTokenizerBase | None = None,
    text_encoder_2: CLIPTextModel | None = None,
) -> dict[str, Path]:
    """Register every embedding file under `embeddings_dir` as a prompt word; returns {name: file}.

    The name is the file's stem (a diffusers concept folder's name for its learned_embeds file). With a second text
    encoder (SDXL) each file must hold vectors for both: `clip_l` for CLIP ViT-L (`text_encoder`; the refiner has
    none) and `clip_g` for OpenCLIP bigG (`text_encoder_2`), as SDXL embeddings are saved. Every new file is read and
    checked before any is registered, so a refused file leaves the model as it was. Names registered by an earlier
    call are kept, so calling again after files were added loads only the new ones.
    """
    files: dict[str, Path] = {}
    for path in _embedding_files(Path(embeddings_dir)):
        name = embedding_name(path)
        if name in files:
            raise LdmError(f"two embeddings are named '{name}': {files[name]} and {path}; rename one")
        files[name] = path
    encoders = [(None, tokenizer, text_encoder)]
    if text_encoder_2 is not None:
        encoders = [(SDXL_KEYS[0], tokenizer, text_encoder), (SDXL_KEYS[1], tokenizer_2, text_encoder_2)]
    encoders = [(key, tok, encoder) for key, tok, encoder in encoders if encoder is not None]
    new_files = {name: path for name, path in files.items() if name not in _REGISTERED.get(encoders[-1][1], {})}
    sizes = {key: _vector_size(encoder) for key, _, encoder in encoders}
    read = {name: _read_for(path, sizes) for name, path in new_files.items()}
    for key, tok, encoder in encoders:
        _register({name: vectors[key] for name, vectors in read.items()}, tok, encoder)
    return files


def _read_for(path: Path, sizes: dict[str | None, int]) -> dict[str | None, torch.Tensor]:
    """One file's vectors for each text encoder: {None: vectors} (SD) or {"clip_l": ..., "clip_g": ...} (SDXL)."""
    if None in sizes:
        return {None: read_embedding(path, expected_size=sizes[None])}
    return read_sdxl_embedding(path, sizes)


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
    data = _load(path)
    if isinstance(data, dict) and set(SDXL_KEYS) <= data.keys():
        raise LdmError(f"embedding {path.name} is an SDXL embedding (clip_l and clip_g); it needs an SDXL model")
    return _checked(_vectors(data, path), path, expected_size, "SD1 uses 768, SD2 1024")


def read_sdxl_embedding(path: str | os.PathLike, sizes: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """{"clip_l": (vectors, 768), "clip_g": (vectors, 1280)} of an SDXL embedding file (`sizes` checks the widths of
    the encoders given); both encoders take the same number of vectors."""
    path = Path(path)
    data = _load(path)
    if not (isinstance(data, dict) and set(SDXL_KEYS) <= data.keys()):
        raise LdmError(
            f"embedding {path.name} is not an SDXL embedding (it has no clip_l and clip_g vectors): it was made for "
            "SD1.x/SD2.x"
        )
    sizes = sizes or {}
    vectors = {key: _checked(data[key], path, sizes.get(key), "SDXL's clip_l is 768, clip_g 1280") for key in SDXL_KEYS}
    if len(vectors["clip_l"]) != len(vectors["clip_g"]):
        raise LdmError(
            f"embedding {path.name} has {len(vectors['clip_l'])} clip_l but {len(vectors['clip_g'])} clip_g vectors"
        )
    return vectors


def embedding_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(vectors, width) of an embedding file as A1111's /sdapi/v1/embeddings lists it: an SDXL file's width is its
    clip_l and clip_g widths added (768 + 1280)."""
    path = Path(path)
    data = _load(path)
    if isinstance(data, dict) and set(SDXL_KEYS) <= data.keys():
        vectors = read_sdxl_embedding(path)
        return len(vectors["clip_g"]), sum(v.shape[1] for v in vectors.values())
    vectors = _checked(_vectors(data, path), path, None, "")
    return vectors.shape[0], vectors.shape[1]


def _load(path: Path):
    try:
        if path.suffix.lower() == ".safetensors":
            return safetensors.torch.load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise LdmError(
            f"cannot read embedding {path}: it is not a PyTorch file of tensors only (a pickle that holds anything "
            "else is never loaded)"
        ) from None
    except Exception as error:  # noqa: BLE001 (a damaged file fails in torch.load as KeyError, RuntimeError...)
        raise LdmError(f"cannot read embedding {path}: {error}") from None


def _checked(vectors, path: Path, expected_size: int | None, sizes_hint: str) -> torch.Tensor:
    """(count, D) float32 vectors, refused unless 2-D (or one vector) of the text encoder's width."""
    if not isinstance(vectors, torch.Tensor):
        raise LdmError(f"{path} is not a textual inversion embedding (its vectors are not a tensor)")
    vectors = vectors.detach().float()
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    if vectors.ndim != 2:
        raise LdmError(f"embedding {path} has vectors of shape {tuple(vectors.shape)}, not (count, size)")
    if expected_size is not None and vectors.shape[1] != expected_size:
        raise LdmError(
            f"embedding {path.name} has vectors of size {vectors.shape[1]}, but this model's text encoder uses "
            f"{expected_size}: it was made for another model family ({sizes_hint})"
        )
    return vectors


def _vectors(data, path: Path) -> torch.Tensor:
    """The one tensor of an embedding file, whichever of the known layouts it uses."""
    if isinstance(data, dict) and "string_to_param" in data:  # A1111 .pt: {"string_to_param": {"*": tensor}, ...}
        data = data["string_to_param"]
    # A1111 .safetensors {"emb_params": tensor}, diffusers {token: tensor}, or what string_to_param held
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        return next(iter(data.values()))
    raise LdmError(f"{path} is not a textual inversion embedding (expected one tensor, A1111 or diffusers layout)")


def _vector_size(text_encoder: CLIPTextModel) -> int:
    return text_encoder.get_input_embeddings().weight.shape[1]


# The embeddings registered in each tokenizer: {name: token ids of its vectors}.
_REGISTERED: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, dict[str, list[int]]] = weakref.WeakKeyDictionary()


def _register(
    embeddings: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerBase, text_encoder: CLIPTextModel
) -> None:
    """Add the embeddings' tokens and vectors: one add_tokens call and one new input embedding, however many."""
    tokens = _new_tokens(embeddings, tokenizer)
    if not tokens:
        return
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    old = text_encoder.get_input_embeddings()
    grown = torch.nn.Embedding(max(old.num_embeddings, max(ids) + 1), old.embedding_dim)
    grown.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        grown.weight[: old.num_embeddings] = old.weight
        grown.weight[ids] = torch.cat(list(embeddings.values())).to(grown.weight)
    text_encoder.set_input_embeddings(grown)
    text_encoder.config.vocab_size = grown.num_embeddings
    registered, start = _REGISTERED.setdefault(tokenizer, {}), 0
    for name, vectors in embeddings.items():
        registered[name] = ids[start : start + len(vectors)]
        start += len(vectors)


def _new_tokens(embeddings: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokens of every vector of `embeddings`, in order: NAME, NAME_1, NAME_2 ...; one already taken is refused."""
    vocab = tokenizer.get_vocab()  # CLIP's words and the tokens added before
    owners: dict[str, str] = {}  # token -> the embedding that takes it
    for name, vectors in embeddings.items():
        for token in [name] + [f"{name}_{i}" for i in range(1, len(vectors))]:
            if token in vocab:
                raise LdmError(
                    f"embedding name '{token}' is already a word of the CLIP vocabulary or an embedding's token; "
                    "rename its file"
                )
            if token in owners:
                raise LdmError(
                    f"embeddings '{owners[token]}' and '{name}' both need the token '{token}' (an embedding of "
                    "several vectors also takes NAME_1, NAME_2 ...); rename one of the files"
                )
            owners[token] = name
    return list(owners)


def embedding_token_groups(tokenizer: PreTrainedTokenizerBase) -> dict[int, list[int]]:
    """{id of NAME: ids of NAME, NAME_1, ...} for each multi-vector embedding registered in the tokenizer."""
    return {ids[0]: ids for ids in _REGISTERED.get(tokenizer, {}).values() if len(ids) > 1}


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
