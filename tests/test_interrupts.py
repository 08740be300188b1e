"""should_stop: interrupt and cancel are honoured in every long phase, and interrupted results are what they say.

The pipeline asks should_stop before each LoRA file, batch, pass, denoising step and decoded image. True
interrupts (the images formed so far come back, described as what they are); raising cancels.
"""

import numpy as np
import pytest
import torch
from conftest import make_tiny_components
from PIL import Image
from test_lora import kohya_lora

import ldmkit.lora
from ldmkit import Pipeline
from ldmkit.metadata import parse_infotext
from ldmkit.params import HiresFix

WIDTH, HEIGHT = 24, 16


class Cancelled(Exception):
    pass


@pytest.fixture
def pipe():
    return Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)


def spy(module, calls: list, name: str):
    """Record each forward of `module` under `name`."""
    module.register_forward_pre_hook(lambda *args: calls.append(name))


def cancel_when(flag: dict):
    def should_stop():
        if flag.get("cancel"):
            raise Cancelled
        return False

    return should_stop


def test_a_cancel_during_lora_loading_reads_no_further_file(tmp_path, monkeypatch):
    for name in ("a", "b", "c"):
        kohya_lora(tmp_path / f"{name}.safetensors", make_tiny_components(), seed=ord(name))
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32, lora_dir=tmp_path)
    loaded, flag = [], {}
    real_load = ldmkit.lora._load

    def load(host, path, adapter_name):
        loaded.append(path.stem)
        flag["cancel"] = True  # the client leaves while the first file loads
        real_load(host, path, adapter_name)

    monkeypatch.setattr(ldmkit.lora, "_load", load)
    calls = []
    spy(pipe.text_encoder, calls, "text")
    with pytest.raises(Cancelled):
        pipe.generate("otter <lora:a> <lora:b> <lora:c>", steps=2, seed=0, should_stop=cancel_when(flag))
    assert loaded == ["a"] and calls == []
    assert not any("lora" in name for name, _ in pipe.unet.named_modules())  # and it came off again


@pytest.mark.parametrize(
    "phase,expected",
    [
        ("text", ["text"]),  # cancelled while encoding the prompt: no step runs
        ("step", ["text", "unet"]),  # while denoising: no further step, no decode
        ("last step", ["text", "unet", "unet", "unet"]),  # after the last step: no decode
        ("decode", ["text", "unet", "unet", "unet", "vae"]),  # while decoding the first image: not the second
    ],
)
def test_a_cancel_is_honoured_after_each_phase(pipe, phase, expected):
    calls, flag = [], {}
    spy(pipe.text_encoder, calls, "text")
    spy(pipe.unet, calls, "unet")
    spy(pipe.vae.decoder, calls, "vae")
    trigger = {"text": pipe.text_encoder, "step": pipe.unet, "decode": pipe.vae.decoder}.get(phase)
    if trigger is not None:
        trigger.register_forward_hook(lambda *args: flag.update(cancel=True))

    def on_step(step):
        if phase == "last step" and step.step + 1 == step.total:
            flag["cancel"] = True

    with pytest.raises(Cancelled):
        pipe.generate("otter", steps=3, num_images=2, seed=0, callback=on_step, should_stop=cancel_when(flag))
    assert calls == expected


def stop_after_steps(count: int):
    """should_stop for an interrupt once `count` denoising steps were taken (counted through the callback)."""
    taken = []
    return taken.append, lambda: len(taken) >= count


def test_an_interrupt_in_the_hires_pass_returns_the_larger_image_described_as_such(pipe):
    hires = HiresFix(scale=2, strength=0.5, steps=4)  # 2 steps of its own after the 4 of the base pass
    callback, should_stop = stop_after_steps(5)
    result = pipe.generate(
        "otter", steps=4, seed=1, width=WIDTH, height=HEIGHT, hires=hires, callback=callback, should_stop=should_stop
    )
    params = parse_infotext(result.infotexts[0])
    assert result.interrupted and result.images[0].size == (48, 32)
    assert (params["Size"], params["Hires upscale"]) == ("24x16", "2")  # A1111: the base size, then upscaled


def test_an_interrupt_before_the_hires_pass_returns_the_base_image_without_hires_parameters(pipe):
    callback, should_stop = stop_after_steps(4)
    hires = HiresFix(scale=2, strength=0.5, steps=4)
    result = pipe.generate(
        "otter", steps=4, seed=1, width=WIDTH, height=HEIGHT, hires=hires, callback=callback, should_stop=should_stop
    )
    params = parse_infotext(result.infotexts[0])
    assert result.interrupted and result.images[0].size == (WIDTH, HEIGHT)
    assert params["Size"] == "24x16" and "Hires upscale" not in params and "Denoising strength" not in params


def test_an_interrupted_inpainting_keeps_the_original_outside_the_mask(pipe):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[4:12, 8:20] = 255
    decoded = []
    decode = pipe.decode_latents
    pipe.decode_latents = lambda latents: decoded.append(latents) or decode(latents)
    callback, should_stop = stop_after_steps(2)
    result = pipe.generate(
        "otter", init_image=init, mask_image=Image.fromarray(mask), mask_blur=0, strength=1.0, steps=6, seed=0,
        callback=callback, should_stop=should_stop,
    )  # fmt: skip
    assert result.interrupted and len(result.images) == 1
    # the init image's posterior sample is the first draw of image 0's generator
    original = pipe.encode_samples(pipe.image_to_tensor(init, WIDTH, HEIGHT), [torch.Generator("cpu").manual_seed(0)])
    known = torch.ones_like(original, dtype=torch.bool)
    known[..., 2:6, 4:10] = False  # the mask's 8x12 px box at the tiny VAE's factor 2
    assert torch.equal(decoded[0][known], original[known])
    assert not torch.allclose(decoded[0][~known], original[~known], atol=1e-2)


def test_an_interrupt_between_batches_keeps_the_finished_batches(pipe):
    steps = []
    result = pipe.generate(
        "otter", steps=3, seed=7, num_images=2, batch_count=3, callback=steps.append,
        should_stop=lambda: len(steps) >= 4,  # one step into the second batch
    )  # fmt: skip
    assert result.interrupted and result.seeds == [7, 8, 9, 10]
    full = pipe.generate("otter", steps=3, seed=7, num_images=2)
    assert np.array_equal(np.asarray(result.images[1]), np.asarray(full.images[1]))
    assert [s.batch for s in steps] == [0, 0, 0, 1]


def test_hires_steps_continue_the_base_pass_count(pipe):
    steps = []
    pipe.generate(
        "otter", steps=4, seed=1, width=WIDTH, height=HEIGHT, hires=HiresFix(2, 0.5, 6), callback=steps.append
    )
    assert [s.step for s in steps] == list(range(7)) and {s.total for s in steps} == {7}  # 4 + 3 (6 at 0.5)
