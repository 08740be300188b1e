"""Prompt text -> CLIP conditioning, in the prompt syntax of AUTOMATIC1111's web UI.

A prompt written for that UI conditions the model the same way here: emphasis, prompts longer than CLIP's 77
tokens, BREAK, clip skip. The parser and the chunking are ldmkit's own, written from the syntax as A1111's wiki
describes it (stable-diffusion-webui wiki, Features: "Attention/emphasis", and "Infinite prompt length" for the
chunks and BREAK) and checked against the input/output examples A1111 publishes (tests/test_prompts.py). A1111's
prompt editing ([a:b:step]) and alternation ([a|b]) are not implemented: GenerationParams.validate refuses them,
since this parser would read them as [text].

Emphasis grammar. A lexer reads the prompt left to right into these lexemes, the first that fits at each place:

    escape     \\( \\) \\[ \\] \\\\        the second character, as plain text
    backslash  \\ before anything else    dropped; it still ends a word where its brackets' weight differs
    open       (  [
    close      )  ]  :NUMBER)          NUMBER is [+-]?[0-9.]+, spaces allowed around it
    break      BREAK                   upper case, a word of its own; the spaces around it go with it
    text       the longest run of other characters, or a ':' that starts no close

Each closer matches the nearest unmatched opener of its own shape to its left: ')' and ':NUMBER)' match '(', ']'
matches '['. The two shapes are matched apart, so a (...) pair may cross a [...] pair. A matched pair multiplies
the weight of all text between them: (...) by 1.1, (...:NUMBER) by NUMBER, [...] by 1/1.1; nesting multiplies. An
opener left unmatched applies its multiplier to the rest of the prompt; a closer that matches nothing is text.

A BREAK ends the current chunk of 75 tokens. Inside brackets it is scaled with its neighbours and then reads as
the word "break", as in A1111.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from ldmkit.embeddings import embedding_token_groups
from ldmkit.errors import InvalidRequest

CHUNK_LENGTH = 75  # prompt tokens per CLIP call; with the start and end tokens that makes CLIP's 77
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack": a chunk may end early at a comma this close
MAX_PROMPT_CHUNKS = 32  # default cap on the chunks of a prompt (each a text encoder call and 77 context tokens)
ROUND_MULTIPLIER = 1.1  # (text)
SQUARE_MULTIPLIER = 1 / 1.1  # [text]
BREAK = "BREAK"
BREAK_WEIGHT = -1.0  # a BREAK piece is (BREAK, -1.0) until brackets scale it, as in A1111's parse results

_LEXER = re.compile(
    "|".join(
        f"(?P<{kind}>{pattern})"
        for kind, pattern in (
            ("escape", r"\\[()\[\]\\]"),
            ("backslash", r"\\"),
            ("open", r"[(\[]"),
            ("weighted_close", r":\s*(?P<number>[+-]?[.\d]+)\s*\)"),
            ("close", r"[)\]]"),
            ("break_word", r"\bBREAK\b"),
            ("text", r"(?:(?!\bBREAK\b)[^\\()\[\]:])+|:"),
        )
    )
)
_OPENER_OF = {")": "(", "]": "["}
_DEFAULT_MULTIPLIER = {"(": ROUND_MULTIPLIER, "[": SQUARE_MULTIPLIER}


@dataclass
class _Piece:
    text: str
    is_break: bool = False


@dataclass
class _Scope:
    """The pieces[start:end] whose weights one bracket pair multiplies."""

    start: int
    end: int
    multiplier: float


def parse_emphasis(prompt: str) -> list[tuple[str, float]]:
    """(text, weight) pieces of a prompt; a BREAK is (BREAK, -1.0). Neighbours of equal weight are joined.

    "a (cat:1.3) [dog]" -> [("a ", 1.0), ("cat", 1.3), (" ", 1.0), ("dog", 1/1.1)]; see the module docstring.
    """
    pieces: list[_Piece] = []
    scopes: list[_Scope] = []  # in the order the pairs close
    unmatched: dict[str, list[int]] = {"(": [], "[": []}  # opener -> where each open pair starts, outermost first
    previous_kind = None
    for lexeme in _LEXER.finditer(prompt):
        kind, source = lexeme.lastgroup, lexeme.group()
        closes = _OPENER_OF.get(source[-1]) if kind in ("close", "weighted_close") else None
        if kind == "escape":
            pieces.append(_Piece(source[1]))
        elif kind == "open":
            unmatched[source].append(len(pieces))
        elif closes and unmatched[closes]:
            multiplier = _weight(lexeme["number"]) if kind == "weighted_close" else _DEFAULT_MULTIPLIER[closes]
            scopes.append(_Scope(unmatched[closes].pop(), len(pieces), multiplier))
        elif kind == "break_word":
            if previous_kind == "text":  # a BREAK takes the spaces around it
                pieces[-1].text = pieces[-1].text.rstrip()
            pieces.append(_Piece(BREAK, is_break=True))
        elif kind == "backslash":
            pieces.append(_Piece(""))  # no text, but a weight of its own: "a(\\:2)b" is two words, "a" and "b"
        else:  # text, or a closer that matches no opener
            pieces.append(_Piece(source.lstrip() if previous_kind == "break_word" else source))
        previous_kind = kind
    # Pairs left open close at the end: round before square, outermost first (A1111's float results, to the bit).
    scopes += [_Scope(start, len(pieces), _DEFAULT_MULTIPLIER[o]) for o in ("(", "[") for start in unmatched[o]]
    weights = np.array([BREAK_WEIGHT if piece.is_break else 1.0 for piece in pieces])
    for scope in scopes:
        weights[scope.start : scope.end] *= scope.multiplier  # float64 products, rounded as Python's are
    return _join_equal_weights(pieces, weights.tolist()) or [("", 1.0)]


def _weight(number: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise InvalidRequest(f"prompt emphasis weight '{number}' is not a number") from None


def _join_equal_weights(pieces: list[_Piece], weights: list[float]) -> list[tuple[str, float]]:
    """Texts in a row with equal weights become one piece; a BREAK stays apart; empty pieces are left out."""
    joined: list[tuple[str, float]] = []
    joinable = False  # whether the last joined piece may take more text
    for piece, weight in zip(pieces, weights, strict=True):
        if joinable and not piece.is_break and joined[-1][1] == weight:
            joined[-1] = (joined[-1][0] + piece.text, weight)
        else:
            joined.append((piece.text, weight))
        joinable = not piece.is_break
    return [(text, weight) for text, weight in joined if text]


def _is_break(text: str, weight: float) -> bool:
    return text == BREAK and weight == BREAK_WEIGHT


@dataclass
class _Chunk:
    """Up to CHUNK_LENGTH prompt token ids and their emphasis weights, without start/end tokens."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def space(self) -> int:
        return CHUNK_LENGTH - len(self.ids)


@dataclass
class _ChunkedPrompt:
    chunks: list[_Chunk]
    token_count: int  # as A1111 counts: every chunk but the last counts as full, even one a BREAK ended early


def _chunk_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, embeddings: dict[int, list[int]]) -> _ChunkedPrompt:
    """The prompt's tokens laid into chunks of at most CHUNK_LENGTH.

    A BREAK starts a new chunk. A token that would overflow a chunk starts the next one, and takes along the
    tokens after the chunk's last comma when that comma is among the last COMMA_BACKTRACK tokens, so a phrase
    is not cut in two. An embedding's vectors (`embeddings`: first token id -> all its ids) stay in one chunk.
    """
    pieces = parse_emphasis(prompt)
    token_ids = tokenizer([text for text, _ in pieces], add_special_tokens=False, truncation=False, verbose=False)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks = [_Chunk()]
    for (text, weight), ids in zip(pieces, token_ids.input_ids, strict=True):
        if _is_break(text, weight):
            chunks.append(_Chunk())
            continue
        for word in (embeddings.get(token_id, [token_id]) for token_id in ids):
            if len(word) > chunks[-1].space():
                _check_fits_a_chunk(tokenizer, word)
                chunks.append(_carry_after_last_comma(chunks[-1], comma) if word != [comma] else _Chunk())
                if len(word) > chunks[-1].space():
                    chunks.append(_Chunk())  # the words carried over and a long embedding do not fit together
            chunks[-1].ids += word
            chunks[-1].weights += [weight] * len(word)
    token_count = CHUNK_LENGTH * (len(chunks) - 1) + len(chunks[-1].ids)
    if len(chunks) > 1 and not chunks[-1].ids:
        chunks.pop()  # a BREAK at the end adds no chunk
    return _ChunkedPrompt(chunks, token_count)


def _carry_after_last_comma(full: _Chunk, comma: int) -> _Chunk:
    """The chunk after `full`: the words after its last comma move there if that comma is near the end."""
    if full.space() > 0 or comma not in full.ids:
        return _Chunk()
    last_comma = len(full.ids) - 1 - full.ids[::-1].index(comma)
    if CHUNK_LENGTH - last_comma > COMMA_BACKTRACK:
        return _Chunk()
    carried = _Chunk(full.ids[last_comma + 1 :], full.weights[last_comma + 1 :])
    del full.ids[last_comma + 1 :], full.weights[last_comma + 1 :]
    return carried


def _check_fits_a_chunk(tokenizer: PreTrainedTokenizerBase, word: list[int]) -> None:
    if len(word) > CHUNK_LENGTH:
        name = tokenizer.convert_ids_to_tokens(word[0])
        raise InvalidRequest(
            f"embedding '{name}' has {len(word)} vectors, more than the {CHUNK_LENGTH} tokens of a prompt chunk, "
            "so it cannot be used in a prompt"
        )


def prompt_token_count(tokenizer: PreTrainedTokenizerBase, prompt: str) -> tuple[int, int]:
    """(tokens used, tokens available in the chunks used): what A1111 shows as "N/75" or "80/150"."""
    token_count = _chunk_prompt(tokenizer, prompt, embedding_token_groups(tokenizer)).token_count
    return token_count, math.ceil(max(token_count, 1) / CHUNK_LENGTH) * CHUNK_LENGTH


def count_prompt_chunks(tokenizer: PreTrainedTokenizerBase, prompt: str) -> int:
    """How many chunks of 75 tokens (text encoder calls) `prompt` takes. Tokenizes only: no model runs.

    Raises InvalidRequest if the prompt names an embedding too long for a chunk, as encoding it would.
    """
    return len(_chunk_prompt(tokenizer, prompt, embedding_token_groups(tokenizer)).chunks)


def check_prompt_chunks(
    tokenizer: PreTrainedTokenizerBase, prompt: str, negative_prompt: str = "", max_chunks: int = MAX_PROMPT_CHUNKS
) -> None:
    """Refuse, before anything is encoded, a prompt or negative prompt of more than `max_chunks` chunks."""
    for what, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
        count = count_prompt_chunks(tokenizer, text)
        if count > max_chunks:
            raise InvalidRequest(
                f"{what} takes {count} chunks of {CHUNK_LENGTH} tokens (each BREAK starts one), "
                f"over the limit max_prompt_chunks = {max_chunks}"
            )


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, text_encoder: CLIPTextModel, prompts: list[str], clip_skip: int = 1
) -> torch.Tensor:
    """(len(prompts), 77 * k, D) hidden states: each prompt's 75-token chunks encoded apart and concatenated.

    All prompts get the same number of chunks k (empty chunks pad the shorter ones), so a prompt and its
    negative prompt stack into one batch. A plain prompt of up to 75 tokens with clip_skip=1 gives exactly
    `text_encoder(tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids)[0]`.
    """
    check_clip_skip(clip_skip, text_encoder)
    hidden = [
        _apply_emphasis(_encode(text_encoder, ids, clip_skip), weights)  # (B, 77, D)
        for ids, weights in _chunk_batches(tokenizer, prompts, execution_device(text_encoder))
    ]
    return torch.cat(hidden, dim=1)


def encode_prompts_sdxl(
    tokenizer: PreTrainedTokenizerBase, text_encoder, prompts: list[str], clip_skip: int = 1, pooled: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDXL's conditioning from one of its text encoders: ((len(prompts), 77 * k, D) hidden states, pooled or None).

    SDXL was trained on the penultimate layer's states without the final layer norm (sgm's "penultimate" and
    "hidden" layers), so clip_skip=N takes the states N layers before the last (N=1: the penultimate), as
    diffusers' clip_skip=N-1 does. `pooled`: the projected pooled embedding of text encoder 2, from each prompt's
    first chunk as AUTOMATIC1111 takes it (for prompts of up to 75 tokens, the one diffusers takes).
    Chunks and emphasis are those of `encode_prompts`.
    """
    check_clip_skip(clip_skip, text_encoder)
    hidden, first_pooled = [], None
    for ids, weights in _chunk_batches(tokenizer, prompts, execution_device(text_encoder)):
        output = text_encoder(ids, output_hidden_states=True)
        hidden.append(_apply_emphasis(output.hidden_states[-(clip_skip + 1)], weights))  # (B, 77, D)
        if pooled and first_pooled is None:
            first_pooled = output.text_embeds  # (B, projection_dim)
    return torch.cat(hidden, dim=1), first_pooled


def execution_device(text_encoder) -> torch.device:
    """Where the encoder runs: its weights' device, or with CPU offload (ldmkit.offload) the GPU its hook uses."""
    hook = getattr(text_encoder, "_hf_hook", None)
    return torch.device(getattr(hook, "execution_device", None) or text_encoder.device)


def _chunk_batches(tokenizer: PreTrainedTokenizerBase, prompts: list[str], device):
    """Per chunk position: the (len(prompts), 77) token ids and emphasis weights of every prompt's chunk there
    (weights None where every one is 1: known here on the CPU, where asking the GPU tensor would wait for the GPU)."""
    embeddings = embedding_token_groups(tokenizer)
    prompt_chunks = [_chunk_prompt(tokenizer, prompt, embeddings).chunks for prompt in prompts]
    num_chunks = max(len(chunks) for chunks in prompt_chunks)
    for i in range(num_chunks):
        batch = [chunks[i] if i < len(chunks) else _Chunk() for chunks in prompt_chunks]
        ids = torch.tensor([_padded_ids(tokenizer, chunk) for chunk in batch], device=device)
        weights = [_padded_weights(chunk) for chunk in batch]
        plain = all(w == 1 for row in weights for w in row)
        yield ids, None if plain else torch.tensor(weights, device=device)


def _padded_ids(tokenizer: PreTrainedTokenizerBase, chunk: _Chunk) -> list[int]:
    # The tokenizer's own padding: SD1 pads with the end token, SD2 with '!' (id 0) after one end token.
    padding = [tokenizer.pad_token_id] * (CHUNK_LENGTH - len(chunk.ids))
    return [tokenizer.bos_token_id, *chunk.ids, tokenizer.eos_token_id, *padding]


def _padded_weights(chunk: _Chunk) -> list[float]:
    return [1.0, *chunk.weights, *[1.0] * (CHUNK_LENGTH + 1 - len(chunk.weights))]


def check_clip_skip(clip_skip: int, text_encoder: CLIPTextModel) -> None:
    """clip_skip counts layers from the end, 1 being the last; there are as many as the encoder has layers."""
    num_layers = text_encoder.config.num_hidden_layers
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= num_layers:
        raise InvalidRequest(f"clip_skip must be an integer from 1 to {num_layers}, not {clip_skip!r}")


def _encode(text_encoder: CLIPTextModel, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """(B, 77, D) last hidden states, or with clip_skip=N those of N-1 layers earlier, layer-normed (A1111)."""
    if clip_skip == 1:
        return text_encoder(ids)[0]
    hidden_states = text_encoder(ids, output_hidden_states=True).hidden_states
    # transformers 5 flattened CLIPTextModel; 4.x keeps its layers under .text_model
    final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return final_layer_norm(hidden_states[-clip_skip])


def _apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Scale each token's hidden state by its weight, then restore each prompt's mean (A1111's "Original").

    A1111 encodes one prompt per call, so its mean is a prompt's; here it is taken per row for the same result.
    """
    if weights is None:
        return hidden  # no emphasis: bit for bit the plain embedding
    z = hidden.float()  # an fp16/bf16 mean would be rounded
    original_mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights[:, :, None]
    new_mean = z.mean(dim=(1, 2), keepdim=True)
    # A zero mean (a LayerNorm without bias, as in untrained models) has nothing to restore; A1111 would
    # divide by it and give NaN.
    z = z * torch.where(new_mean == 0, 1.0, original_mean / new_mean)
    plain_rows = torch.all(weights == 1, dim=1)[:, None, None]  # rows without emphasis stay bit for bit
    return torch.where(plain_rows, hidden, z.to(hidden.dtype))


def clip_skip_infotext(clip_skip: int) -> dict:
    """The infotext entry A1111 writes: 'Clip skip: N', only when layers are skipped."""
    return {"Clip skip": clip_skip} if clip_skip > 1 else {}
