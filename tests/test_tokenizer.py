"""The bundled CLIP tokenizer gives the reference tokenizer's ids, padded the SD1 or the SD2 way."""

import pytest

from ldmkit.loading import load_tokenizer

# Reference ids, computed once with open_clip_torch 3.3.0's SimpleTokenizer (the reference CLIP
# tokenizer, with its own bpe_simple_vocab_16e6.txt.gz): `SimpleTokenizer()([prompt])[0]`, with the
# trailing 0 padding stripped. open_clip was loaded from its wheel (`pip download --no-deps
# open_clip_torch`, tokenizer.py imported on its own, with ftfy and regex installed in a throwaway
# folder). It is not a dependency of ldmkit.
REFERENCE_IDS = {
    "a photo of an astronaut riding a horse on mars": [
        49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407,
    ],
    "Hello, world! It's a test: (masterpiece), [best quality]; 50% off?": [
        49406, 3306, 267, 1002, 256, 585, 568, 320, 1628, 281, 263, 12066, 2361, 314, 949, 3027, 60, 282, 276,
        271, 260, 1007, 286, 49407,
    ],
    "A RED Car In THE Rain": [49406, 320, 736, 1615, 530, 518, 2443, 49407],
    "café crème brûlée, naïve façade, Ångström über straße": [
        49406, 15304, 1075, 12138, 614, 711, 127, 119, 75, 13489, 267, 1097, 35689, 563, 778, 10067, 1928, 267,
        23176, 10352, 807, 7255, 332, 6522, 1516, 1894, 127, 253, 324, 49407,
    ],
    "1234 apples and 3.14 pies in 2024": [
        49406, 272, 273, 274, 275, 14032, 537, 274, 269, 272, 275, 6898, 530, 273, 271, 273, 275, 49407,
    ],
    "a cute cat 🐱 riding a rocket 🚀": [49406, 320, 2242, 2368, 22979, 6765, 320, 8383, 13542, 49407],
    # SD2 pads with '!' (id 0), yet a '!' typed in the prompt is an ordinary token (diffusers#4153).
    "wow! !! !!!": [49406, 2781, 256, 748, 995, 49407],
}  # fmt: skip

# 60 words of 2-3 tokens each: 170 tokens, cut to 77 with the end token last.
LONG_PROMPT = " ".join(f"word{i}" for i in range(60))
LONG_REFERENCE_IDS = [49406] + [
    2653, 271, 2653, 272, 2653, 273, 2653, 274, 2653, 275, 2653, 276, 2653, 277, 2653, 278, 2653, 279, 2653, 280,
    2653, 272, 271, 2653, 272, 272, 2653, 272, 273, 2653, 272, 274, 2653, 272, 275, 2653, 272, 276, 2653, 272, 277,
    2653, 272, 278, 2653, 272, 279, 2653, 272, 280, 2653, 273, 271, 2653, 273, 272, 2653, 273, 273, 2653, 273, 274,
    2653, 273, 275, 2653, 273, 276, 2653, 273, 277, 2653, 273, 278, 2653,
] + [49407]  # fmt: skip

SD1_PAD, SD2_PAD = 49407, 0


def encode(tokenizer, prompt: str) -> list[int]:
    """How SD pipelines call the tokenizer."""
    return tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids


@pytest.mark.parametrize("prompt", list(REFERENCE_IDS))
def test_sd1_ids_match_reference_padded_with_end_token(prompt):
    expected = REFERENCE_IDS[prompt] + [SD1_PAD] * (77 - len(REFERENCE_IDS[prompt]))
    assert encode(load_tokenizer(), prompt) == expected


@pytest.mark.parametrize("prompt", list(REFERENCE_IDS))
def test_sd2_ids_match_reference_padded_with_exclamation_mark(prompt):
    expected = REFERENCE_IDS[prompt] + [SD2_PAD] * (77 - len(REFERENCE_IDS[prompt]))
    assert encode(load_tokenizer(pad_token="!"), prompt) == expected


def test_long_prompt_is_truncated_to_77_with_end_token_last():
    assert len(LONG_REFERENCE_IDS) == 77
    for tokenizer in (load_tokenizer(), load_tokenizer(pad_token="!")):
        ids = encode(tokenizer, LONG_PROMPT)
        assert ids == LONG_REFERENCE_IDS
        assert ids[-1] == tokenizer.eos_token_id == 49407


def test_special_token_ids():
    sd1, sd2 = load_tokenizer(), load_tokenizer(pad_token="!")
    assert (sd1.bos_token_id, sd1.eos_token_id, sd1.pad_token_id) == (49406, 49407, SD1_PAD)
    assert (sd2.bos_token_id, sd2.eos_token_id, sd2.pad_token_id) == (49406, 49407, SD2_PAD)
    assert len(sd1) == 49408 and sd1.model_max_length == 77
