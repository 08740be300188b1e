"""SDXL textual inversion: a file's clip_l and clip_g vectors go to the two encoders under one name, as diffusers'
`load_textual_inversion` called once per encoder/tokenizer pair puts them; generation matches that reference."""

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionXLPipeline
from support.sdxl import HIDDEN, make_tiny_sdxl_components
from support.tiny import make_tiny_components
from test_parity import assert_parity, diffusers_images, ours_as_float, reference_scheduler

from ldmkit import Pipeline
from ldmkit.embeddings import embedding_shape, load_embeddings
from ldmkit.errors import LdmError
from ldmkit.families import reference_pipeline
from ldmkit.loading import load_tokenizer

WIDTH, HEIGHT = 24, 16


def sdxl_embedding(count: int, seed: int) -> dict[str, torch.Tensor]:
    """As SDXL embeddings are saved (safetensors, one tensor per encoder); the tiny encoders are both 8 wide."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "clip_l": torch.randn(count, HIDDEN, generator=generator),
        "clip_g": torch.randn(count, HIDDEN, generator=generator),
    }


@pytest.fixture
def embeddings_dir(tmp_path):
    safetensors.torch.save_file(sdxl_embedding(2, seed=1), tmp_path / "glowstyle.safetensors")
    safetensors.torch.save_file(sdxl_embedding(1, seed=2), tmp_path / "badlight.safetensors")
    return tmp_path


def load_reference(components, embeddings_dir):
    """diffusers' documented way for SDXL: load_textual_inversion for each encoder with its own tensor."""
    reference = reference_pipeline(components, None, StableDiffusionXLPipeline)
    for name in ("glowstyle", "badlight"):
        state = safetensors.torch.load_file(embeddings_dir / f"{name}.safetensors")
        reference.load_textual_inversion(
            state["clip_l"], token=name, text_encoder=reference.text_encoder, tokenizer=reference.tokenizer
        )
        reference.load_textual_inversion(
            state["clip_g"], token=name, text_encoder=reference.text_encoder_2, tokenizer=reference.tokenizer_2
        )
    return reference


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_generation_matches_diffusers_load_textual_inversion(embeddings_dir, sampler):
    ours_components, their_components = make_tiny_sdxl_components(seed=0), make_tiny_sdxl_components(seed=0)
    prompt, negative = "a glowstyle otter in a river", "badlight, blurry"
    reference = load_reference(their_components, embeddings_dir)
    reference.scheduler = reference_scheduler(their_components, sampler, [7])
    reference.set_progress_bar_config(disable=True)
    theirs = reference(
        prompt, negative_prompt=negative, num_inference_steps=6, guidance_scale=7.0, width=WIDTH, height=HEIGHT,
        generator=[torch.Generator().manual_seed(7)], output_type="np",
    ).images  # fmt: skip
    pipe = Pipeline(ours_components, torch.device("cpu"), torch.float32, embeddings_dir=embeddings_dir)
    assert set(pipe.embeddings) == {"glowstyle", "badlight"}
    kwargs = {"negative_prompt": negative, "steps": 6, "guidance": 7.0, "sampler": sampler, "seed": 7}
    ours_float, ours_uint8 = ours_as_float(pipe, prompt=prompt, width=WIDTH, height=HEIGHT, **kwargs)
    assert_parity(ours_float, ours_uint8, theirs)
    plain = diffusers_images(
        StableDiffusionXLPipeline, make_tiny_sdxl_components(seed=0), sampler, [7], prompt,
        negative_prompt=negative, num_inference_steps=6, guidance_scale=7.0, width=WIDTH, height=HEIGHT,
    )  # fmt: skip
    assert np.abs(ours_float - plain).max() > 1e-3  # without the embeddings the words are plain text: it differs


def test_each_encoder_gets_its_own_vectors_under_the_same_name(embeddings_dir):
    components = make_tiny_sdxl_components(seed=0)
    load_embeddings(
        embeddings_dir, components.tokenizer, components.text_encoder, components.tokenizer_2, components.text_encoder_2
    )
    expected = sdxl_embedding(2, seed=1)
    for key, tokenizer, encoder in (
        ("clip_l", components.tokenizer, components.text_encoder),
        ("clip_g", components.tokenizer_2, components.text_encoder_2),
    ):
        ids = tokenizer.convert_tokens_to_ids(["glowstyle", "glowstyle_1"])
        assert torch.equal(encoder.get_input_embeddings().weight[ids], expected[key])


def test_refiner_takes_clip_g_alone(embeddings_dir):
    refiner = make_tiny_sdxl_components(seed=4, kind="refiner")
    load_embeddings(embeddings_dir, None, None, refiner.tokenizer_2, refiner.text_encoder_2)
    ids = refiner.tokenizer_2.convert_tokens_to_ids(["badlight"])
    assert torch.equal(refiner.text_encoder_2.get_input_embeddings().weight[ids], sdxl_embedding(1, seed=2)["clip_g"])


def test_sd_embedding_on_sdxl_and_mismatched_files_are_refused(tmp_path):
    components = make_tiny_sdxl_components(seed=0)
    args = (components.tokenizer, components.text_encoder, components.tokenizer_2, components.text_encoder_2)
    (tmp_path / "sd").mkdir()
    safetensors.torch.save_file({"emb_params": torch.zeros(1, HIDDEN)}, tmp_path / "sd" / "old.safetensors")
    with pytest.raises(LdmError, match="old.safetensors is not an SDXL embedding"):
        load_embeddings(tmp_path / "sd", *args)
    (tmp_path / "counts").mkdir()
    safetensors.torch.save_file(
        {"clip_l": torch.zeros(2, HIDDEN), "clip_g": torch.zeros(1, HIDDEN)}, tmp_path / "counts" / "odd.safetensors"
    )
    with pytest.raises(LdmError, match="2 clip_l but 1 clip_g"):
        load_embeddings(tmp_path / "counts", *args)
    (tmp_path / "wide").mkdir()
    safetensors.torch.save_file(
        {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, tmp_path / "wide" / "real.safetensors"
    )
    with pytest.raises(LdmError, match="size 768, but this model's text encoder uses 8"):
        load_embeddings(tmp_path / "wide", *args)
    assert len(components.tokenizer) == len(components.tokenizer_2) == 49408  # nothing registered


def test_sdxl_embedding_is_refused_on_an_sd_model(embeddings_dir):
    with pytest.raises(LdmError, match="is an SDXL embedding"):
        load_embeddings(embeddings_dir, load_tokenizer(), make_tiny_components().text_encoder)


def test_listed_shape_adds_both_widths_as_a1111_does(embeddings_dir):
    assert embedding_shape(embeddings_dir / "glowstyle.safetensors") == (2, 2 * HIDDEN)


def test_the_refiner_reads_the_same_embeddings(embeddings_dir, tmp_path_factory):
    """`--embeddings-dir` applies to `--refiner` too: its bigG takes each file's clip_g vectors."""
    from argparse import Namespace

    from ldmkit.cli_options import load_pipelines
    from ldmkit.loading import save_pretrained

    models = tmp_path_factory.mktemp("models")  # not in the embeddings folder
    base = save_pretrained(make_tiny_sdxl_components(seed=0), models / "base")
    refiner = save_pretrained(make_tiny_sdxl_components(seed=4, kind="refiner"), models / "refiner")
    args = Namespace(
        model=str(base), refiner=str(refiner), dtype="fp32", config=None, lora_dir=None,
        embeddings_dir=embeddings_dir, controlnet_dir=None, fast=False, vae_tiling=False, offload=False, vae=None,
        upscalers_dir=None,
    )  # fmt: skip
    pipe, refiner_pipe = load_pipelines(args, "cpu")
    assert set(refiner_pipe.embeddings) == set(pipe.embeddings) == {"glowstyle", "badlight"}
    state = refiner_pipe.state
    ids = state.tokenizer_2.convert_tokens_to_ids(["glowstyle", "glowstyle_1"])
    assert torch.equal(state.text_encoder_2.get_input_embeddings().weight[ids], sdxl_embedding(2, seed=1)["clip_g"])
