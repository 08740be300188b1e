"""`ldm generate --control NAME=IMAGE`: end to end in-process, and its one-line refusals."""

import numpy as np
import pytest
from PIL import Image
from support.controlnet import make_tiny_controlnet
from support.tiny import make_tiny_components

from ldmkit.cli import main
from ldmkit.loading import save_pretrained
from ldmkit.metadata import parse_infotext, read_infotext


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_pretrained(make_tiny_components(), root / "tiny-model")
    make_tiny_controlnet(1).save_pretrained(root / "controlnets" / "sketch")
    make_tiny_controlnet(2).save_pretrained(root / "controlnets" / "edges")
    pixels = np.full((16, 24, 3), 255, np.uint8)
    pixels[6:10, 4:20] = 0
    Image.fromarray(pixels).save(root / "sketch.png")
    return root


def generate(files, tmp_path, *args):
    argv = ["generate", "otter", "--steps", "3", "--seed", "4", "--size", "24x16", "--model", str(files / "tiny-model")]
    return main([*argv, "-q", "-o", str(tmp_path), "--controlnet-dir", str(files / "controlnets"), *map(str, args)])


def test_two_controls_with_per_unit_options(files, tmp_path, capsys):
    code = generate(
        files,
        tmp_path,
        *("--control", f"sketch={files / 'sketch.png'}", "--control", f"edges [0123abcd]={files / 'sketch.png'}"),
        *("--control-module", "invert", "--control-module", "canny", "--control-weight", "0.7"),
        *("--control-end", "0.5", "--control-end", "1", "--control-mode", "control", "--control-resize", "fill"),
    )
    assert code == 0
    (path,) = [line for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]
    info = parse_infotext(read_infotext(path))
    assert info["ControlNet 0"].startswith("Module: invert, Model: sketch [")
    assert "Weight: 0.7, Resize Mode: Resize and Fill" in info["ControlNet 0"]
    assert (
        "Guidance End: 0.5" in info["ControlNet 0"]
        and "Control Mode: ControlNet is more important" in info["ControlNet 0"]
    )
    assert (
        info["ControlNet 1"].startswith("Module: canny, Model: edges [") and "Guidance End: 1.0" in info["ControlNet 1"]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--control", "sketch"), "NAME=IMAGE"),
        (("--control-weight", "0.5"), "needs a --control"),
        (
            ("--control", "sketch={img}", "--control", "sketch={img}", "--control-end", "1", "--control-end", "0.5")
            + ("--control-end", "1"),
            "given 3 times for 2",
        ),
        (("--control", "nothere={img}"), "ControlNet 'nothere' not found"),
        (("--control", "sketch={img}", "--control-module", "depth_midas"), "needs a preprocessor model"),
        (("--control", "sketch={img}", "--control-mode", "loud"), "control_mode must be one of"),
        (("--control", "sketch={img}", "--control-start", "0.9", "--control-end", "0.1"), "guidance_start"),
        (("--control", "sketch=missing.png"), "control image 0 not found"),
    ],
)  # fmt: skip
def test_bad_control_options_fail_with_one_line(files, tmp_path, capsys, args, message):
    args = [a.replace("{img}", str(files / "sketch.png")) for a in args]
    code = generate(files, tmp_path, *args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("*.png"))
