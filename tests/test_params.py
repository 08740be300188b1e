"""GenerationParams: one description of a request, checked in one place, whichever front end built it."""

import subprocess
import sys

import pytest
from PIL import Image

from ldmkit.errors import InvalidRequest
from ldmkit.params import MAX_SEED, GenerationParams, HiresFix, random_seed
from ldmkit.server.limits import LimitExceeded, ServerLimits


def test_importing_params_imports_no_torch():
    """So the CLI checks a request before it pays for torch and the model."""
    code = "import sys, ldmkit.params; sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"prompt": ["a", 3]}, "prompt must be text, not int"),
        ({"steps": True}, "steps must be an integer"),
        ({"num_images": 65}, "number of images must be from 1 to 64 per batch"),
        ({"prompt": ["a"] * 33, "num_images": 2}, "number of images must be from 1 to 64 per batch, got 66"),
        ({"batch_count": 0}, "batch count must be a positive integer"),
        ({"seed": [1, 2], "num_images": 3}, "seeds must be 3 integers"),
        ({"seed": MAX_SEED, "num_images": 2}, f"seed must be an integer from 0 to {MAX_SEED - 1}"),
        ({"sampler": "Euler b"}, "unknown sampler"),
        ({"width": 30}, "width must be a multiple of 8"),
        ({"hires": HiresFix(scale=float("nan"))}, "hires scale must be above 0 and at most"),
        ({"hires": HiresFix(), "init_image": Image.new("RGB", (8, 8))}, "hires fix is for text-to-image"),
        ({"mask_image": Image.new("L", (8, 8))}, "inpainting needs an init image"),
        ({"prompt": "a <lora:../up>"}, "must be a file name without folders"),
        ({"prompt": "a <lora:x:inf>"}, "the weight must be a finite number"),
        ({"loras": [("x.safetensors", float("nan"))]}, "weight must be a finite number"),
    ],
)
def test_validate_names_what_is_wrong(fields, message):
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(")):
        GenerationParams(**{"prompt": "a", **fields}).validate()


def test_server_limits_apply_to_the_whole_request():
    limits = ServerLimits(max_images=4, max_pixels=64 * 64, max_loras=1)
    GenerationParams("a", num_images=2, batch_count=2).validate(limits)
    with pytest.raises(LimitExceeded, match="max_images = 4"):
        GenerationParams(["a", "b"], num_images=2, batch_count=2).validate(limits)
    with pytest.raises(LimitExceeded, match="max_pixels"):  # the hires pass's size counts
        GenerationParams("a", width=48, height=48, hires=HiresFix(scale=2)).validate(limits)
    with pytest.raises(LimitExceeded, match="max_loras = 1"):
        GenerationParams(["a <lora:x>", "b <lora:y>"]).validate(limits)
    GenerationParams("a <lora:x> <lora:x:1.0>").validate(limits)  # one LoRA, named twice


def test_resolved_fills_size_sampler_and_a_seed_that_fits_every_image():
    init = Image.new("RGB", (30, 21))
    p = GenerationParams("a", sampler=" euler A ", num_images=3, init_image=init).resolved(default_size=64)
    assert (p.width, p.height, p.sampler) == (24, 16, "Euler a")
    assert 0 <= p.seed <= MAX_SEED - 2 and p.image_seeds() == [p.seed, p.seed + 1, p.seed + 2]
    plain = GenerationParams("a", seed=5).resolved(default_size=64)
    assert (plain.width, plain.height, plain.sampler, plain.seed) == (64, 64, "DPM++ 2M Karras", 5)


def test_guidance_none_is_the_models_until_resolved_then_checked():
    p = GenerationParams("a")
    assert p.guidance is None
    p.validate()  # None passes: the model's default is checked when its folder is read
    assert p.resolved(64, default_guidance=3.5).guidance == 3.5
    assert p.resolved(64).guidance == 7.5  # SD's, where no model names its own
    assert GenerationParams("a", guidance=5.0).resolved(64, default_guidance=3.5).guidance == 5.0
    with pytest.raises(InvalidRequest, match="guidance must be a finite number from 0 to 100.0, got 101"):
        GenerationParams("a", guidance=101).validate()


def test_seeds_run_over_prompts_images_and_batches():
    p = GenerationParams(["a", "b"], seed=10, num_images=2, batch_count=2)
    assert p.batch_seeds() == [[10, 11, 12, 13], [14, 15, 16, 17]]
    assert GenerationParams(["a", "b"], seed=[3, 3]).image_seeds() == [3, 3]


def test_random_seeds_leave_room_for_every_image():
    assert all(0 <= random_seed(10) <= MAX_SEED + 1 - 10 for _ in range(100))


def test_lists_become_tuples_so_the_request_stays_frozen():
    p = GenerationParams(["a", "b"], seed=[1, 2], loras=[["x.safetensors", 0.5]])
    assert p.prompt == ("a", "b") and p.seed == (1, 2) and p.loras == (("x.safetensors", 0.5),)
    with pytest.raises(AttributeError):
        p.steps = 3
