"""Textual inversion: A1111 and diffusers files load (pickles only as weights), their names work in prompts."""

import copy
import hashlib
from dataclasses import dataclass

import pytest
import safetensors.torch
import torch
from conftest import make_tiny_components
from diffusers import DDIMScheduler, StableDiffusionPipeline

from ldmkit.embeddings import load_embeddings, read_embedding, ti_hashes_infotext
from ldmkit.errors import LdmError
from ldmkit.loading import load_tokenizer
from ldmkit.prompts import encode_prompts, prompt_token_count

BOS, EOS, A, CAT = 49406, 49407, 320, 2368


def vectors(count: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, size, generator=torch.Generator().manual_seed(seed))


def save_a1111_pt(path, vec):
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.nn.Parameter(vec)},
            "name": "ignored",
            "step": 500,
            "sd_checkpoint": "abcdef12",
            "sd_checkpoint_name": "v1-5",
        },
        path,
    )


@pytest.fixture
def text_encoder():
    return make_tiny_components().text_encoder


@pytest.fixture
def embeddings_dir(tmp_path):
    save_a1111_pt(tmp_path / "StyleThree.pt", vectors(3, seed=1))
    safetensors.torch.save_file({"emb_params": vectors(1, seed=2)}, tmp_path / "badhands.safetensors")
    (tmp_path / "concepts" / "cat-toy").mkdir(parents=True)
    torch.save({"<cat-toy>": vectors(1, seed=3)[0]}, tmp_path / "concepts" / "cat-toy" / "learned_embeds.bin")
    (tmp_path / "notes.txt").write_text("not an embedding")
    return tmp_path


def input_row(text_encoder, token_id):
    return text_encoder.get_input_embeddings().weight[token_id]


def test_each_file_becomes_a_word_named_after_it_with_its_vectors(embeddings_dir, text_encoder):
    tokenizer = load_tokenizer()
    loaded = load_embeddings(embeddings_dir, tokenizer, text_encoder)
    assert sorted(loaded) == ["StyleThree", "badhands", "cat-toy"]
    ids = tokenizer.convert_tokens_to_ids(["StyleThree", "StyleThree_1", "StyleThree_2", "badhands", "cat-toy"])
    expected = [*vectors(3, seed=1), vectors(1, seed=2)[0], vectors(1, seed=3)[0]]
    for token_id, vector in zip(ids, expected, strict=True):
        assert torch.equal(input_row(text_encoder, token_id), vector)


@torch.no_grad()
def test_writing_the_name_uses_all_vectors_of_the_embedding(embeddings_dir, text_encoder):
    tokenizer = load_tokenizer()
    load_embeddings(embeddings_dir, tokenizer, text_encoder)
    three = tokenizer.convert_tokens_to_ids(["StyleThree", "StyleThree_1", "StyleThree_2"])
    expected = text_encoder(torch.tensor([[BOS, A, *three, CAT, EOS] + [EOS] * 70]))[0]
    assert torch.equal(encode_prompts(tokenizer, text_encoder, ["a stylethree cat"]), expected)  # CLIP lowercases


@torch.no_grad()
def test_matches_diffusers_load_textual_inversion(embeddings_dir, text_encoder):
    reference_encoder = copy.deepcopy(text_encoder)
    tokenizer, reference_tokenizer = load_tokenizer(), load_tokenizer()
    load_embeddings(embeddings_dir, tokenizer, text_encoder)
    parts = make_tiny_components()
    pipe = StableDiffusionPipeline(
        parts.vae, reference_encoder, reference_tokenizer, parts.unet, DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.load_textual_inversion(str(embeddings_dir / "concepts" / "cat-toy"))
    expected, _ = pipe.encode_prompt("a <cat-toy> on a table", "cpu", 1, False)
    assert torch.equal(encode_prompts(tokenizer, text_encoder, ["a cat-toy on a table"]), expected)


def test_multi_vector_embedding_is_not_split_between_chunks(embeddings_dir, text_encoder):
    tokenizer = load_tokenizer()
    load_embeddings(embeddings_dir, tokenizer, text_encoder)
    prompt = " ".join(["cat"] * 74) + " StyleThree"
    assert prompt_token_count(tokenizer, prompt) == (78, 150)  # 74 in the first chunk, then 3 vectors


def test_loading_again_keeps_registered_embeddings(embeddings_dir, text_encoder):
    tokenizer = load_tokenizer()
    first = load_embeddings(embeddings_dir, tokenizer, text_encoder)
    vocab_size = len(tokenizer)
    safetensors.torch.save_file({"emb_params": vectors(2, seed=4)}, embeddings_dir / "newer.safetensors")
    assert load_embeddings(embeddings_dir, tokenizer, text_encoder) == {
        **first,
        "newer": embeddings_dir / "newer.safetensors",
    }
    assert len(tokenizer) == vocab_size + 2


def test_vectors_of_another_size_are_refused_before_anything_is_registered(embeddings_dir, text_encoder):
    safetensors.torch.save_file({"emb_params": vectors(1, size=1024)}, embeddings_dir / "sd2style.safetensors")
    tokenizer = load_tokenizer()
    with pytest.raises(LdmError, match="sd2style.safetensors has vectors of size 1024.*uses 8"):
        load_embeddings(embeddings_dir, tokenizer, text_encoder)
    assert len(tokenizer) == 49408 and text_encoder.get_input_embeddings().weight.shape == (49408, 8)


@dataclass
class Payload:
    command: str


def test_pickles_are_read_as_weights_only(tmp_path):
    torch.save({"string_to_param": {"*": vectors(1)}, "extra": Payload("rm -rf /")}, tmp_path / "evil.pt")
    with pytest.raises(LdmError, match="cannot read embedding"):
        read_embedding(tmp_path / "evil.pt")


def test_unknown_layouts_are_refused(tmp_path):
    safetensors.torch.save_file({"a": vectors(1), "b": vectors(1)}, tmp_path / "two.safetensors")
    safetensors.torch.save_file({"clip_g": vectors(1, 1280), "clip_l": vectors(1, 768)}, tmp_path / "xl.safetensors")
    with pytest.raises(LdmError, match="not a textual inversion embedding"):
        read_embedding(tmp_path / "two.safetensors")
    with pytest.raises(LdmError, match="SDXL"):
        read_embedding(tmp_path / "xl.safetensors")


def test_name_that_is_already_a_clip_word_is_refused(tmp_path, text_encoder):
    safetensors.torch.save_file({"emb_params": vectors(1)}, tmp_path / "cat.safetensors")
    with pytest.raises(LdmError, match="'cat' is already a word"):
        load_embeddings(tmp_path, load_tokenizer(), text_encoder)


def test_ti_hashes_name_the_embeddings_used_with_a1111_short_hashes(embeddings_dir, text_encoder):
    tokenizer = load_tokenizer()
    loaded = load_embeddings(embeddings_dir, tokenizer, text_encoder)
    short = {name: hashlib.sha256(path.read_bytes()).hexdigest()[:12] for name, path in loaded.items()}
    infotext = ti_hashes_infotext(tokenizer, ["a (cat-toy:1.2)", "badhands, blurry"], loaded)
    assert infotext == {"TI hashes": f"cat-toy: {short['cat-toy']}, badhands: {short['badhands']}"}
    assert ti_hashes_infotext(tokenizer, ["a cat", ""], loaded) == {}
