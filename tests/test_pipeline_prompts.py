"""A1111 prompt features through Pipeline.generate, each against a reference: diffusers' pipeline given the
conditioning the feature should produce, or the model with the LoRA merged into its weights."""

import copy

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import make_tiny_components
from diffusers import StableDiffusionPipeline
from test_embeddings import save_a1111_pt, vectors
from test_lora import kohya_lora
from test_parity import diffusers_images, ours_as_float

from ldmkit import Pipeline
from ldmkit.errors import InvalidRequest
from ldmkit.families import reference_pipeline
from ldmkit.metadata import parse_infotext
from ldmkit.samplers import get_sampler

SAMPLER, STEPS, SEED, SIZE = "DDIM", 3, 0, 16


def pixels(result):
    return np.asarray(result.images[0], dtype=int)


def with_trained_like_layer_norm(components):
    # A fresh final LayerNorm (weight 1, bias 0) zeroes each token's mean, which leaves emphasis nothing to restore.
    norm = getattr(components.text_encoder, "text_model", components.text_encoder).final_layer_norm
    torch.nn.init.normal_(norm.weight, 1.0, 0.2, generator=torch.Generator().manual_seed(0))
    torch.nn.init.normal_(norm.bias, 0.1, 0.2, generator=torch.Generator().manual_seed(1))
    return components


@pytest.fixture
def components():
    return with_trained_like_layer_norm(make_tiny_components())


@pytest.fixture
def pipe(components):
    return Pipeline(components, torch.device("cpu"), torch.float32)


def assert_same_image(ours_float, reference_float):
    # The same weights, inputs and sampler: only float rounding may differ. The tiny model's images move by about
    # 1e-3 for an emphasis of 1.5 instead of 1.6, so the tolerance must be far below that.
    assert ours_float.shape == reference_float.shape
    assert np.abs(ours_float - reference_float).max() < 2e-5


def ours(pipe, prompt, **kwargs):
    return ours_as_float(
        pipe, prompt=prompt, steps=STEPS, seed=SEED, sampler=SAMPLER, width=SIZE, height=SIZE, **kwargs
    )


def theirs(components, prompt_embeds, negative_prompt_embeds):
    """diffusers' pipeline on the same weights, given the conditioning directly."""
    return diffusers_images(
        StableDiffusionPipeline,
        components,
        SAMPLER,
        [SEED],
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        width=SIZE,
        height=SIZE,
    )


@torch.no_grad()
def encode_window(pipe, ids: list[int], text_encoder=None) -> torch.Tensor:
    """(1, 77, D): one CLIP call on start + ids + end, padded with the end token."""
    window = [pipe.tokenizer.bos_token_id, *ids, pipe.tokenizer.eos_token_id]
    window += [pipe.tokenizer.pad_token_id] * (77 - len(window))
    return (text_encoder or pipe.text_encoder)(torch.tensor([window]))[0]


def token_ids(pipe, text: str) -> list[int]:
    return pipe.tokenizer(text, add_special_tokens=False).input_ids


def test_emphasis_conditions_as_the_scaled_embedding_with_its_mean_restored(pipe, components):
    plain = encode_window(pipe, token_ids(pipe, "an otter in a river"))  # start, an, otter, ...
    weights = torch.ones(1, 77, 1)
    weights[0, 2] = 1.6
    emphasised = plain * weights
    emphasised = emphasised * (plain.mean() / emphasised.mean())
    reference = theirs(components, emphasised, encode_window(pipe, []))
    assert_same_image(ours(pipe, "an (otter:1.6) in a river")[0], reference)


def test_long_prompt_conditions_as_its_75_token_windows_side_by_side(pipe, components):
    prompt = " ".join(["otter"] * 100)  # 100 tokens, no comma: windows of 75 and 25
    otter = token_ids(pipe, "otter")
    prompt_embeds = torch.cat([encode_window(pipe, otter * 75), encode_window(pipe, otter * 25)], dim=1)
    negative = torch.cat([encode_window(pipe, [])] * 2, dim=1)  # the empty negative prompt, padded to 2 windows
    assert_same_image(ours(pipe, prompt)[0], theirs(components, prompt_embeds, negative))


def test_clip_skip_conditions_as_the_encoder_without_its_last_layer_and_is_recorded(pipe, components):
    truncated = copy.deepcopy(pipe.text_encoder)
    del getattr(truncated, "text_model", truncated).encoder.layers[-1]
    reference = theirs(
        components,
        encode_window(pipe, token_ids(pipe, "otter"), truncated),
        encode_window(pipe, [], truncated),
    )
    assert_same_image(ours(pipe, "otter", clip_skip=2)[0], reference)
    skipped = pipe.generate("otter", steps=2, seed=0, clip_skip=2)
    assert parse_infotext(skipped.infotexts[0])["Clip skip"] == "2"
    assert "Clip skip" not in parse_infotext(pipe.generate("otter", steps=2, seed=0).infotexts[0])
    with pytest.raises(InvalidRequest, match="^clip_skip must be an integer from 1 to 2, not 5$"):
        pipe.generate("otter", steps=2, clip_skip=5)


def test_lora_from_a_prompt_tag_or_the_api_is_the_model_with_the_lora_merged_then_removed_again(tmp_path):
    components = make_tiny_components()
    deltas = kohya_lora(tmp_path / "ink.safetensors", components, alpha=8.0)  # {module: delta at weight 1}
    merged = copy.deepcopy(components)
    with torch.no_grad():
        for name, delta in deltas.items():
            owner, module = name.split(".", 1)
            getattr(merged, owner).get_submodule(module).weight += (
                0.7 * delta
            )  # A1111: weight * alpha / rank * up @ down
    reference = Pipeline(merged, torch.device("cpu"), torch.float32)
    pipe = Pipeline(components, torch.device("cpu"), torch.float32, lora_dir=tmp_path)
    before = pixels(pipe.generate("otter", steps=STEPS, seed=SEED))
    tagged_float, tagged = ours(pipe, "otter <lora:ink:0.7>")
    _, by_api = ours(pipe, "otter", loras=[(tmp_path / "ink.safetensors", 0.7)])
    after = pixels(pipe.generate("otter", steps=STEPS, seed=SEED))
    reference_float, _ = ours(reference, "otter")
    assert_same_image(tagged_float, reference_float)
    assert np.array_equal(tagged, by_api)
    assert np.array_equal(before, after)
    params = parse_infotext(pipe.generate("otter <lora:ink:0.7>", steps=1, seed=SEED).infotexts[0])
    assert params["Prompt"] == "otter <lora:ink:0.7>" and params["Lora hashes"].startswith("ink: ")


def test_lora_errors_are_clear(tmp_path, pipe):
    with pytest.raises(InvalidRequest, match="no LoRA folder"):
        pipe.generate("otter <lora:ink:1>", steps=2)
    with pytest.raises(InvalidRequest, match="LoRA file not found"):
        pipe.generate("otter", steps=2, loras=[(tmp_path / "missing.safetensors", 1.0)])


def test_embedding_name_in_the_prompt_conditions_as_diffusers_textual_inversion(tmp_path):
    save_a1111_pt(tmp_path / "otterstyle.pt", vectors(2, size=8, seed=3) * 5)
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32, embeddings_dir=tmp_path)
    components = make_tiny_components()  # the same weights
    reference = reference_pipeline(components, get_sampler(SAMPLER).make_scheduler(components.scheduler_config))
    reference.load_textual_inversion(str(tmp_path / "otterstyle.pt"), token="otterstyle")
    reference.set_progress_bar_config(disable=True)
    generator = [torch.Generator("cpu").manual_seed(SEED)]
    expected = reference(
        "otter otterstyle", num_inference_steps=STEPS, width=SIZE, height=SIZE, generator=generator, output_type="np"
    ).images
    assert_same_image(ours(pipe, "otter otterstyle")[0], expected)
    styled = pipe.generate("otter otterstyle", steps=1, seed=SEED)
    assert parse_infotext(styled.infotexts[0])["TI hashes"].startswith("otterstyle: ")


def test_embedding_longer_than_a_chunk_is_refused_before_any_step(tmp_path):
    safetensors.torch.save_file({"emb_params": vectors(76)}, tmp_path / "zqhuge.safetensors")
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32, embeddings_dir=tmp_path)
    steps = []
    with pytest.raises(InvalidRequest, match="^embedding 'zqhuge' has 76 vectors, more than the 75 tokens"):
        pipe.generate("an otter zqhuge", steps=2, callback=steps.append)
    assert steps == []


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
