"""`ldm serve` from the command line: options, a cheap import, and a real start on a saved tiny model."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

pytest.importorskip("uvicorn", reason="server extras not installed (pip install -e .[server])")

from ldmkit.errors import InvalidRequest  # noqa: E402
from ldmkit.loading import save_pretrained  # noqa: E402
from ldmkit.server.cli import register  # noqa: E402


def test_serve_defaults_listen_on_localhost_only():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve"])
    assert (args.host, args.port, args.model, args.queue_size, args.device, args.dtype) == (
        "127.0.0.1",
        7860,
        None,
        8,
        "auto",
        "auto",
    )
    assert callable(args.func)


def test_registering_the_command_imports_nothing_heavy():
    code = "import sys, ldmkit.server.cli; print(sorted({'torch', 'fastapi', 'gradio', 'uvicorn'} & set(sys.modules)))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )


def test_negative_queue_size_is_refused_before_loading_anything():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--queue-size", "-1", "--model", "/nonexistent"])
    with pytest.raises(InvalidRequest, match="--queue-size must be >= 0"):
        args.func(args)


@pytest.mark.slow
def test_ldm_serve_loads_the_model_once_and_answers(tiny_components, tmp_path):
    folder = save_pretrained(tiny_components, tmp_path / "tiny-model")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "ldmkit.cli",
        "serve",
        "--model",
        str(folder),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--no-ui",
    ]
    server = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "ldm serve did not start"
            try:
                models = requests.get(f"{url}/sdapi/v1/sd-models", timeout=2).json()
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        assert models[0]["model_name"] == "tiny-model"
        response = requests.post(
            f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 16, "height": 16, "steps": 2}, timeout=60
        )
        assert response.status_code == 200
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=30)[0]
    assert server.returncode == 0, output


def test_serve_limit_flags_are_validated_before_loading(capsys):
    from ldmkit.cli import main

    code = main(["serve", "--model", "/no/such/model", "--max-steps", "0"])
    assert code == 2
    assert "server limit max_steps must be a positive integer, got 0" in capsys.readouterr().err


def test_fast_and_vae_tiling_reach_the_pipeline_and_warm_up_only_on_cuda(monkeypatch):
    import torch
    import uvicorn

    from ldmkit.pipeline import Pipeline
    from ldmkit.upscalers import UpscalerLibrary

    loaded, warmed = {}, []

    class FakePipe:
        device, model_name, default_size = torch.device("cpu"), "fake", 16
        upscalers = UpscalerLibrary()

        def generate(self, *args, **kwargs):
            warmed.append(kwargs)

    def fake_load(source, **kwargs):
        loaded.update(kwargs)
        return FakePipe()

    monkeypatch.setattr(Pipeline, "from_pretrained", staticmethod(fake_load))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--fast", "--no-ui", "--port", "0"])
    assert args.func(args) == 0
    assert loaded["fast"] is True and warmed == []  # the CPU gets nothing to compile
    assert loaded["vae_tiling"] is False
    assert args.func(parser.parse_args(["serve", "--vae-tiling", "--no-ui", "--port", "0"])) == 0
    assert loaded["vae_tiling"] is True and loaded["fast"] is False
    FakePipe.device = torch.device("cuda")
    assert args.func(args) == 0
    assert warmed == [{"steps": 2, "seed": 0}]


def test_a_bad_port_is_one_line_before_the_model_loads(capsys):
    from ldmkit.cli import main

    assert main(["serve", "--model", "/no/such/model", "--port", "99999"]) == 2
    assert capsys.readouterr().err == "ldm: error: --port must be from 0 to 65535, got 99999\n"


def test_a_port_in_use_is_one_line_before_the_model_loads(capsys):
    from ldmkit.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "/no/such/model", "--port", str(port)]) == 2
    assert capsys.readouterr().err == f"ldm: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--styles", "/no/such/styles.csv"], "styles file not found: /no/such/styles.csv"),
        (["--vae", "/no/such/vae.safetensors"], "VAE not found: /no/such/vae.safetensors"),
        (["--vae-dir", "/no/such/vaes"], "--vae-dir: folder not found: /no/such/vaes"),
    ],
)
def test_styles_and_vae_options_are_checked_before_the_model_loads(capsys, args, message):
    from ldmkit.cli import main

    assert main(["serve", "--model", "/no/such/model", "--port", "0", *args]) == 2
    assert capsys.readouterr().err == f"ldm: error: {message}\n"
