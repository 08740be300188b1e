"""`ldm serve` over HTTP: a real uvicorn server on 127.0.0.1 serving the tiny random model.

The A1111 and OpenAI APIs are called as their clients call them (plain HTTP, the `openai` package).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

pytest.importorskip("fastapi", reason="server extras not installed (pip install -e .[server])")
openai = pytest.importorskip("openai", reason="server test extras not installed")

from e2e.serving import serve_tiny, tiny_pipeline  # noqa: E402

from ldmkit.samplers import SAMPLERS  # noqa: E402
from ldmkit.server.limits import ServerLimits  # noqa: E402
from ldmkit.server.queue import Cancelled  # noqa: E402

FAST = {"width": 16, "height": 16, "steps": 3}  # the tiny model's native size; milliseconds per image


@pytest.fixture(scope="module")
def server():
    with serve_tiny(ui=False, limits=ServerLimits(max_body_bytes=1024 * 1024)) as running:
        yield running


@pytest.fixture
def url(server):
    return server[0]


def png_from_b64(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def png_b64(image: Image.Image, data_url: bool = False) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    return f"data:image/png;base64,{text}" if data_url else text


def txt2img(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a red cube", **FAST, **body}, timeout=60)


@pytest.fixture(scope="module")
def reference():
    """The served model (the same tiny weights) through the Python API, in this process: what the server should send
    (for requests that name sampler_name Euler and leave cfg_scale at A1111's 7)."""
    pipe = tiny_pipeline()

    def generate(**kwargs) -> list[np.ndarray]:
        result = pipe.generate(**{"prompt": "a red cube", **FAST, "sampler": "Euler", "guidance": 7.0, **kwargs})
        return [np.asarray(image, dtype=int) for image in result.images]

    return generate


def pixels(encoded: str) -> np.ndarray:
    return np.asarray(png_from_b64(encoded), dtype=int)


# -- AUTOMATIC1111 API ------------------------------------------------------------------------------


def test_txt2img_batches_continue_the_seed_sequence_and_carry_parameters(url, reference):
    response = txt2img(
        url, seed=100, batch_size=2, n_iter=2, negative_prompt="blurry", sampler_name="Euler a", cfg_scale=5
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"images", "parameters", "info"}
    info = json.loads(body["info"])
    assert info["seed"] == 100 and info["all_seeds"] == [100, 101, 102, 103]
    assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 5 and info["batch_size"] == 2
    assert body["parameters"]["n_iter"] == 2 and body["parameters"]["prompt"] == "a red cube"
    assert len(body["images"]) == 4 == len(info["infotexts"])
    for encoded, infotext, seed in zip(body["images"], info["infotexts"], info["all_seeds"]):
        image = png_from_b64(encoded)
        assert image.size == (16, 16)
        assert image.info["parameters"] == infotext
        assert f"Seed: {seed}," in infotext and "Negative prompt: blurry" in infotext
    # the second batch (n_iter 2) is the Python API's batch of seeds 102 and 103
    expected = reference(seed=102, num_images=2, negative_prompt="blurry", sampler="Euler a", guidance=5)
    assert [np.abs(pixels(encoded) - image).max() for encoded, image in zip(body["images"][2:], expected)] == [0, 0]


def test_an_image_depends_on_its_seed_only_not_on_its_batch(url, reference):
    batch = txt2img(url, seed=7, batch_size=3, sampler_name="Euler").json()["images"]
    for index, seed in enumerate((7, 8, 9)):
        alone = pixels(txt2img(url, seed=seed, sampler_name="Euler").json()["images"][0])
        assert np.abs(pixels(batch[index]) - alone).max() <= 2  # batched float maths may round a pixel differently
        assert np.array_equal(alone, reference(seed=seed)[0])


def test_seed_minus_one_picks_a_random_seed_and_reports_it(url, reference):
    body = txt2img(url, seed=-1, batch_size=2, sampler_name="Euler").json()
    info = json.loads(body["info"])
    assert info["all_seeds"] == [info["seed"], info["seed"] + 1]
    # the reported seed is the one used: it makes the same images again
    expected = reference(seed=info["seed"], num_images=2)
    assert [np.abs(pixels(encoded) - image).max() for encoded, image in zip(body["images"], expected)] == [0, 0]


@pytest.mark.parametrize("data_url", [False, True])
def test_img2img_takes_base64_with_or_without_data_prefix(url, reference, data_url):
    init = Image.new("RGB", (24, 24), (200, 30, 30))
    body = {
        "prompt": "a cat",
        "init_images": [png_b64(init, data_url)],
        "denoising_strength": 0.5,
        "seed": 3,
        "sampler_name": "Euler",
        **FAST,
        "steps": 4,
    }
    response = requests.post(f"{url}/sdapi/v1/img2img", json=body, timeout=60)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in info["infotexts"][0]
    assert response.json()["parameters"]["init_images"] is None  # not echoed back unless asked
    expected = reference(prompt="a cat", init_image=init, strength=0.5, seed=3, steps=4)[0]
    assert np.array_equal(pixels(response.json()["images"][0]), expected)


def test_samplers_and_models_lists(url):
    samplers = requests.get(f"{url}/sdapi/v1/samplers", timeout=10).json()
    assert [s["name"] for s in samplers] == list(SAMPLERS)
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    by_name = {s["name"]: s for s in samplers}
    assert by_name["DPM++ 2M"]["options"] == {"scheduler": "karras"} and by_name["Euler"]["options"] == {}
    assert by_name["Euler a"]["aliases"] == ["k_euler_a", "k_euler_ancestral"]
    models = requests.get(f"{url}/sdapi/v1/sd-models", timeout=10).json()
    assert [m["model_name"] for m in models] == ["tiny"] and models[0]["title"] == "tiny"


@pytest.mark.parametrize(
    "sampler_name, scheduler, label",
    [
        ("DPM++ 2M", "Karras", "DPM++ 2M Karras"),
        ("Euler a", "Karras", "Euler a Karras"),  # Open WebUI's example
        ("DDIM", "normal", "DDIM Normal"),  # SillyTavern's default
        ("Euler", "Automatic", "Euler"),
        ("k_dpmpp_2m", None, "DPM++ 2M Karras"),
    ],
)
def test_sampler_and_schedule_type_pairs_as_clients_send_them(url, sampler_name, scheduler, label):
    info = json.loads(txt2img(url, steps=2, sampler_name=sampler_name, scheduler=scheduler).json()["info"])
    assert info["sampler_name"] == label
    assert f"Sampler: {label}," in info["infotexts"][0]


def test_schedulers_list_a1111_1_10s_schedule_types(url):
    schedulers = requests.get(f"{url}/sdapi/v1/schedulers", timeout=10).json()
    assert [s["label"] for s in schedulers] == [
        "Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
        "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta",
    ]  # fmt: skip
    assert schedulers[5] == {
        "name": "sgm_uniform", "label": "SGM Uniform", "aliases": ["SGMUniform"], "default_rho": None,
        "need_inner_model": None,
    }  # fmt: skip


def test_options_name_the_loaded_model_and_refuse_another(url):
    assert requests.get(f"{url}/sdapi/v1/options", timeout=10).json()["sd_model_checkpoint"] == "tiny"
    assert (
        requests.post(
            f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "tiny", "CLIP_stop_at_last_layers": 2}, timeout=10
        ).status_code
        == 200
    )
    refused = requests.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "other.safetensors"}, timeout=10)
    assert refused.status_code == 400 and "not loaded" in refused.json()["detail"]


def test_png_info_reads_back_what_txt2img_wrote(url):
    image_b64 = txt2img(url, seed=42, steps=2).json()["images"][0]
    response = requests.post(f"{url}/sdapi/v1/png-info", json={"image": image_b64}, timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["info"].startswith("a red cube\n")
    assert body["parameters"]["Seed"] == "42" and body["parameters"]["Steps"] == "2"
    assert body["parameters"]["Prompt"] == "a red cube"


def test_idle_progress_and_interrupt_are_harmless(url):
    progress = requests.get(f"{url}/sdapi/v1/progress", timeout=10).json()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0 and progress["current_image"] is None
    assert requests.post(f"{url}/sdapi/v1/interrupt", timeout=10).json() == {}


def test_progress_shows_a_preview_and_interrupt_returns_the_partial_image(server):
    url, pipe, app = server
    pipe.hold(at_step=3)  # steps 0-2 done, the job waits at step 3 until released
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(txt2img, url, seed=5, steps=200)
            assert pipe.held.wait(timeout=60)
            progress = requests.get(f"{url}/sdapi/v1/progress", timeout=10).json()
            assert progress["progress"] == 3 / 200 and progress["eta_relative"] > 0
            assert progress["state"]["sampling_steps"] == 200 and progress["state"]["job"] == "txt2img"
            assert png_from_b64(progress["current_image"]).size == (16, 16)
            assert requests.post(f"{url}/sdapi/v1/interrupt", timeout=10).json() == {}
            pipe.release()
            response = pending.result(timeout=30)
    finally:
        pipe.release()
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["all_seeds"] == [5] and "Seed: 5," in info["infotexts"][0]
    assert png_from_b64(response.json()["images"][0]).info["parameters"] == info["infotexts"][0]


@pytest.mark.parametrize(
    "path, body, status, reason",
    [
        ("txt2img", {"width": 20}, 400, "width must be a multiple of 8"),
        ("txt2img", {"steps": 0}, 400, "steps must be an integer"),
        ("txt2img", {"sampler_name": "Nope"}, 400, "unknown sampler"),
        ("txt2img", {"sampler_name": "PLMS", "scheduler": "Karras"}, 400, "cannot run the Karras schedule exactly"),
        ("txt2img", {"scheduler": "Bogus"}, 400, "unknown schedule type 'Bogus'"),
        ("txt2img", {"sampler_name": "DPM++ 2S a"}, 400, "'DPM++ 2S a' is not available"),
        ("txt2img", {"batch_size": 0}, 400, "batch size must be a positive integer"),
        ("txt2img", {"width": 4096, "height": 4096}, 400, "over this server's limit"),
        ("txt2img", {"seed": -5}, 400, "seed must be an integer"),
        ("img2img", {}, 400, "needs init_images"),
        ("img2img", {"init_images": ["not base64!"]}, 400, "not valid base64"),
        ("img2img", {"init_images": [base64.b64encode(b"hello").decode()]}, 400, "not a readable image"),
        ("img2img", {"init_images": ["INIT"], "denoising_strength": 1.5}, 400, "strength must be between 0 and 1"),
        ("img2img", {"init_images": ["BOMB"]}, 400, "pixel limit"),
    ],
)
def test_a1111_bad_requests_get_400_with_a_reason(url, path, body, status, reason):
    substitutes = {"INIT": png_b64(Image.new("RGB", (16, 16))), "BOMB": png_b64(Image.new("1", (5000, 5000)))}
    if "init_images" in body:
        body["init_images"] = [substitutes.get(item, item) for item in body["init_images"]]
    response = requests.post(f"{url}/sdapi/v1/{path}", json={"prompt": "x", **FAST, **body}, timeout=30)
    assert response.status_code == status, response.text
    assert reason in response.json()["detail"]


def test_a1111_wrong_types_get_fastapis_422(url):
    response = txt2img(url, steps="many")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "steps"]


def test_bodies_over_the_limit_get_413_whether_declared_or_streamed(url):
    big = json.dumps({"prompt": "x" * (2 * 1024 * 1024)}).encode()
    for path, error in (
        ("/sdapi/v1/txt2img", lambda body: body["detail"]),
        ("/v1/images/generations", lambda body: body["error"]["message"]),
    ):
        declared = requests.post(url + path, data=big, headers={"Content-Type": "application/json"}, timeout=30)
        assert declared.status_code == 413 and "limit" in error(declared.json())
        chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))  # no Content-Length: chunked
        streamed = requests.post(url + path, data=chunks, headers={"Content-Type": "application/json"}, timeout=30)
        assert streamed.status_code == 413 and "limit" in error(streamed.json())
    assert txt2img(url).status_code == 200  # and the server carries on


def test_openapi_docs_are_served(url):
    docs = requests.get(f"{url}/docs", timeout=10)
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "/openapi.json" in docs.text
    paths = requests.get(f"{url}/openapi.json", timeout=10).json()["paths"]
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations"} <= set(paths)


# -- OpenAI Images API ------------------------------------------------------------------------------


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_openai_client_generates_images_with_any_model_name(url):
    result = client(url).images.generate(
        model="dall-e-3", prompt="a lighthouse", n=2, size="16x16", response_format="b64_json"
    )
    assert len(result.data) == 2 and result.size == "16x16"
    images = [png_from_b64(item.b64_json) for item in result.data]
    assert all(image.size == (16, 16) and "a lighthouse" in image.info["parameters"] for image in images)


def test_openai_default_size_is_the_models_and_url_format_is_a_data_url(url):
    result = client(url).images.generate(prompt="a lighthouse", response_format="url")
    assert result.data[0].url.startswith("data:image/png;base64,")
    assert png_from_b64(result.data[0].url.partition(",")[2]).size == (16, 16)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"size": "17x17"}, "multiple of 8"),
        ({"size": "big"}, "WIDTHxHEIGHT"),
        ({"n": 11}, "n: "),
        ({"output_format": "gif"}, "output_format"),
    ],
)
def test_openai_errors_come_in_openais_shape(url, kwargs, reason):
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).images.generate(prompt="x", **kwargs)
    error = caught.value.body
    assert error["type"] == "invalid_request_error" and reason in error["message"]


# -- the queue: one worker, bounded FIFO ------------------------------------------------------------


@pytest.fixture
def held_server():
    """A server whose one running request is held mid-step, with room for one waiting request."""
    with serve_tiny(ui=False, queue_size=1) as (url, pipe, app):
        pipe.gate.clear()
        try:
            yield url, app.state.queue
        finally:
            pipe.gate.set()


def test_full_queue_answers_503_with_retry_after_in_both_shapes(held_server):
    url, queue = held_server
    with ThreadPoolExecutor(2) as pool, released(queue):
        running = pool.submit(txt2img, url, seed=1)
        wait_for(lambda: queue.current)
        waiting = pool.submit(txt2img, url, seed=2)
        wait_for(lambda: queue.waiting() == 1)

        refused = txt2img(url)
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert "queue is full" in refused.json()["detail"]
        with pytest.raises(openai.InternalServerError) as caught:
            client(url).images.generate(prompt="x", size="16x16")
        assert caught.value.status_code == 503 and "queue is full" in caught.value.body["message"]

        queue.pipe.gate.set()
        assert running.result(timeout=30).status_code == 200
        assert waiting.result(timeout=30).status_code == 200


def test_a_client_that_disconnects_frees_its_place(held_server):
    url, queue = held_server
    with ThreadPoolExecutor(2) as pool, released(queue):
        running = pool.submit(txt2img, url, seed=1)
        wait_for(lambda: queue.current)
        with pytest.raises(requests.Timeout):
            requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", **FAST}, timeout=1.0)
        wait_for(lambda: queue.waiting() == 0)  # the abandoned request left the queue...
        late = pool.submit(txt2img, url, seed=3)
        wait_for(lambda: queue.waiting() == 1)  # ...so this one found a place
        queue.pipe.gate.set()
        assert running.result(timeout=30).status_code == 200
        assert late.result(timeout=30).status_code == 200


def test_a_running_request_whose_client_disconnects_is_cancelled(held_server):
    url, queue = held_server
    with released(queue):
        with pytest.raises(requests.Timeout):
            requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", **FAST}, timeout=1.0)
        job = wait_for(lambda: queue.current)
        wait_for(lambda: job.stop == "cancel")
        queue.pipe.gate.set()
        with pytest.raises(Cancelled):
            job.future.result(timeout=30)
        wait_for(lambda: queue.current is None)


@contextlib.contextmanager
def released(queue):
    """Open the gate on the way out, also when an assertion fails, so no request stays held."""
    try:
        yield
    finally:
        queue.pipe.gate.set()


def wait_for(condition, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_server_does_not_run_two_generations_at_once(url, server):
    _, pipe, _ = server
    active, peak, lock = [0], [0], threading.Lock()
    original = pipe.text_encoder.forward

    def counting(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.02)
            return original(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    pipe.text_encoder.forward = counting
    try:
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda seed: txt2img(url, seed=seed, steps=1), range(4)))
    finally:
        del pipe.text_encoder.forward
    assert [r.status_code for r in responses] == [200] * 4
    assert peak[0] == 1
