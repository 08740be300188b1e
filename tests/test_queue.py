"""The server's queue over the tiny pipeline, without HTTP: its checks, its interrupt and its cancel."""

import pytest
import torch
from conftest import make_tiny_components
from test_lora import kohya_lora

import ldmkit.lora
from ldmkit.errors import InvalidRequest
from ldmkit.metadata import parse_infotext
from ldmkit.params import GenerationParams, HiresFix
from ldmkit.pipeline import Pipeline
from ldmkit.server.limits import LimitExceeded, ServerLimits
from ldmkit.server.queue import Cancelled, GenerationQueue


@pytest.fixture
def lora_dir(tmp_path):
    for name in ("a", "b", "c"):
        kohya_lora(tmp_path / f"{name}.safetensors", make_tiny_components(), seed=ord(name))
    return tmp_path


@pytest.fixture
def queue(lora_dir):
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32, lora_dir=lora_dir)
    queue = GenerationQueue(pipe, limits=ServerLimits(max_loras=2))
    queue.start()
    yield queue
    queue.close()


def test_an_interrupt_in_the_hires_pass_answers_an_image_its_parameters_describe(queue, monkeypatch):
    on_step = queue._on_step

    def interrupt_in_the_second_pass(job, step):
        on_step(job, step)
        if step.step == 4:  # the first step after the base pass's 4
            queue.interrupt()

    monkeypatch.setattr(queue, "_on_step", interrupt_in_the_second_pass)
    request = GenerationParams("otter", steps=4, seed=1, width=16, height=16, hires=HiresFix(2, 0.5, 4))
    result = queue.submit(request).future.result(timeout=120)
    params = parse_infotext(result.infotexts[0])
    assert result.interrupted and result.images[0].size == (32, 32)
    assert (params["Size"], params["Hires upscale"]) == ("16x16", "2")


def test_a_repeated_lora_tag_is_one_lora_loaded_once(queue, monkeypatch):
    loaded = []
    load = ldmkit.lora._load
    monkeypatch.setattr(
        ldmkit.lora, "_load", lambda host, path, name: loaded.append(path.stem) or load(host, path, name)
    )
    result = queue.submit(GenerationParams("otter" + " <lora:a:0.5>" * 40, steps=2, seed=0)).future.result(timeout=120)
    assert loaded == ["a"]
    assert parse_infotext(result.infotexts[0])["Lora hashes"].count("a: ") == 1


def test_more_distinct_loras_than_the_limit_are_refused_naming_it(queue):
    with pytest.raises(
        LimitExceeded, match="3 different LoRAs in one request is over this server's limit max_loras = 2"
    ):
        queue.submit(GenerationParams("otter <lora:a> <lora:b> <lora:c>", steps=2))
    with pytest.raises(InvalidRequest, match="<lora:a> is given two weights, 0.5 and 0.8"):
        queue.submit(GenerationParams("otter <lora:a:0.5> <lora:a:0.8>", steps=2))


@pytest.mark.parametrize("content", [b"", b"not a safetensors file", None])
def test_an_empty_or_foreign_lora_file_is_refused_before_compute(queue, lora_dir, content):
    path = lora_dir / "broken.safetensors"
    if content is None:  # a safetensors file, but not a LoRA
        from safetensors.torch import save_file

        save_file({"model.weight": torch.zeros(2, 2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(InvalidRequest, match="LoRA file broken.safetensors"):
        queue.submit(GenerationParams("otter <lora:broken>", steps=2))


def test_a_job_cancelled_while_its_loras_load_stops_loading_them(queue, monkeypatch):
    loaded, jobs = [], []
    load = ldmkit.lora._load

    def slow_load(host, path, name):
        loaded.append(path.stem)
        queue.cancel(jobs[0])  # its client leaves while the first file loads
        load(host, path, name)

    monkeypatch.setattr(ldmkit.lora, "_load", slow_load)
    jobs.append(queue.submit(GenerationParams("otter <lora:a> <lora:b>", steps=2, seed=0)))
    with pytest.raises(Cancelled):
        jobs[0].future.result(timeout=120)
    assert loaded == ["a"]
