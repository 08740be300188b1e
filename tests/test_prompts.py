"""A1111 prompt syntax: emphasis, 75-token chunks, BREAK, comma backtracking, clip skip; plain prompts stay exact."""

import copy

import pytest
import torch
from conftest import make_tiny_components

from ldmkit.errors import InvalidRequest
from ldmkit.loading import load_tokenizer
from ldmkit.prompts import (
    check_prompt_chunks,
    clip_skip_infotext,
    count_prompt_chunks,
    encode_prompts,
    parse_emphasis,
    prompt_token_count,
)

# AUTOMATIC1111's published examples (the docstring of its prompt parser), plus BREAK and spacing cases; its
# results hold lists where these hold tuples, and also empty-text pieces, which carry no token.
A1111_EXAMPLES = {
    "normal text": [("normal text", 1.0)],
    "an (important) word": [("an ", 1.0), ("important", 1.1), (" word", 1.0)],
    "(unbalanced": [("unbalanced", 1.1)],
    "\\(literal\\]": [("(literal]", 1.0)],
    "(unnecessary)(parens)": [("unnecessaryparens", 1.1)],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [
        ("a ", 1.0),
        ("house", 1.5730000000000004),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.4641000000000006),
        (".", 1.1),
    ],
    "[abc]": [("abc", 1 / 1.1)],
    "(abc: 1.3 )": [("abc", 1.3)],
    "a \\\\ b \\x": [("a \\ b x", 1.0)],
    "unopened) and ] and :": [("unopened) and ] and :", 1.0)],
    "a BREAK b": [("a", 1.0), ("BREAK", -1), ("b", 1.0)],
    "(a BREAK b)": [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)],  # A1111 then reads this BREAK as a word
    "": [("", 1.0)],
}


@pytest.mark.parametrize("text", list(A1111_EXAMPLES))
def test_parse_emphasis_matches_a1111(text):
    assert parse_emphasis(text) == A1111_EXAMPLES[text]


# Edge cases, with the results A1111 gives (less its empty-text pieces); floats are products in closing order.
EDGE_CASES = {
    # nesting multiplies
    "((a:1.5))": [("a", 1.6500000000000001)],
    "((a):1.5)": [("a", 1.6500000000000001)],
    "[[a]]": [("a", 0.8264462809917354)],
    "([a])": [("a", 1.0)],
    "(a) (b)": [("a", 1.1), (" ", 1.0), ("b", 1.1)],
    # escapes; a backslash before anything else is dropped, yet a weighted one still ends a word
    "\\(a\\)": [("(a)", 1.0)],
    "(\\)a)": [(")a", 1.1)],
    "\\\\(a)": [("\\", 1.0), ("a", 1.1)],
    "a(\\:2)b": [("a", 1.0), ("b", 1.0)],
    # unbalanced: an opener applies to the rest, a closer without an opener is text
    "a)b": [("a)b", 1.0)],
    "((a)": [("a", 1.2100000000000002)],
    "(a:1.5": [("a:1.5", 1.1)],
    ")(": [(")", 1.0)],
    "a:1.5)": [("a:1.5)", 1.0)],
    "[a:1.5)]": [("a:1.5)", 1 / 1.1)],
    # round and square brackets are matched apart, so they may cross
    "(a [b) c]": [("a ", 1.1), ("b", 1.0), (" c", 1 / 1.1)],
    # weights: signed and leading-dot decimals; no exponent, so "1e1" stays text
    "(a:-1)": [("a", -1.0)],
    "(a: +0.5 )": [("a", 0.5)],
    "(a:.5)": [("a", 0.5)],
    "(a:1e1)": [("a:1e1", 1.1)],
    # BREAK: upper case, a word of its own, at either edge, taking the spaces around it
    "BREAK a": [("BREAK", -1.0), ("a", 1.0)],
    "a BREAK": [("a", 1.0), ("BREAK", -1.0)],
    "BREAK": [("BREAK", -1.0)],
    "a BREAK BREAK b": [("a", 1.0), ("BREAK", -1.0), ("BREAK", -1.0), ("b", 1.0)],
    "a\nBREAK\tb": [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)],
    "x,BREAK,y": [("x,", 1.0), ("BREAK", -1.0), (",y", 1.0)],
    "aBREAK b": [("aBREAK b", 1.0)],
    "BREAK_x": [("BREAK_x", 1.0)],
    "a break b": [("a break b", 1.0)],
}


@pytest.mark.parametrize("text", list(EDGE_CASES))
def test_parse_emphasis_edge_cases(text):
    assert parse_emphasis(text) == EDGE_CASES[text]


@pytest.mark.parametrize("text", ["(cat:1.2.3)", "(cat:.)"])
def test_emphasis_weight_that_is_not_a_number_is_refused(text):
    with pytest.raises(InvalidRequest, match=f"emphasis weight '{text[5:-1]}' is not a number"):
        parse_emphasis(text)


@pytest.fixture(scope="module")
def text_encoder():
    text_encoder = make_tiny_components().text_encoder
    # A fresh LayerNorm (weight 1, bias 0) zeroes each token's mean, which leaves emphasis nothing to restore;
    # trained CLIP's does not.
    norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    torch.nn.init.normal_(norm.weight, 1.0, 0.2, generator=torch.Generator().manual_seed(0))
    torch.nn.init.normal_(norm.bias, 0.1, 0.2, generator=torch.Generator().manual_seed(1))
    return text_encoder


def reference(tokenizer, text_encoder, prompts):
    """How SD pipelines encode a prompt: one 77-token window."""
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def encode_ids(text_encoder, ids):
    return text_encoder(torch.tensor([ids]))[0]


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
@pytest.mark.parametrize("prompt", ["a photo of an astronaut riding a horse, wow!", "", " ".join(["cat"] * 75)])
@torch.no_grad()
def test_plain_prompt_is_bit_for_bit_the_plain_embedding(text_encoder, pad_token, prompt):
    tokenizer = load_tokenizer(pad_token=pad_token)
    assert torch.equal(encode_prompts(tokenizer, text_encoder, [prompt]), reference(tokenizer, text_encoder, [prompt]))


@torch.no_grad()
def test_prompt_and_negative_prompt_batch_is_bit_for_bit_the_plain_batch(text_encoder):
    tokenizer, prompts = load_tokenizer(), ["blurry, ugly", "a red car in the rain"]
    assert torch.equal(encode_prompts(tokenizer, text_encoder, prompts), reference(tokenizer, text_encoder, prompts))


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
@torch.no_grad()
def test_long_prompt_is_encoded_in_chunks_of_75_tokens_without_truncation(text_encoder, pad_token):
    tokenizer = load_tokenizer(pad_token=pad_token)
    bos, eos, pad, cat = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, 2368
    hidden = encode_prompts(tokenizer, text_encoder, [" ".join(["cat"] * 100)])
    assert hidden.shape == (1, 154, 8)
    assert torch.equal(hidden[:, :77], encode_ids(text_encoder, [bos] + [cat] * 75 + [eos]))
    assert torch.equal(hidden[:, 77:], encode_ids(text_encoder, [bos] + [cat] * 25 + [eos] + [pad] * 50))


@torch.no_grad()
def test_shorter_prompts_are_padded_with_empty_chunks(text_encoder):
    tokenizer = load_tokenizer()
    hidden = encode_prompts(tokenizer, text_encoder, ["", " ".join(["cat"] * 160)])
    assert hidden.shape == (2, 231, 8)
    empty = reference(tokenizer, text_encoder, [""])[0]
    assert torch.equal(hidden[0], torch.cat([empty] * 3))


@torch.no_grad()
def test_break_starts_a_new_chunk(text_encoder):
    tokenizer = load_tokenizer()
    hidden = encode_prompts(tokenizer, text_encoder, ["a red car BREAK in the rain"])
    expected = torch.cat(
        [reference(tokenizer, text_encoder, ["a red car"]), reference(tokenizer, text_encoder, ["in the rain"])], 1
    )
    assert torch.equal(hidden, expected)


@torch.no_grad()
def test_chunk_ends_at_a_comma_within_20_tokens_of_the_limit(text_encoder):
    tokenizer = load_tokenizer()
    cats, dogs = " ".join(["cat"] * 70), " ".join(["dog"] * 10)
    hidden = encode_prompts(tokenizer, text_encoder, [f"{cats}, {dogs}"])
    expected = torch.cat(
        [reference(tokenizer, text_encoder, [f"{cats},"]), reference(tokenizer, text_encoder, [dogs])], 1
    )
    assert torch.equal(hidden, expected)
    assert prompt_token_count(tokenizer, f"{cats}, {dogs}") == (85, 150)  # the chunk cut early counts as full


@torch.no_grad()
def test_comma_further_back_than_20_tokens_does_not_move_the_chunk_break(text_encoder):
    tokenizer = load_tokenizer()
    prompt = " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 40)
    first_75 = tokenizer(prompt, add_special_tokens=False).input_ids[:75]
    hidden = encode_prompts(tokenizer, text_encoder, [prompt])
    assert torch.equal(hidden[:, :77], encode_ids(text_encoder, [49406, *first_75, 49407]))


@pytest.mark.parametrize(
    ("prompt", "weight"), [("a (cat:1.5) dog", 1.5), ("a [cat] dog", 1 / 1.1), ("a ((cat)) dog", 1.1 * 1.1)]
)
@torch.no_grad()
def test_emphasis_scales_the_token_then_restores_the_mean(text_encoder, prompt, weight):
    tokenizer = load_tokenizer()
    plain = reference(tokenizer, text_encoder, ["a cat dog"])  # tokens: start, a, cat, dog, end...
    weights = torch.ones(1, 77, 1)
    weights[0, 2] = weight
    expected = plain * weights
    expected = expected * (plain.mean() / expected.mean())
    hidden = encode_prompts(tokenizer, text_encoder, [prompt])
    torch.testing.assert_close(hidden, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(hidden, plain)


@torch.no_grad()
def test_each_prompt_keeps_its_own_mean_so_a_plain_neighbour_stays_exact(text_encoder):
    tokenizer = load_tokenizer()
    hidden = encode_prompts(tokenizer, text_encoder, ["(ugly:1.4)", "a cat"])
    assert torch.equal(hidden[1], reference(tokenizer, text_encoder, ["ugly", "a cat"])[1])
    torch.testing.assert_close(hidden[0], encode_prompts(tokenizer, text_encoder, ["(ugly:1.4)"])[0], rtol=0, atol=1e-6)


@torch.no_grad()
def test_weight_one_and_escaped_brackets_give_the_plain_embedding(text_encoder):
    tokenizer = load_tokenizer()
    assert torch.equal(
        encode_prompts(tokenizer, text_encoder, ["a (cat:1.0)"]), reference(tokenizer, text_encoder, ["a cat"])
    )
    assert torch.equal(
        encode_prompts(tokenizer, text_encoder, ["\\(cat\\)"]), reference(tokenizer, text_encoder, ["(cat)"])
    )


@torch.no_grad()
def test_clip_skip_2_is_the_encoder_without_its_last_layer(text_encoder):
    # diffusers' clip_skip would be the reference, but 0.42 reaches for .text_model, gone in transformers 5.
    tokenizer, truncated = load_tokenizer(), copy.deepcopy(text_encoder)
    layers = getattr(truncated, "text_model", truncated).encoder.layers
    del layers[-1]
    expected = reference(tokenizer, truncated, ["a red car"])
    hidden = encode_prompts(tokenizer, text_encoder, ["a red car"], clip_skip=2)
    torch.testing.assert_close(hidden, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(hidden, encode_prompts(tokenizer, text_encoder, ["a red car"]))


@pytest.mark.parametrize("clip_skip", [0, 3, True, 1.5])
def test_clip_skip_outside_the_encoder_layers_is_refused(text_encoder, clip_skip):
    with pytest.raises(InvalidRequest, match=f"^clip_skip must be an integer from 1 to 2, not {clip_skip!r}$"):
        encode_prompts(load_tokenizer(), text_encoder, ["a cat"], clip_skip=clip_skip)


@pytest.mark.parametrize(
    ("prompt", "count"),
    [
        ("a cat", (2, 75)),
        ("", (0, 75)),
        (" ".join(["cat"] * 100), (100, 150)),
        ("a BREAK b", (76, 150)),
        ("(a:1.2)", (1, 75)),
    ],
)
def test_prompt_token_count_is_what_a1111_shows(prompt, count):
    assert prompt_token_count(load_tokenizer(), prompt) == count


def test_clip_skip_appears_in_infotext_only_when_layers_are_skipped():
    assert clip_skip_infotext(1) == {}
    assert clip_skip_infotext(2) == {"Clip skip": 2}


@pytest.mark.parametrize(
    ("prompt", "chunks"),
    [
        ("", 1),
        ("a cat", 1),
        (" ".join(["cat"] * 75), 1),
        (" ".join(["cat"] * 76), 2),
        ("a BREAK b", 2),
        ("BREAK a", 2),  # the first chunk is empty
        ("a BREAK", 1),  # a BREAK at the end adds no chunk
        ("BREAK", 1),
        ("a BREAK BREAK b", 3),
        ("BREAK " * 1700, 1700),
    ],
)
def test_count_prompt_chunks(prompt, chunks):
    assert count_prompt_chunks(load_tokenizer(), prompt) == chunks


def test_prompt_over_the_chunk_limit_is_refused_naming_the_limit():
    tokenizer = load_tokenizer()
    check_prompt_chunks(tokenizer, "a BREAK " * 31 + "b", "c BREAK " * 31 + "d")  # 32 chunks each: the default limit
    with pytest.raises(InvalidRequest, match="^prompt takes 33 chunks .* over the limit max_prompt_chunks = 32$"):
        check_prompt_chunks(tokenizer, "a BREAK " * 32 + "b")
    with pytest.raises(InvalidRequest, match="^negative prompt takes 1700 chunks .* max_prompt_chunks = 32$"):
        check_prompt_chunks(tokenizer, "a cat", "BREAK " * 1700)
    with pytest.raises(InvalidRequest, match="prompt takes 3 chunks .* max_prompt_chunks = 2$"):
        check_prompt_chunks(tokenizer, "a BREAK b BREAK c", max_chunks=2)
