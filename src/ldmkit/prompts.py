"""Prompt text -> CLIP conditioning the AUTOMATIC1111 way: (emphasis:1.2), prompts of any length, BREAK, clip skip.

Behaviour follows AUTOMATIC1111's prompt_parser.parse_prompt_attention and sd_hijack_clip (Emphasis "Original"),
so a prompt written for that UI conditions the model the same way here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from ldmkit.embeddings import embedding_token_groups
from ldmkit.errors import InvalidRequest

CHUNK_LENGTH = 75  # prompt tokens per CLIP call; with the start and end tokens that makes CLIP's 77
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack": a chunk may end early at a comma this close
ROUND_MULTIPLIER = 1.1  # (text)
SQUARE_MULTIPLIER = 1 / 1.1  # [text]
BREAK = "BREAK"

# One alternative per syntactic element, tried in this order.
_ATTENTION_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]                         # escaped bracket or backslash: that character, literally
    | \\                                   # any other backslash: dropped
    | \( | \[                              # open an emphasis
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)     # close (text:1.3)
    | \) | ]                                # close (text) or [text]
    | [^\\()\[\]:]+                        # plain text
    | :                                    # a colon that closes nothing
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[list]:
    """[text, weight] pairs of a prompt, exactly as AUTOMATIC1111's function of the same name returns them.

    (abc) multiplies by 1.1, (abc:3.12) by 3.12, [abc] divides by 1.1; \\( \\) \\[ \\] \\\\ are literal;
    brackets left open are closed at the end; neighbours of equal weight merge; BREAK becomes ["BREAK", -1].
    """
    pieces: list[list] = []
    open_round: list[int] = []  # index in `pieces` where each open bracket started
    open_square: list[int] = []
    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            _multiply(pieces, open_round.pop(), _parse_weight(weight))
        elif token == ")" and open_round:
            _multiply(pieces, open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            _multiply(pieces, open_square.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK_WORD.split(token)):
                if i > 0:
                    pieces.append([BREAK, -1])
                pieces.append([part, 1.0])
    for start in open_round:
        _multiply(pieces, start, ROUND_MULTIPLIER)
    for start in open_square:
        _multiply(pieces, start, SQUARE_MULTIPLIER)
    return _merge_equal_weights(pieces) or [["", 1.0]]


def _parse_weight(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidRequest(f"prompt emphasis weight '{text}' is not a number") from None


def _multiply(pieces: list[list], start: int, multiplier: float) -> None:
    # One multiplication per closing bracket, in closing order: the float results match A1111's to the last bit.
    for piece in pieces[start:]:
        piece[1] *= multiplier


def _merge_equal_weights(pieces: list[list]) -> list[list]:
    merged: list[list] = []
    for text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return merged


@dataclass
class _Chunk:
    """Up to CHUNK_LENGTH prompt token ids and their emphasis weights, without start/end tokens."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def _split_into_chunks(tokenizer: PreTrainedTokenizerBase, prompt: str) -> tuple[list[_Chunk], int]:
    """A1111's tokenize_line: the prompt's chunks and its token count (a BREAK counts as a full chunk)."""
    parsed = parse_prompt_attention(prompt)
    tokenized = tokenizer([text for text, _ in parsed], add_special_tokens=False, truncation=False, verbose=False)
    groups = embedding_token_groups(tokenizer)
    comma_id = tokenizer.convert_tokens_to_ids(",</w>")
    chunks: list[_Chunk] = []
    chunk = _Chunk()
    token_count = 0
    last_comma = -1  # position of the last comma in `chunk`

    def close_chunk(is_last: bool = False) -> None:
        nonlocal chunk, token_count, last_comma
        token_count += len(chunk.ids) if is_last else CHUNK_LENGTH
        chunks.append(chunk)
        chunk, last_comma = _Chunk(), -1

    for ids, (text, weight) in zip(tokenized.input_ids, parsed, strict=True):
        if text == BREAK and weight == -1:
            close_chunk()
            continue
        for group in _group_ids(ids, groups):
            if group == [comma_id]:
                last_comma = len(chunk.ids)
            elif len(chunk.ids) == CHUNK_LENGTH and last_comma != -1 and CHUNK_LENGTH - last_comma <= COMMA_BACKTRACK:
                # Carry the words after the last comma over to the next chunk rather than cut them in two.
                carried = _Chunk(chunk.ids[last_comma + 1 :], chunk.weights[last_comma + 1 :])
                del chunk.ids[last_comma + 1 :], chunk.weights[last_comma + 1 :]
                close_chunk()
                chunk = carried
            if len(chunk.ids) + len(group) > CHUNK_LENGTH:
                close_chunk()  # a multi-vector embedding is never split between chunks
            chunk.ids += group
            chunk.weights += [weight] * len(group)
    if chunk.ids or not chunks:
        close_chunk(is_last=True)
    return chunks, token_count


def _group_ids(ids: list[int], groups: dict[int, list[int]]) -> list[list[int]]:
    """Each token alone, except that a multi-vector embedding's first token brings all of its vectors' tokens."""
    return [groups.get(token_id, [token_id]) for token_id in ids]


def prompt_token_count(tokenizer: PreTrainedTokenizerBase, prompt: str) -> tuple[int, int]:
    """(tokens used, tokens available in the chunks used): what A1111 shows as "N/75" or "80/150"."""
    _, token_count = _split_into_chunks(tokenizer, prompt)
    return token_count, math.ceil(max(token_count, 1) / CHUNK_LENGTH) * CHUNK_LENGTH


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
        for ids, weights in _chunk_batches(tokenizer, prompts, text_encoder.device)
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
    for ids, weights in _chunk_batches(tokenizer, prompts, text_encoder.device):
        output = text_encoder(ids, output_hidden_states=True)
        hidden.append(_apply_emphasis(output.hidden_states[-(clip_skip + 1)], weights))  # (B, 77, D)
        if pooled and first_pooled is None:
            first_pooled = output.text_embeds  # (B, projection_dim)
    return torch.cat(hidden, dim=1), first_pooled


def _chunk_batches(tokenizer: PreTrainedTokenizerBase, prompts: list[str], device):
    """Per chunk position: the (len(prompts), 77) token ids and emphasis weights of every prompt's chunk there."""
    prompt_chunks = [_split_into_chunks(tokenizer, prompt)[0] for prompt in prompts]
    num_chunks = max(len(chunks) for chunks in prompt_chunks)
    for i in range(num_chunks):
        batch = [chunks[i] if i < len(chunks) else _Chunk() for chunks in prompt_chunks]
        ids = torch.tensor([_padded_ids(tokenizer, chunk) for chunk in batch], device=device)
        weights = torch.tensor([_padded_weights(chunk) for chunk in batch], device=device)
        yield ids, weights


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


def _apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token's hidden state by its weight, then restore each prompt's mean (A1111's "Original").

    A1111 encodes one prompt per call, so its mean is a prompt's; here it is taken per row for the same result.
    """
    if torch.all(weights == 1):
        return hidden  # bit for bit the plain embedding
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
