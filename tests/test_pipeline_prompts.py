"""A1111 prompt features through Pipeline.generate: emphasis, long prompts, clip skip, LoRA, embeddings."""

import numpy as np
import pytest
import torch
from conftest import make_tiny_components
from test_embeddings import save_a1111_pt, vectors
from test_lora import kohya_lora

from ldmkit import Pipeline
from ldmkit.errors import InvalidRequest
from ldmkit.metadata import parse_infotext


def pixels(result):
    return np.asarray(result.images[0], dtype=int)


@pytest.fixture
def pipe():
    return Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)


def test_emphasis_changes_the_image(pipe):
    plain = pipe.generate("an otter in a river", steps=3, seed=0)
    emphasised = pipe.generate("an (otter:1.6) in a river", steps=3, seed=0)
    assert np.abs(pixels(plain) - pixels(emphasised)).max() > 0


def test_long_prompts_are_not_truncated(pipe):
    base = ", ".join(["a small otter"] * 25)  # over 75 tokens
    tail_a = pipe.generate(base + ", red apple", steps=3, seed=0)
    tail_b = pipe.generate(base + ", blue car", steps=3, seed=0)
    assert np.abs(pixels(tail_a) - pixels(tail_b)).max() > 0


def test_clip_skip_is_used_and_recorded(pipe):
    normal = pipe.generate("otter", steps=3, seed=0)
    skipped = pipe.generate("otter", steps=3, seed=0, clip_skip=2)
    assert np.abs(pixels(normal) - pixels(skipped)).max() > 0
    assert parse_infotext(skipped.infotexts[0])["Clip skip"] == "2"
    assert "Clip skip" not in parse_infotext(normal.infotexts[0])
    with pytest.raises(InvalidRequest):
        pipe.generate("otter", steps=2, clip_skip=5)


def test_lora_from_prompt_tag_and_from_the_api_then_clean_again(tmp_path):
    components = make_tiny_components()
    kohya_lora(tmp_path / "ink.safetensors", components, alpha=8.0)
    pipe = Pipeline(components, torch.device("cpu"), torch.float32, lora_dir=tmp_path)
    before = pixels(pipe.generate("otter", steps=3, seed=0))
    tagged = pipe.generate("otter <lora:ink:1.0>", steps=3, seed=0)
    by_api = pipe.generate("otter", steps=3, seed=0, loras=[(tmp_path / "ink.safetensors", 1.0)])
    after = pixels(pipe.generate("otter", steps=3, seed=0))
    assert np.abs(before - pixels(tagged)).max() > 0
    assert np.array_equal(pixels(tagged), pixels(by_api))
    assert np.array_equal(before, after)
    params = parse_infotext(tagged.infotexts[0])
    assert params["Prompt"] == "otter <lora:ink:1.0>" and params["Lora hashes"].startswith("ink: ")


def test_lora_errors_are_clear(tmp_path, pipe):
    with pytest.raises(InvalidRequest, match="no LoRA folder"):
        pipe.generate("otter <lora:ink:1>", steps=2)
    with pytest.raises(InvalidRequest, match="LoRA file not found"):
        pipe.generate("otter", steps=2, loras=[(tmp_path / "missing.safetensors", 1.0)])


def test_embedding_name_in_the_prompt_uses_it(tmp_path):
    save_a1111_pt(tmp_path / "otterstyle.pt", vectors(2, size=8, seed=3) * 5)
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32, embeddings_dir=tmp_path)
    plain = pipe.generate("otter", steps=3, seed=0)
    styled = pipe.generate("otter otterstyle", steps=3, seed=0)
    assert np.abs(pixels(plain) - pixels(styled)).max() > 0
    assert parse_infotext(styled.infotexts[0])["TI hashes"].startswith("otterstyle: ")


def test_emphasis_next_to_a_plain_negative_prompt_stays_finite(pipe):
    from ldmkit.prompts import encode_prompts

    plain = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["", "an otter"])
    mixed = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["", "an (otter:1.6)"])
    assert torch.isfinite(mixed).all()
    assert torch.equal(mixed[0], plain[0])  # the plain row is untouched


def test_loras_are_refused_on_the_fused_fast_path(tmp_path):
    components = make_tiny_components()
    kohya_lora(tmp_path / "ink.safetensors", components)
    pipe = Pipeline(components, torch.device("cpu"), torch.float32, lora_dir=tmp_path)
    pipe.make_fast(fuse_qkv=True, channels_last=False, compile=False)  # recorded: the pipeline knows
    with pytest.raises(InvalidRequest, match="not supported on the fast path"):
        pipe.generate("otter <lora:ink:1>", steps=2)
