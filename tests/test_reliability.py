"""The server fails safely and keeps working: under load, out of memory, over its limits, at shutdown.

A smaller run of scripts/loadtest.py (the full one's figures are in docs/reliability.md), then each
way a request can go wrong, over real uvicorn servers on 127.0.0.1 serving the tiny random model.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="server extras not installed (pip install -e .[server])")
httpx = pytest.importorskip("httpx", reason="server test extras not installed")
psutil = pytest.importorskip("psutil", reason="server test extras not installed")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import loadtest
from e2e.serving import serve, serve_tiny, tiny_pipeline

from ldmkit.errors import InvalidRequest
from ldmkit.server.app import create_app
from ldmkit.server.limits import ServerLimits

FAST = {"width": 16, "height": 16, "steps": 3}


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# -- load ---------------------------------------------------------------------------------------------


def test_load_on_both_apis_answers_200_or_503_with_each_requests_own_images():
    """60 requests at concurrency 16, some clients leaving mid-request, on a server in its own process."""
    with loadtest.tiny_server(queue_size=16) as (url, pid):
        result = loadtest.measure(url, pid, total=60, concurrency=16, disconnect_every=10, time_limit=120)
    assert loadtest.failures(result, max_rss_growth=100 * 2**20) == []
    counts = result.counts()
    assert set(counts) <= {"200", "503", "disconnected"}
    assert sorted(o.index for o in result.outcomes) == list(range(60))  # each answered once, none lost
    assert counts["200"] >= 10 and counts.get("disconnected", 0) >= 1
    assert {o.api for o in result.outcomes if o.kind == "200"} == {"a1111", "openai"}
    # The abandoned long request (~10 s of work) stopped at its next step, so the next one ran at once.
    assert result.freed_worker_seconds < 5


# -- out of memory --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from threads, and they spin when the CPU cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server():
    with serve_tiny(
        ui=False, limits=ServerLimits(max_pixels=64 * 64, max_steps=20, max_images=4, max_prompt_chars=100)
    ) as running:
        yield running


@pytest.mark.parametrize(
    "error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), MemoryError()]
)
def test_out_of_memory_fails_that_request_only(server, monkeypatch, error):
    url, pipe, _ = server
    emptied = []
    original = pipe.run

    def fails_once(*args, **kwargs):
        monkeypatch.setattr(pipe, "run", original)
        raise error

    monkeypatch.setattr(pipe, "run", fails_once)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    response = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", **FAST}, timeout=30)
    assert response.status_code == 503, response.text
    assert response.json()["detail"] == "out of GPU memory; try a smaller size or batch"
    assert response.json()["error"] == "OutOfMemory" and response.headers["Retry-After"] == "1"
    assert emptied == [True]
    monkeypatch.undo()
    assert requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", **FAST}, timeout=30).status_code == 200


def test_out_of_memory_in_openais_shape(server, monkeypatch):
    url, pipe, _ = server
    original = pipe.run

    def fails_once(*args, **kwargs):
        monkeypatch.setattr(pipe, "run", original)
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(pipe, "run", fails_once)
    response = requests.post(f"{url}/v1/images/generations", json={"prompt": "x", "size": "16x16"}, timeout=30)
    assert response.status_code == 503
    assert response.json()["error"] == {
        "message": "out of GPU memory; try a smaller size or batch",
        "type": "server_error",
        "param": None,
        "code": "OutOfMemory",
    }
    assert (
        requests.post(f"{url}/v1/images/generations", json={"prompt": "x", "size": "16x16"}, timeout=30).status_code
        == 200
    )


# -- limits ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, limit",
    [
        ({"steps": 21}, "max_steps = 20"),
        ({"batch_size": 5}, "max_images = 4"),
        ({"batch_size": 2, "n_iter": 3}, "max_images = 4"),
        ({"width": 72, "height": 64}, "max_pixels = 4096"),
        ({"prompt": "x" * 101}, "max_prompt_chars = 100"),
        ({"negative_prompt": "x" * 101}, "max_prompt_chars = 100"),
        ({"enable_hr": True, "hr_scale": 4, "width": 32, "height": 32}, "max_pixels = 4096"),
    ],
)
def test_a1111_requests_over_a_limit_get_400_naming_it(server, body, limit):
    response = requests.post(f"{server[0]}/sdapi/v1/txt2img", json={"prompt": "x", **FAST, **body}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "LimitExceeded" and limit in response.json()["detail"]


def test_openai_requests_over_a_limit_get_400_naming_it(server):
    url = server[0]
    for body, limit in (
        ({"size": "72x72"}, "max_pixels = 4096"),
        ({"n": 5}, "max_images = 4"),
        ({"prompt": "x" * 101}, "max_prompt_chars"),
    ):
        response = requests.post(
            f"{url}/v1/images/generations", json={"prompt": "x", "size": "16x16", **body}, timeout=30
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (
            error["code"] == "LimitExceeded" and error["type"] == "invalid_request_error" and limit in error["message"]
        )


def test_limits_at_their_value_pass(server):
    body = {"prompt": "x" * 100, "steps": 20, "batch_size": 2, "n_iter": 2, "width": 64, "height": 64}
    assert requests.post(f"{server[0]}/sdapi/v1/txt2img", json=body, timeout=60).status_code == 200


def test_body_and_upload_limits_name_themselves():
    limits = ServerLimits(max_body_bytes=4096, max_input_pixels=32 * 32)
    with serve_tiny(ui=False, limits=limits) as (url, _, _):
        response = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x" * 5000}, timeout=30)
        assert response.status_code == 413 and "max_body_bytes = 4096" in response.json()["detail"]
        body = {"prompt": "x", "init_images": [png_b64(Image.new("RGB", (40, 40)))], **FAST}
        response = requests.post(f"{url}/sdapi/v1/img2img", json=body, timeout=30)
        assert response.status_code == 400 and "max_input_pixels = 1024" in response.json()["detail"]


def test_default_limits_are_sane_and_bad_ones_are_refused():
    limits = ServerLimits()
    assert (limits.max_pixels, limits.max_input_pixels) == (2048 * 2048, 4096 * 4096)
    assert (limits.max_steps, limits.max_images, limits.max_body_bytes) == (250, 16, 32 * 2**20)
    for bad in ({"max_steps": 0}, {"max_pixels": -1}, {"max_images": 2.5}, {"max_body_bytes": True}):
        with pytest.raises(InvalidRequest, match=next(iter(bad))):
            ServerLimits(**bad)


@pytest.mark.parametrize("path, body", [("/sdapi/v1/txt2img", {**FAST}), ("/v1/images/generations", {"size": "16x16"})])
def test_a_prompt_that_is_no_unicode_text_gets_400(server, path, body):
    data = '{"prompt": "a \\ud800 b", ' + json.dumps(body)[1:]  # a lone surrogate: valid JSON, not text
    response = requests.post(server[0] + path, data=data, headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400 and "not valid Unicode text" in response.text


# -- no path from a request reaches the file system -------------------------------------------------------


@pytest.mark.parametrize("path", ["/etc/hosts", "/etc/passwd", "../../etc/hostname", "file:///etc/passwd"])
def test_an_init_image_that_is_a_path_is_never_opened(server, path, monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    body = {"prompt": "x", "init_images": [path], **FAST}
    response = requests.post(f"{server[0]}/sdapi/v1/img2img", json=body, timeout=30)
    assert response.status_code == 400 and "init_images[0]" in response.json()["detail"]
    assert all(not isinstance(fp, (str, Path)) for fp in opened)


def test_a_lora_tag_with_a_path_is_refused(server):
    for prompt in ("<lora:../../etc/passwd:1>", "<lora:/etc/passwd:1>", "<lora:name:1>"):
        response = requests.post(f"{server[0]}/sdapi/v1/txt2img", json={"prompt": prompt, **FAST}, timeout=30)
        assert response.status_code == 400, response.text


# -- shutdown ---------------------------------------------------------------------------------------------


def test_a_request_cancelled_at_shutdown_answers_503_without_a_traceback():
    pipe = tiny_pipeline()
    app = create_app(pipe, ui=False)
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    logging.getLogger("uvicorn.error").addHandler(handler)
    pipe.gate.clear()  # the request runs until after uvicorn's 1 s grace period
    try:
        with ThreadPoolExecutor(1) as pool:
            with serve(app) as url:
                pending = pool.submit(
                    requests.post, f"{url}/sdapi/v1/txt2img", json={"prompt": "x", **FAST}, timeout=30
                )
                wait_for(lambda: app.state.queue.current)
                threading.Timer(2.5, pipe.gate.set).start()
            response = pending.result(timeout=30)
    finally:
        pipe.gate.set()
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert response.status_code == 503, response.text
    assert "shutting down" in response.json()["detail"]
    assert not [r for r in logged if r.exc_info], [r.getMessage() for r in logged]


def wait_for(condition, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")
