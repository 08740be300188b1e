"""--offload (ldmkit.offload): refused off CUDA, hooks installed and recorded, images unchanged by them."""

import argparse

import numpy as np
import pytest
import torch
from support.sdxl import make_tiny_sdxl_components

from ldmkit import Pipeline
from ldmkit.cli import main
from ldmkit.errors import InvalidRequest
from ldmkit.offload import check_offload, install_offload_hooks
from ldmkit.upscalers import UpscalerLibrary

GENERATE = {"prompt": "otter", "steps": 3, "sampler": "Euler", "seed": 4, "width": 16, "height": 16}


def test_offload_is_refused_on_the_cpu_with_one_line():
    pipe = Pipeline(make_tiny_sdxl_components(), torch.device("cpu"), torch.float32)
    with pytest.raises(InvalidRequest, match=r"^--offload needs a CUDA GPU .*, not cpu$"):
        pipe.enable_offload()
    assert not pipe.state.has("offload")


def test_offload_with_fast_is_refused():
    with pytest.raises(InvalidRequest, match="--offload does not go with --fast"):
        check_offload(torch.device("cuda"), fast=True)


@pytest.mark.parametrize("command", [["generate", "otter", "-q"], ["serve", "--port", "0", "--no-ui"]])
def test_the_command_line_refuses_offload_on_the_cpu_before_loading(command, capsys):
    assert main([*command, "--offload", "--device", "cpu", "--model", "/no/such/model"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "ldm: error: --offload needs a CUDA GPU (it keeps the models on the CPU between runs), not cpu"
    ]


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_hooks_are_installed_on_every_model_recorded_and_leave_the_images_unchanged(kind):
    """On the CPU as execution device (the transform's device check bypassed): the hooks run on every forward."""
    components = make_tiny_sdxl_components(seed=1, kind=kind)
    pipe = Pipeline(components, torch.device("cpu"), torch.float32)
    expected = pipe.generate(**GENERATE).images[0]
    pipe.apply(install_offload_hooks)
    models = [m for m in (pipe.text_encoder, pipe.state.text_encoder_2, pipe.unet, pipe.vae) if m is not None]
    assert pipe.state.transforms == ("offload",)
    assert len(pipe.state.offload_hooks) == len(models) == (4 if kind == "base" else 3)
    assert all(hasattr(m, "_hf_hook") for m in models)
    # each hook offloads the model before it in the order a request runs them
    chain = [hook.hook.prev_module_hook for hook in pipe.state.offload_hooks]
    assert chain == [None, *pipe.state.offload_hooks[:-1]]
    assert np.array_equal(np.asarray(pipe.generate(**GENERATE).images[0]), np.asarray(expected))


def test_serve_passes_offload_to_the_pipeline(monkeypatch):
    """On a (faked) CUDA machine, `ldm serve --offload` loads the model with offload=True."""
    import uvicorn

    from ldmkit.server.cli import register

    loaded = {}

    class FakePipe:
        device, model_name, default_size = torch.device("cuda"), "fake", 16
        upscalers = UpscalerLibrary(None)  # no --upscalers-dir: the resizes only

    def fake_load(source, **kwargs):
        loaded.update(kwargs)
        return FakePipe()

    monkeypatch.setattr(Pipeline, "from_pretrained", staticmethod(fake_load))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    monkeypatch.setattr("ldmkit.offload.check_offload", lambda device, fast=False: None)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--offload", "--no-ui", "--port", "0"])
    assert args.func(args) == 0 and loaded["offload"] is True


def test_loras_are_refused_with_offload():
    pipe = Pipeline(make_tiny_sdxl_components(), torch.device("cpu"), torch.float32)
    pipe.apply(install_offload_hooks)
    with pytest.raises(InvalidRequest, match="LoRAs are not supported with --offload yet"):
        pipe.generate(**GENERATE, loras=[("style.safetensors", 0.8)])
