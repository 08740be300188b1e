"""`ldm generate`'s tiling, hires-pass, resize-mode and inpainting-area options, against the Python API's images."""

import numpy as np
import pytest
import torch
from conftest import make_tiny_components
from PIL import Image

from ldmkit import Pipeline
from ldmkit.cli import main
from ldmkit.loading import save_pretrained
from ldmkit.params import HiresFix

COMMON = ["--steps", "3", "--seed", "1", "--sampler", "Euler", "-q"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny-model"
    save_pretrained(make_tiny_components(), folder)
    return folder


def written(folder) -> np.ndarray:
    (path,) = folder.glob("*.png")
    return np.asarray(Image.open(path))


def reference(**request) -> np.ndarray:
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    return np.asarray(pipe.generate("apple", steps=3, seed=1, sampler="Euler", **request).images[0])


def test_tiling_and_the_hires_pass_options(tiny_model, tmp_path):
    hires = ["--hires-scale", "2", "--hires-steps", "2", "--hires-prompt", "pear", "--hires-sampler", "Euler Karras"]
    args = ["generate", "apple", "--size", "24x16", "--tiling", *hires, *COMMON]
    assert main([*args, "--model", str(tiny_model), "-o", str(tmp_path / "o")]) == 0
    expected = reference(
        width=24, height=16, tiling=True, hires=HiresFix(2, 0.5, 2, prompt="pear", sampler="Euler Karras")
    )
    assert np.array_equal(written(tmp_path / "o"), expected)


def test_resize_mode_and_only_masked_inpainting(tiny_model, tmp_path):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    mask = Image.new("L", (40, 24), 0)
    mask.paste(255, (20, 8, 28, 16))
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    image_args = ["--init-image", str(tmp_path / "init.png"), "--size", "16x16", *COMMON, "--model", str(tiny_model)]
    assert main(["generate", "apple", *image_args, "--resize-mode", "crop", "-o", str(tmp_path / "c")]) == 0
    assert np.array_equal(written(tmp_path / "c"), reference(init_image=init, width=16, height=16, resize_mode="crop"))
    inpaint = ["--mask", str(tmp_path / "mask.png"), "--only-masked", "4", "--masked-content", "latent_noise"]
    assert main(["generate", "apple", *image_args, *inpaint, "-o", str(tmp_path / "m")]) == 0
    expected = reference(
        init_image=init,
        mask_image=mask,
        width=16,
        height=16,
        inpaint_only_masked=True,
        inpaint_padding=4,
        masked_content="latent_noise",
    )
    assert np.array_equal(written(tmp_path / "m"), expected) and expected.shape == (24, 40, 3)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--hires-prompt", "pear"], "--hires-prompt describes the hires fix's second pass: add --hires-scale"),
        (["--resize-mode", "crop"], "resize mode 'crop' fits an init image: give one"),
        (["--hires-scale", "2", "--hires-sampler", "nope"], "unknown sampler 'nope'"),
    ],
)
def test_option_errors_are_one_line_before_the_model_loads(tmp_path, capsys, args, message):
    code = main(["generate", "apple", *args, "--model", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"ldm: error: {message}")
