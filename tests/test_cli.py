"""`ldm` end to end in a subprocess: images, metadata, intermediates, one-line errors."""

import subprocess
import sys

import pytest
from conftest import make_tiny_components
from PIL import Image

from ldmkit.cli import main
from ldmkit.loading import save_pretrained
from ldmkit.metadata import parse_infotext, read_infotext
from ldmkit.samplers import SAMPLERS


def ldm(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "ldmkit.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny-model"
    save_pretrained(make_tiny_components(), folder)
    return folder


def test_samplers_lists_every_registered_name():
    out = ldm("samplers")
    assert out.returncode == 0
    assert out.stdout.splitlines() == list(SAMPLERS)


def test_generate_writes_images_with_parameters_and_intermediates(tiny_model, tmp_path):
    out = ldm(
        "generate",
        "an otter",
        "-n",
        2,
        "--negative",
        "blurry",
        "--steps",
        4,
        "--sampler",
        "Euler a",
        "--seed",
        7,
        "--size",
        "24x16",
        "--model",
        tiny_model,
        "-o",
        tmp_path,
        "--save-intermediates",
        "--every",
        3,
        "--preview",
        "fast",
    )
    assert out.returncode == 0, out.stderr
    printed = out.stdout.splitlines()
    images = [tmp_path / "00001-7.png", tmp_path / "00002-8.png"]
    for image in images:
        assert str(image) in printed
        with Image.open(image) as im:
            assert im.size == (24, 16)
    params = parse_infotext(read_infotext(images[1]))
    assert params["Prompt"] == "an otter" and params["Negative prompt"] == "blurry"
    assert (params["Steps"], params["Sampler"], params["Seed"], params["Size"], params["Model"]) == (
        "4",
        "Euler a",
        "8",
        "24x16",
        "tiny-model",
    )
    # every 3 steps of 4: previews after step 3 and the last step
    assert sorted(p.name for p in (tmp_path / "00001-7-steps").iterdir()) == ["step-003.png", "step-004.png"]
    with Image.open(tmp_path / "00001-7-progress.png") as grid:
        assert grid.size == (48, 16)
    with Image.open(tmp_path / "00002-8-progress.gif") as anim:
        assert anim.n_frames == 2
    # `ldm info` reads the parameters back; a second run never overwrites
    info = ldm("info", images[0])
    assert info.returncode == 0 and info.stdout.startswith(
        "an otter\nNegative prompt: blurry\nSteps: 4, Sampler: Euler a"
    )
    again = ldm(
        "generate",
        "an otter",
        "--steps",
        2,
        "--seed",
        7,
        "--size",
        "16x16",
        "--model",
        tiny_model,
        "-o",
        tmp_path,
        "-q",
    )
    assert again.returncode == 0 and again.stdout.strip() == str(tmp_path / "00003-7.png")


def test_img2img_from_the_command_line(tiny_model, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 24), "orange").save(init)
    out = ldm(
        "generate",
        "apple",
        "--init-image",
        init,
        "--strength",
        0.5,
        "--steps",
        4,
        "--seed",
        1,
        "--model",
        tiny_model,
        "-o",
        tmp_path / "out",
        "-q",
    )
    assert out.returncode == 0, out.stderr
    params = parse_infotext(read_infotext(tmp_path / "out" / "00001-1.png"))
    assert params["Size"] == "32x24" and params["Denoising strength"] == "0.5"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sampler", "Nope"], "unknown sampler 'Nope'; choose one of: Euler, Euler a"),
        (["--size", "30x16"], "width must be a multiple of 8"),
        (["--steps", "0"], "steps must be an integer from 1"),
        (["--guidance", "nan"], "guidance must be a finite number"),
        (["--init-image", "missing.png"], "init image not found"),
        (["--init-image", "__file__", "--strength", "1.5"], "strength must be between 0 and 1"),
        (["--model", "/no/such/model"], "/no/such/model"),
        (["--every", "0", "--save-intermediates"], "--every must be >= 1"),
    ],
)
def test_bad_arguments_give_one_line_errors(tiny_model, tmp_path, capsys, args, message):
    """In-process (the subprocess path is covered above); nothing may be written."""
    if "__file__" in args:
        image = tmp_path / "ok.png"
        Image.new("RGB", (16, 16)).save(image)
        args = [str(image) if a == "__file__" else a for a in args]
    defaults = ["--model", str(tiny_model)] if "--model" not in args else []
    code = main(["generate", "otter", "--steps", "2", *defaults, *args, "-o", str(tmp_path / "out")])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldm: error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_not_an_image_and_unwritable_output_fail_before_loading(tmp_path):
    bogus = tmp_path / "bogus.png"
    bogus.write_bytes(b"not a png")
    out = ldm("generate", "otter", "--init-image", bogus, "--model", "/no/such/model", "-o", tmp_path / "o")
    assert out.returncode == 2 and "cannot read init image" in out.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = ldm("generate", "otter", "--model", "/no/such/model", "-o", blocker / "sub")
    assert out.returncode == 2 and "cannot write to output folder" in out.stderr


def test_sigterm_mid_run_exits_cleanly_and_writes_nothing(tiny_model, tmp_path):
    out_dir = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ldmkit.cli",
            "generate",
            "otter",
            "--steps",
            "1000",
            "--sampler",
            "Euler",
            "--model",
            str(tiny_model),
            "-o",
            str(out_dir),
            "--save-intermediates",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # wait until the denoising loop is running (the progress bar has started)
    seen = ""
    while "step" not in seen and proc.poll() is None:
        seen += proc.stderr.read(1)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, seen + err
    assert "interrupted" in err and "Traceback" not in err
    assert list(out_dir.iterdir()) == []


def test_inpainting_and_hires_from_the_command_line(tiny_model, tmp_path):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.new("RGB", (24, 16), "orange").save(init)
    Image.new("L", (24, 16), 0).save(mask)
    assert (
        main(
            [
                "generate",
                "apple",
                "--init-image",
                str(init),
                "--mask",
                str(mask),
                "--mask-blur",
                "2",
                "--steps",
                "3",
                "--seed",
                "1",
                "--model",
                str(tiny_model),
                "-o",
                str(tmp_path / "a"),
                "-q",
            ]
        )
        == 0
    )
    assert parse_infotext(read_infotext(tmp_path / "a" / "00001-1.png"))["Mask blur"] == "2"
    assert (
        main(
            [
                "generate",
                "apple",
                "--size",
                "24x16",
                "--hires-scale",
                "2",
                "--hires-steps",
                "2",
                "--steps",
                "3",
                "--seed",
                "1",
                "--model",
                str(tiny_model),
                "-o",
                str(tmp_path / "h"),
                "-q",
            ]
        )
        == 0
    )
    with Image.open(tmp_path / "h" / "00001-1.png") as image:
        assert image.size == (48, 32)
        assert parse_infotext(image.info["parameters"])["Hires upscale"] == "2.0"


def test_lora_tags_and_clip_skip_from_the_command_line(tiny_model, tmp_path):
    from test_lora import kohya_lora

    kohya_lora(tmp_path / "ink.safetensors", make_tiny_components())
    code = main(
        [
            "generate",
            "otter <lora:ink:0.7>",
            "--lora-dir",
            str(tmp_path),
            "--clip-skip",
            "2",
            "--steps",
            "2",
            "--seed",
            "4",
            "--model",
            str(tiny_model),
            "-o",
            str(tmp_path / "o"),
            "-q",
        ]
    )
    assert code == 0
    params = parse_infotext(read_infotext(tmp_path / "o" / "00001-4.png"))
    assert params["Clip skip"] == "2" and params["Lora hashes"].startswith("ink: ")


@pytest.mark.parametrize(
    "prompt,args,message",
    [
        ("otter", ["--hires-scale", "nan"], "hires scale must be above 1 and at most 4.0, got nan"),
        ("otter <lora:../x>", [], "LoRA name '../x' must be a file name without folders"),
        ("otter <lora:x:0.5> <lora:x>", [], "<lora:x> is given two weights, 0.5 and 1.0; give one"),
    ],
)
def test_request_errors_are_reported_before_the_model_loads(tmp_path, capsys, prompt, args, message):
    code = main(["generate", prompt, *args, "--model", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"ldm: error: {message}"


def test_hires_intermediates_are_numbered_over_both_passes(tiny_model, tmp_path):
    argv = ["generate", "apple", "--size", "16x16", "--steps", "3", "--hires-scale", "2", "--hires-steps", "4"]
    out = tmp_path / "out"
    assert main([*argv, "--seed", "1", "--model", str(tiny_model), "-o", str(out), "--save-intermediates", "-q"]) == 0
    # 3 base steps, then 2 of the hires pass (4 at strength 0.5), numbered on
    assert sorted(p.name for p in (out / "00001-1-steps").iterdir()) == [f"step-00{n}.png" for n in range(1, 6)]
