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
    lines = out.stdout.splitlines()
    assert [line.split("  ")[0].strip() for line in lines[: len(SAMPLERS)]] == list(SAMPLERS)
    assert lines[0] == "DPM++ 2M            Automatic = Karras; also: Karras, Exponential, Polyexponential, Beta"
    assert "Schedule types (--scheduler): Automatic, Uniform, Karras," in out.stdout


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
        "--scheduler",
        "karras",
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
        "Euler a Karras",
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
        (["--sampler", "Nope"], "unknown sampler 'Nope'; choose one of: DPM++ 2M, DPM++ SDE"),
        (["--sampler", "PLMS", "--scheduler", "Karras"], "sampler 'PLMS' cannot run the Karras schedule exactly"),
        (["--scheduler", "Karras Exponential"], "unknown schedule type 'Karras Exponential'"),
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
        ("otter", ["--hires-scale", "nan"], "hires scale must be above 0 and at most 4.0, got nan"),
        ("otter <lora:../x>", [], "LoRA name '../x' must be a file name without folders"),
        ("otter <lora:x:0.5> <lora:x>", [], "<lora:x> is given two weights, 0.5 and 1.0; give one"),
    ],
)
def test_request_errors_are_reported_before_the_model_loads(tmp_path, capsys, prompt, args, message):
    code = main(["generate", prompt, *args, "--model", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"ldm: error: {message}"


# -- files written when a run stops early, and runs that must not hang (issue 15) ----------------------------


def test_hires_with_intermediates_numbers_steps_across_both_passes(tiny_model, tmp_path):
    """The second pass restarts its step count; its frames used to take names already written (a busy loop)."""
    args = ["generate", "otter", "--size", "16x16", "--steps", "3", "--hires-scale", "2", "--hires-steps", "2"]
    args += ["--hires-strength", "1", "--seed", "1", "--model", tiny_model, "-o", tmp_path, "--save-intermediates"]
    out = subprocess.run(
        [sys.executable, "-m", "ldmkit.cli", *map(str, args)], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr
    frames = sorted(p.name for p in (tmp_path / "00001-1-steps").iterdir())
    assert frames == ["step-001.png", "step-002.png", "step-003.png", "step-004.png", "step-005.png"]
    with Image.open(tmp_path / "00001-1-progress.gif") as animation:
        assert animation.n_frames == 5 and animation.size == (32, 32)


def test_ctrl_c_after_some_files_says_which_were_written(tiny_model, tmp_path, capsys, monkeypatch):
    import ldmkit.job

    real_save = ldmkit.job.save_new_file

    def interrupted_at_the_grid(write, path):
        if path.name.endswith("-progress.png"):
            raise KeyboardInterrupt
        return real_save(write, path)

    monkeypatch.setattr(ldmkit.job, "save_new_file", interrupted_at_the_grid)
    args = ["generate", "otter", "--steps", "2", "--seed", "3", "--model", str(tiny_model), "-q"]
    code = main([*args, "-o", str(tmp_path), "--save-intermediates"])
    out, err = capsys.readouterr()
    assert code == 130
    assert out.splitlines() == [str(tmp_path / "00001-3.png"), str(tmp_path / "00001-3-steps")]
    # (in-process, transformers' weight-loading bar comes first: the CLI's quieting applies before its import)
    assert err.splitlines()[-1] == "ldm: interrupted; 2 file(s) were written, listed above; none is partial"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00001-3-steps", "00001-3.png"]
    assert sorted(p.name for p in (tmp_path / "00001-3-steps").iterdir()) == ["step-001.png", "step-002.png"]


def test_a_full_disk_is_one_line_naming_the_images_already_written(tiny_model, tmp_path, capsys, monkeypatch):
    import errno

    real_save = Image.Image.save
    saves = []

    def disk_full_on_the_second_image(self, fp, *args, **kwargs):
        saves.append(fp)
        if len(saves) == 2:
            with open(fp, "wb") as file:
                file.write(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", disk_full_on_the_second_image)
    code = main(
        [
            "generate",
            "otter",
            "-n",
            "3",
            "--steps",
            "2",
            "--seed",
            "5",
            "--model",
            str(tiny_model),
            "-q",
            "-o",
            str(tmp_path),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 2
    assert out.splitlines() == [str(tmp_path / "00001-5.png")]
    assert err.splitlines()[-1] == (
        f"ldm: error: cannot write to {tmp_path}: No space left on device; "
        "1 file(s) were written, listed above; none is partial"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["00001-5.png"]  # no half-written second image, no temporary


# -- malformed checkpoints and hostile PNGs: one line, exit 2 (issue 15) -----------------------------------


def test_a_ckpt_whose_state_dict_holds_itself_is_refused_not_looped_over(tmp_path):
    import torch

    checkpoint = {}
    checkpoint["state_dict"] = checkpoint
    torch.save(checkpoint, tmp_path / "loop.ckpt")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ldmkit.cli",
            "generate",
            "x",
            "--model",
            str(tmp_path / "loop.ckpt"),
            "-o",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        out.returncode == 2 and out.stderr == "ldm: error: loop.ckpt is not a checkpoint: its state_dict holds itself\n"
    )


@pytest.mark.parametrize(
    "content, reason",
    [
        ([1, 2, 3], "it holds a value of type list, not a state dict"),
        ("tensor", "it holds a value of type Tensor, not a state dict"),
        (7, "it holds a value of type int, not a state dict"),
        ({"state_dict": [1]}, "it holds a value of type list, not a state dict"),
        ({"epoch": 1}, "it holds no tensors"),
    ],
)
def test_a_malformed_ckpt_is_one_line_and_exit_2(tmp_path, capsys, content, reason):
    import torch

    torch.save(torch.zeros(2) if content == "tensor" else content, tmp_path / "bad.ckpt")
    code = main(["generate", "otter", "--model", str(tmp_path / "bad.ckpt"), "-o", str(tmp_path / "o")])
    assert code == 2
    assert capsys.readouterr().err == f"ldm: error: bad.ckpt is not a checkpoint: {reason}\n"


def test_ldm_info_on_hostile_pngs_is_one_line(tmp_path):
    from test_metadata import dimension_bomb, ztxt_bomb

    for make in (ztxt_bomb, dimension_bomb):
        make(tmp_path / "bomb.png")
        out = ldm("info", tmp_path / "bomb.png")
        assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
        assert out.stderr.startswith(f"ldm: error: cannot read {tmp_path / 'bomb.png'} as an image: ")


def test_init_images_and_masks_are_read_upright(tmp_path):
    from ldmkit.cli import load_image

    stored = Image.new("RGB", (4, 2), "black")
    stored.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "photo.png", exif=exif)
    image = load_image(tmp_path / "photo.png", "init image")
    assert image.size == (2, 4) and image.getpixel((1, 0)) == (255, 255, 255)
