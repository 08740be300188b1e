"""Textual inversion: A1111 and diffusers files load (pickles only as weights), their names work in prompts."""

import copy
import hashlib
import io
from dataclasses import dataclass

import pytest
import safetensors.torch
import torch
from conftest import make_tiny_components
from diffusers import DDIMScheduler, StableDiffusionPipeline

from ldmkit.embeddings import embedding_token_groups, load_embeddings, read_embedding, ti_hashes_infotext
from ldmkit.errors import InvalidRequest, LdmError
from ldmkit.loading import load_tokenizer
from ldmkit.prompts import count_prompt_chunks, encode_prompts, prompt_token_count

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
    with pytest.raises(LdmError, match="cannot read embedding .*evil.pt: it is not a PyTorch file of tensors only"):
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


def test_two_files_with_one_name_are_refused(tmp_path, text_encoder):
    safetensors.torch.save_file({"emb_params": vectors(1)}, tmp_path / "ink.safetensors")
    (tmp_path / "more").mkdir()
    save_a1111_pt(tmp_path / "more" / "ink.pt", vectors(1))
    with pytest.raises(
        LdmError, match="two embeddings are named 'ink': .*/ink.safetensors and .*/more/ink.pt; rename one"
    ):
        load_embeddings(tmp_path, load_tokenizer(), text_encoder)


def test_missing_folder_is_refused(tmp_path, text_encoder):
    with pytest.raises(LdmError, match="embeddings folder not found: .*nowhere"):
        load_embeddings(tmp_path / "nowhere", load_tokenizer(), text_encoder)


def test_damaged_files_are_refused_naming_the_file(tmp_path):
    buffer = io.BytesIO()
    torch.save({"emb_params": vectors(1)}, buffer)
    (tmp_path / "truncated.pt").write_bytes(buffer.getvalue()[:100])
    (tmp_path / "text.pt").write_text("not a tensor file")
    (tmp_path / "noise.safetensors").write_bytes(bytes(range(256)) * 4)
    for name in ("truncated.pt", "text.pt", "noise.safetensors"):
        with pytest.raises(LdmError, match=f"cannot read embedding .*{name}: "):
            read_embedding(tmp_path / name)


def test_vectors_that_are_not_a_matrix_are_refused(tmp_path):
    safetensors.torch.save_file({"emb_params": torch.zeros(2, 3, 8)}, tmp_path / "cube.safetensors")
    with pytest.raises(LdmError, match=r"cube.safetensors has vectors of shape \(2, 3, 8\), not \(count, size\)"):
        read_embedding(tmp_path / "cube.safetensors")


def test_tokens_two_embeddings_both_need_are_refused(tmp_path, text_encoder):
    safetensors.torch.save_file({"emb_params": vectors(2)}, tmp_path / "zqstyle.safetensors")  # zqstyle, zqstyle_1
    safetensors.torch.save_file({"emb_params": vectors(1)}, tmp_path / "zqstyle_1.safetensors")
    tokenizer = load_tokenizer()
    with pytest.raises(LdmError, match="embeddings 'zqstyle' and 'zqstyle_1' both need the token 'zqstyle_1'"):
        load_embeddings(tmp_path, tokenizer, text_encoder)
    assert len(tokenizer) == 49408  # nothing was registered
    (tmp_path / "zqstyle_1.safetensors").unlink()
    load_embeddings(tmp_path, tokenizer, text_encoder)
    safetensors.torch.save_file({"emb_params": vectors(1)}, tmp_path / "zqstyle_1.safetensors")  # added later
    with pytest.raises(LdmError, match="'zqstyle_1' is already a word of the CLIP vocabulary or an embedding's token"):
        load_embeddings(tmp_path, tokenizer, text_encoder)


def test_a_single_vector_embedding_is_not_joined_with_one_named_like_its_second_vector(tmp_path, text_encoder):
    safetensors.torch.save_file({"emb_params": vectors(1, seed=1)}, tmp_path / "zqstyle.safetensors")
    safetensors.torch.save_file({"emb_params": vectors(1, seed=2)}, tmp_path / "zqstyle_1.safetensors")
    tokenizer = load_tokenizer()
    load_embeddings(tmp_path, tokenizer, text_encoder)
    assert embedding_token_groups(tokenizer) == {}
    assert prompt_token_count(tokenizer, "zqstyle") == (1, 75)


def test_registering_many_vectors_adds_tokens_once_and_grows_the_embedding_once(tmp_path, text_encoder, monkeypatch):
    # 20,000 vectors in 200 files; adding them one call at a time took time quadratic in their number.
    for i in range(200):
        safetensors.torch.save_file({"emb_params": vectors(100, seed=i)}, tmp_path / f"style{i}.safetensors")
    tokenizer = load_tokenizer()
    calls = {"add_tokens": 0, "set_input_embeddings": 0}

    def counted(owner, method):
        original = getattr(owner, method)

        def call(*args, **kwargs):
            calls[method] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, method, call)

    counted(tokenizer, "add_tokens")
    counted(text_encoder, "set_input_embeddings")
    load_embeddings(tmp_path, tokenizer, text_encoder)
    assert calls == {"add_tokens": 1, "set_input_embeddings": 1}
    assert len(tokenizer) == text_encoder.get_input_embeddings().num_embeddings == 49408 + 20_000
    ids = tokenizer.convert_tokens_to_ids(["style7", "style7_1", "style7_99", "style199_99"])
    expected = torch.stack([vectors(100, seed=7)[0], vectors(100, seed=7)[1], vectors(100, seed=7)[99]])
    assert torch.equal(text_encoder.get_input_embeddings().weight[ids[:3]], expected)
    assert torch.equal(text_encoder.get_input_embeddings().weight[ids[3]], vectors(100, seed=199)[99])
    assert embedding_token_groups(tokenizer)[ids[0]] == tokenizer.convert_tokens_to_ids(
        ["style7"] + [f"style7_{i}" for i in range(1, 100)]
    )


@torch.no_grad()
def test_embedding_of_more_vectors_than_a_chunk_is_refused_where_a_prompt_uses_it(tmp_path, text_encoder):
    safetensors.torch.save_file({"emb_params": vectors(76)}, tmp_path / "huge.safetensors")
    tokenizer = load_tokenizer()
    load_embeddings(tmp_path, tokenizer, text_encoder)
    message = "embedding 'huge' has 76 vectors, more than the 75 tokens of a prompt chunk"
    with pytest.raises(InvalidRequest, match=message):
        count_prompt_chunks(tokenizer, "a huge cat")
    with pytest.raises(InvalidRequest, match=message):
        encode_prompts(tokenizer, text_encoder, ["", "a huge cat"])
    assert encode_prompts(tokenizer, text_encoder, ["a cat"]).shape == (1, 77, 8)


@pytest.mark.parametrize(("size", "count"), [(61, (150, 150)), (62, (212, 225))])
def test_words_carried_past_a_comma_and_an_embedding_that_does_not_fit_with_them(tmp_path, text_encoder, size, count):
    safetensors.torch.save_file({"emb_params": vectors(size)}, tmp_path / "zqlong.safetensors")
    tokenizer = load_tokenizer()
    load_embeddings(tmp_path, tokenizer, text_encoder)
    # 75 tokens: the comma is 15 from the end, so the 14 dogs move on to make room for the embedding;
    # 14 + 61 vectors fit in one chunk, 14 + 62 do not.
    prompt = " ".join(["cat"] * 60) + ", " + " ".join(["dog"] * 14) + " zqlong"
    assert prompt_token_count(tokenizer, prompt) == count
    assert count_prompt_chunks(tokenizer, prompt) == count[1] // 75
