"""The web UI's advanced options (ldmkit.server.ui_options): the tab's values -> the request's fields."""

import pytest
import torch
from support.tiny import make_tiny_components

pytest.importorskip("gradio")

from ldmkit.errors import InvalidRequest  # noqa: E402
from ldmkit.pipeline import Pipeline  # noqa: E402
from ldmkit.server.queue import GenerationQueue  # noqa: E402
from ldmkit.server.ui import _request, build_ui  # noqa: E402
from ldmkit.server.ui_options import advanced_kwargs, hires_pass_kwargs  # noqa: E402

BASE = {
    "prompt": "an otter", "negative": "", "steps": 2, "guidance": 7, "sampler": "Euler", "schedule_type": "Automatic",
    "seed": 1, "width": 16, "height": 16, "batch_size": 1, "n_iter": 1, "clip_skip": 1,
}  # fmt: skip


def test_the_tabs_show_the_advanced_options():
    queue = GenerationQueue(Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32))
    labels = [c["props"].get("label") for c in build_ui(queue).config["components"]]
    for label in ("Hires prompt (empty: the prompt)", "Hires sampler", "Variation strength", "Masked content"):
        assert label in labels, label
    assert labels.count("Tiling (seamless: the image tiles without seams)") == 3  # one per generation tab
    assert labels.count("Masked content") == 1  # the inpaint tab's only


def test_advanced_values_become_request_fields():
    assert advanced_kwargs({"tiling": False, "subseed": 5, "subseed_strength": 0}) == {"tiling": False, "vae": None}
    assert advanced_kwargs({"tiling": True, "subseed": -1, "subseed_strength": 0.25}) == {
        "tiling": True,
        "vae": None,
        "subseed": None,  # random, drawn when the request is prepared
        "subseed_strength": 0.25,
    }
    inpaint = {"tiling": False, "subseed": -1, "subseed_strength": 0}
    inpaint |= {"masked_content": "latent noise", "inpaint_area": "Only masked", "inpaint_padding": 48}
    assert advanced_kwargs(inpaint) == {
        "tiling": False,
        "vae": None,
        "masked_content": "latent_noise",
        "inpaint_only_masked": True,
        "inpaint_padding": 48,
    }
    same = {"hires_prompt": "", "hires_negative": None, "hires_sampler": "Use same sampler"}
    assert hires_pass_kwargs(same) == {"prompt": "", "negative_prompt": "", "sampler": None}
    own = {"hires_prompt": "a sea otter", "hires_negative": "blur", "hires_sampler": "DDIM"}
    assert hires_pass_kwargs(own) == {"prompt": "a sea otter", "negative_prompt": "blur", "sampler": "DDIM"}


def test_seed_resize_needs_both_sides():
    assert "seed_resize_from" not in advanced_kwargs({"seed_resize_w": 512, "seed_resize_h": 0})
    request = _request(BASE | {"seed_resize_w": 24, "seed_resize_h": 8}, 1 << 20)
    assert request.seed_resize_from == (24, 8)


def test_eta_and_ensd_are_sent_only_when_set():
    assert "eta" not in advanced_kwargs({"eta": " ", "ensd": 0}) and "eta_noise_seed_delta" not in advanced_kwargs({})
    request = _request(BASE | {"sampler": "Euler a", "eta": "0.5", "ensd": 31337}, 1 << 20)
    assert (request.eta, request.eta_noise_seed_delta) == (0.5, 31337)
    with pytest.raises(InvalidRequest, match="eta must be a number from 0 to 1, or empty for the sampler's default"):
        advanced_kwargs({"eta": "half"})


def test_the_request_carries_them():
    values = BASE | {"tiling": True, "subseed": 7, "subseed_strength": 0.5, "hires": True, "hires_scale": 2.0}
    values |= {"hires_strength": 0.6, "hires_steps": 0, "hires_upscaler": "Latent", "hires_prompt": "a sea otter"}
    values |= {"hires_negative": "", "hires_sampler": "DDIM"}
    request = _request(values, 1 << 20)
    assert (request.tiling, request.subseed, request.subseed_strength) == (True, 7, 0.5)
    assert (request.hires.prompt, request.hires.sampler, request.hires.scale) == ("a sea otter", "DDIM", 2.0)


def test_the_vae_dropdown_names_the_servers_vaes_as_sd_vae_does(tmp_path):
    from support.convert import save_vae_file

    save_vae_file(make_tiny_components().vae, tmp_path / "other.safetensors")
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32, vae_dir=tmp_path)
    dropdowns = [c["props"] for c in build_ui(GenerationQueue(pipe)).config["components"]]
    vae_choices = [[choice[0] for choice in d["choices"]] for d in dropdowns if d.get("label") == "VAE"]
    assert vae_choices == [["Automatic", "None", "other.safetensors"]] * 3  # one per generation tab
    assert advanced_kwargs({"vae": "Automatic"}, automatic_vae="/vaes/ft-mse.safetensors")["vae"] == (
        "/vaes/ft-mse.safetensors"
    )
    assert advanced_kwargs({"vae": "None"}, automatic_vae="/vaes/ft-mse.safetensors")["vae"] is None
    assert _request(BASE | {"vae": "other.safetensors"}, 1 << 20).vae == "other.safetensors"
    no_vaes = [
        c["props"].get("label")
        for c in build_ui(GenerationQueue(Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32))).config[
            "components"
        ]
    ]
    assert "VAE" not in no_vaes  # a server without VAEs shows no dropdown
