"""VAE selection (GenerationParams.vae, --vae, --vae-dir, sd_vae), A1111's options kept for the server's life, and
/sdapi/v1/skip."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from conftest import make_tiny_components
from PIL import Image
from support.convert import save_vae_file

from ldmkit.cli import main
from ldmkit.errors import InvalidRequest, ModelLoadError
from ldmkit.loading import load_vae, save_pretrained
from ldmkit.metadata import parse_infotext, read_infotext
from ldmkit.pipeline import Pipeline
from ldmkit.refiner import checkpoint_shorthash

CPU = torch.device("cpu")
REQUEST = {
    "prompt": "a red cube",
    "steps": 3,
    "width": 16,
    "height": 16,
    "seed": 4,
    "sampler": "Euler",
    "guidance": 7.0,
}


def other_vae():
    """A VAE of the tiny model's shape with other random weights: its images differ visibly."""
    return make_tiny_components(seed=1).vae


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """other-vae (a diffusers folder) and other.safetensors (the same weights in A1111's single-file layout)."""
    folder = tmp_path_factory.mktemp("vaes")
    other_vae().save_pretrained(folder / "other-vae")
    save_vae_file(other_vae(), folder / "other.safetensors")
    return folder


def pipeline(**kwargs) -> Pipeline:
    return Pipeline(make_tiny_components(), CPU, torch.float32, **kwargs)


def with_other_vae() -> Pipeline:
    """The reference: the same model built with the other VAE as its own; its latents are the tiny model's."""
    return Pipeline(dataclasses.replace(make_tiny_components(), vae=other_vae()), CPU, torch.float32)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# -- loading --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["other-vae", "other.safetensors"])
def test_a_vae_folder_and_an_original_single_file_load_the_same_weights(vae_dir, name):
    loaded = load_vae(vae_dir / name, make_tiny_components().vae)
    expected = other_vae().state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict()[key], tensor) for key, tensor in expected.items())


def test_a_vae_of_another_latent_space_is_refused(tmp_path):
    wider = type(other_vae())(
        block_out_channels=[4, 8], latent_channels=8, norm_num_groups=2, sample_size=16,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )  # fmt: skip
    wider.save_pretrained(tmp_path / "wide")
    with pytest.raises(
        ModelLoadError, match="VAE wide does not fit this model: latent_channels 8 where the model has 4"
    ):
        load_vae(tmp_path / "wide", make_tiny_components().vae)
    save_vae_file(wider, tmp_path / "wide.safetensors")  # read with the model's config: its shapes do not fit
    with pytest.raises(ModelLoadError, match=r"wide\.safetensors: the vae weights do not fit its config"):
        load_vae(tmp_path / "wide.safetensors", make_tiny_components().vae)


# -- the pipeline ---------------------------------------------------------------------------------------------------


def test_the_library_lists_files_and_diffusers_folders_by_a1111s_names(vae_dir, tmp_path):
    pipe = pipeline(vae_dir=vae_dir, vae=vae_dir / "other-vae")
    assert pipe.vaes.names() == ["other-vae", "other.safetensors"]  # the --vae one first, then the folder's
    assert pipe.vaes.resolve("other.safetensors") == vae_dir / "other.safetensors"
    with pytest.raises(InvalidRequest, match="unknown VAE 'kl-f8.pt'; the VAEs are: other-vae, other.safetensors"):
        pipe.vaes.resolve("kl-f8.pt")


@pytest.mark.parametrize("name", ["other-vae", "other.safetensors"])
def test_a_requests_vae_decodes_the_same_latents_and_is_undone_after(vae_dir, name):
    pipe = pipeline(vae_dir=vae_dir)
    own = pipe.generate(**REQUEST)
    seen = []
    result = pipe.generate(**REQUEST, vae=name, callback=lambda step: seen.append(pipe.state.transforms))
    assert np.array_equal(pixels(result.images[0]), pixels(with_other_vae().generate(**REQUEST).images[0]))
    assert not np.array_equal(pixels(result.images[0]), pixels(own.images[0]))
    assert seen and all(transforms == (f"vae:{name}",) for transforms in seen)  # on record while it runs
    assert pipe.state.transforms == () and pipe.vae is pipe.components.vae
    assert np.array_equal(pixels(pipe.generate(**REQUEST).images[0]), pixels(own.images[0]))  # bit-identical


def test_img2img_encodes_with_the_requests_vae_too(vae_dir):
    init = Image.new("RGB", (16, 16), (200, 40, 40))
    result = pipeline(vae_dir=vae_dir).generate(**REQUEST, init_image=init, strength=0.6, vae="other-vae")
    reference = with_other_vae().generate(**REQUEST, init_image=init, strength=0.6)
    assert np.array_equal(pixels(result.images[0]), pixels(reference.images[0]))


def test_the_infotext_names_the_vae_as_a1111_does(vae_dir):
    pipe = pipeline(vae_dir=vae_dir)
    file_text = parse_infotext(pipe.generate(**REQUEST, vae="other.safetensors").infotexts[0])
    assert file_text["VAE"] == "other.safetensors"
    assert file_text["VAE hash"] == checkpoint_shorthash(vae_dir / "other.safetensors")
    folder_text = parse_infotext(pipe.generate(**REQUEST, vae="other-vae").infotexts[0])
    assert folder_text["VAE"] == "other-vae" and "VAE hash" not in folder_text
    assert "VAE" not in parse_infotext(pipe.generate(**REQUEST).infotexts[0])


def test_an_unknown_vae_is_refused_before_any_compute(vae_dir):
    with pytest.raises(InvalidRequest, match="unknown VAE 'nope'"):
        pipeline(vae_dir=vae_dir).prepare(dataclasses.replace(_params(), vae="nope"))


def _params():
    from ldmkit.params import GenerationParams

    return GenerationParams(**REQUEST)


# -- the CLI --------------------------------------------------------------------------------------------------------


def test_generate_with_vae_decodes_with_that_file(vae_dir, tmp_path):
    model = tmp_path / "tiny-model"
    save_pretrained(make_tiny_components(), model)
    args = [
        "generate",
        "a red cube",
        "--steps",
        "3",
        "--seed",
        "4",
        "--size",
        "16x16",
        "--sampler",
        "Euler",
        "--guidance",
        "7",
    ]
    common = [*args, "--model", str(model), "--device", "cpu", "-q", "-o", str(tmp_path / "out")]
    assert main([*common, "--vae", str(vae_dir / "other.safetensors")]) == 0
    (written,) = (tmp_path / "out").glob("*.png")
    reference = with_other_vae().generate(**REQUEST).images[0]
    assert np.array_equal(pixels(Image.open(written)), pixels(reference))
    assert "VAE: other.safetensors" in read_infotext(written)


def test_generate_with_a_missing_vae_is_one_line_before_loading(tmp_path, capsys):
    args = ["generate", "x", "--vae", str(tmp_path / "none.safetensors"), "--model", str(tmp_path / "no-model")]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == f"ldm: error: VAE not found: {tmp_path / 'none.safetensors'}"


# -- the server: /sd-vae, sd_vae, options -----------------------------------------------------------------------------

FAST = {"prompt": "a red cube", "width": 16, "height": 16, "steps": 3, "seed": 4, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def reference_pixels():
    """The own VAE's and the other VAE's image of FAST."""
    return pixels(pipeline().generate(**REQUEST).images[0]), pixels(with_other_vae().generate(**REQUEST).images[0])


@pytest.fixture
def server(vae_dir):
    """A fresh server each test: options persist for a server's life."""
    pytest.importorskip("fastapi", reason="server extras not installed")
    from e2e.serving import serve_tiny

    with serve_tiny(pipe_kwargs={"vae_dir": vae_dir}, ui=False) as (url, pipe, app):
        yield url, pipe


def txt2img(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/sdapi/v1/txt2img", json={**FAST, **body}, timeout=60)


def image_of(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))


def options(url: str) -> dict:
    return requests.get(f"{url}/sdapi/v1/options", timeout=10).json()


def set_options(url: str, **values) -> requests.Response:
    return requests.post(f"{url}/sdapi/v1/options", json=values, timeout=10)


def test_sd_vae_lists_the_folder_as_a1111_does(server):
    url, _ = server
    assert requests.get(f"{url}/sdapi/v1/sd-vae", timeout=10).json() == [
        {"model_name": "other-vae", "filename": "other-vae"},
        {"model_name": "other.safetensors", "filename": "other.safetensors"},
    ]


def test_override_settings_sd_vae_applies_to_its_request_only(server, reference_pixels):
    url, pipe = server
    own, other = reference_pixels
    response = txt2img(url, override_settings={"sd_vae": "other.safetensors"})
    assert np.array_equal(image_of(response), other)
    info = json.loads(response.json()["info"])
    assert info["sd_vae_name"] == "other.safetensors" and info["sd_vae_hash"] == checkpoint_shorthash(
        pipe.vaes.resolve("other.safetensors")
    )
    assert "VAE: other.safetensors" in info["infotexts"][0]
    assert options(url)["sd_vae"] == "Automatic"
    assert np.array_equal(image_of(txt2img(url)), own)  # restored: bit-identical
    for name in ("None", "Automatic"):
        assert np.array_equal(image_of(txt2img(url, override_settings={"sd_vae": name})), own)


def test_options_persist_and_override_settings_win_over_them(server, reference_pixels):
    url, _ = server
    own, other = reference_pixels
    assert set_options(url, sd_vae="other-vae", CLIP_stop_at_last_layers=2, eta_noise_seed_delta=0).status_code == 200
    assert {k: options(url)[k] for k in ("sd_vae", "CLIP_stop_at_last_layers", "eta_noise_seed_delta")} == {
        "sd_vae": "other-vae", "CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 0,
    }  # fmt: skip
    kept = txt2img(url)
    assert "Clip skip: 2" in json.loads(kept.json()["info"])["infotexts"][0]
    reference = with_other_vae().generate(**REQUEST, clip_skip=2).images[0]
    assert np.array_equal(image_of(kept), pixels(reference))
    overridden = txt2img(url, override_settings={"sd_vae": "None", "CLIP_stop_at_last_layers": 1})
    assert np.array_equal(image_of(overridden), own)
    assert options(url)["sd_vae"] == "other-vae"  # restored afterwards (A1111's default)
    assert set_options(url, sd_vae="None", CLIP_stop_at_last_layers=1).status_code == 200
    assert np.array_equal(image_of(txt2img(url)), own)
    assert not np.array_equal(other, own)


def test_a_stored_ensd_runs_as_an_override_would(server):
    url, _ = server
    ancestral = {"sampler_name": "Euler a", "steps": 4}
    overridden = image_of(txt2img(url, **ancestral, override_settings={"eta_noise_seed_delta": 31337}))
    assert not np.array_equal(overridden, image_of(txt2img(url, **ancestral)))  # ENSD changes Euler a's noise
    assert set_options(url, eta_noise_seed_delta=31337).status_code == 200
    assert options(url)["eta_noise_seed_delta"] == 31337
    assert np.array_equal(image_of(txt2img(url, **ancestral)), overridden)
    restored = txt2img(url, **ancestral, override_settings={"eta_noise_seed_delta": 0})
    assert not np.array_equal(image_of(restored), overridden) and options(url)["eta_noise_seed_delta"] == 31337


def test_override_settings_restore_afterwards_false_keeps_them(server, reference_pixels):
    url, _ = server
    _, other = reference_pixels
    body = {"override_settings": {"sd_vae": "other.safetensors"}, "override_settings_restore_afterwards": False}
    assert np.array_equal(image_of(txt2img(url, **body)), other)
    assert options(url)["sd_vae"] == "other.safetensors"
    assert np.array_equal(image_of(txt2img(url)), other)


@pytest.mark.parametrize(
    "values, reason",
    [
        ({"sd_vae": "kl-f8.pt"}, "options.sd_vae: unknown VAE 'kl-f8.pt'; this server has: Automatic, None, other-vae"),
        ({"eta_noise_seed_delta": -1}, "options.eta_noise_seed_delta must be an integer from 0"),
        ({"sd_vae": "other-vae", "samples_format": "jpg"}, "options: samples_format not supported"),
    ],
)
def test_options_are_all_or_nothing_and_refuse_by_name(server, values, reason):
    url, _ = server
    refused = set_options(url, **values)
    assert refused.status_code == 400 and reason in refused.json()["detail"]
    assert options(url)["sd_vae"] == "Automatic"  # nothing kept


def test_serve_vae_is_what_automatic_runs(vae_dir, reference_pixels):
    pytest.importorskip("fastapi", reason="server extras not installed")
    from e2e.serving import serve_tiny

    own, other = reference_pixels
    with serve_tiny(pipe_kwargs={"vae": vae_dir / "other.safetensors"}, ui=False) as (url, _, _):
        assert np.array_equal(image_of(txt2img(url)), other)
        assert np.array_equal(image_of(txt2img(url, override_settings={"sd_vae": "None"})), own)
        listed = requests.get(f"{url}/sdapi/v1/sd-vae", timeout=10).json()
        assert listed == [{"model_name": "other.safetensors", "filename": "other.safetensors"}]


# -- skip -------------------------------------------------------------------------------------------------------------


def test_skip_ends_the_current_batch_and_the_next_goes_on(server):
    url, pipe = server
    body = {**FAST, "steps": 4, "n_iter": 2, "seed": 10}
    pipe.hold(at_step=1)  # batch 0 waits at its step 1
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(lambda: requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60))
            assert pipe.held.wait(timeout=60)
            assert requests.post(f"{url}/sdapi/v1/skip", timeout=10).json() == {}
            pipe.release()
            response = pending.result(timeout=60)
    finally:
        pipe.release()
    assert response.status_code == 200, response.text
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in response.json()["images"]]
    assert len(images) == 2 and json.loads(response.json()["info"])["all_seeds"] == [10, 11]
    # batch 1 is whole: the image of seed 11 alone; batch 0 stopped where an interrupt at that step stops it
    assert np.array_equal(images[1], image_of(txt2img(url, steps=4, seed=11)))
    steps = []  # the reference: an interrupt once two steps (0 and 1) are done, with a callback as the queue has
    partial = pipeline().generate(
        **{**REQUEST, "steps": 4, "seed": 10}, callback=steps.append, should_stop=lambda: len(steps) >= 2
    )
    assert np.array_equal(images[0], pixels(partial.images[0]))
    assert not np.array_equal(images[0], image_of(txt2img(url, steps=4, seed=10)))
