"""X/Y/Z plot: value parsing (A1111's range syntax), expansion into cells, the grid, and that each cell is exactly
the single generation with its parameters (tiny random model)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit import Pipeline
from ldmkit.errors import InvalidRequest
from ldmkit.metadata import parse_infotext
from ldmkit.params import GenerationParams, HiresFix
from ldmkit.xyz import Axis, XYZPlot, axis_kind, draw_grid, run_plot, split_values

BASE = GenerationParams(prompt="a red cube", negative_prompt="blurry", steps=2, seed=7, width=16, height=16)


@pytest.fixture(scope="module")
def pipe():
    from support.tiny import make_tiny_components

    return Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)


# -- values ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "text", "expected"),
    [
        ("steps", "10,20, 30", (10, 20, 30)),
        ("steps", "1-5", (1, 2, 3, 4, 5)),
        ("steps", "1-10 (+3)", (1, 4, 7, 10)),
        ("steps", "1-10 (+2)", (1, 3, 5, 7, 9)),
        ("steps", "10-1 (-3)", (10, 7, 4, 1)),
        ("steps", "1-10 [5]", (1, 3, 5, 7, 10)),  # evenly spaced 1, 3.25, 5.5, 7.75, 10, truncated as A1111 does
        ("steps", "5-8, 20, 30-40 [3]", (5, 6, 7, 8, 20, 30, 35, 40)),
        ("seed", "-1, 3", (-1, 3)),
        ("seed", "-3 - -1", (-3, -2, -1)),
        ("cfg", "1-2 (+0.5)", (1.0, 1.5, 2.0)),
        ("cfg", "0.1-0.3 (+0.1)", (0.1, 0.2, 0.3)),
        ("cfg", "1.5-3 [4]", (1.5, 2.0, 2.5, 3.0)),
        ("cfg", "7, 3.5", (7.0, 3.5)),
        ("prompt_sr", 'cube, "sphere, shiny", cone', ("cube", "sphere, shiny", "cone")),
        ("size", "16x16, 32x8", ((16, 16), (32, 8))),
    ],
)
def test_values_and_ranges_expand_to_fixed_lists(kind, text, expected):
    assert Axis.parse(kind, text).values == expected


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("steps", "5-1", "is empty"),
        ("steps", "1-5 (+0)", "step cannot be 0"),
        ("steps", "1.5, 2", "not an integer"),
        ("steps", "many", "not a number or a range"),
        ("steps", "", "has no values"),
        ("steps", "1-10 [0]", "count in [...] must be from 1"),
        ("steps", "1-600, 1-600", "the Steps axis has over 1000 values"),
        ("sampler", "Euler a, Warp drive", "unknown sampler 'Warp drive'"),
        ("scheduler", "Karras, Wobbly", "Wobbly"),
        ("size", "16 by 16", "must look like 512x768"),
        ("prompt_sr", ", cube", "cannot be empty"),
    ],
)
def test_bad_values_are_refused_naming_them(kind, text, message):
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("(", r"\(").replace("+", r"\+")):
        Axis.parse(kind, text)


def test_axis_kinds_by_name_alias_and_a1111_label():
    assert axis_kind("CFG Scale") is axis_kind("guidance") is axis_kind("cfg")
    assert axis_kind("Schedule type").name == "scheduler"
    with pytest.raises(InvalidRequest, match="unknown X/Y/Z axis 'Checkpoint name'"):
        axis_kind("Checkpoint name")


def test_values_split_as_csv():
    assert split_values('a, "b, c" ,d') == ["a", "b, c", "d"]


# -- expansion ------------------------------------------------------------------------------------------------------


def test_cells_run_x_fastest_then_y_then_z():
    plot = XYZPlot(
        BASE,
        x=Axis.parse("steps", "1, 2"),
        y=Axis.parse("cfg", "3, 4, 5"),
        z=Axis.parse("prompt_sr", "red, blue"),
    )
    cells = plot.cells()
    assert plot.shape == (2, 3, 2) and len(cells) == 12
    expected = [(s, g, p) for p in ("red", "blue") for g in (3.0, 4.0, 5.0) for s in (1, 2)]
    assert [(c.steps, c.guidance, c.prompt.split()[1]) for c in cells] == expected
    assert {c.seed for c in cells} == {7} and {c.negative_prompt for c in cells} == {"blurry"}


def test_prompt_sr_replaces_in_both_prompts_and_must_find_the_text():
    base = dataclasses.replace(BASE, prompt="a red cube", negative_prompt="red blur")
    cells = XYZPlot(base, x=Axis.parse("prompt_sr", "red, green")).cells()
    expected = [("a red cube", "red blur"), ("a green cube", "green blur")]
    assert [(c.prompt, c.negative_prompt) for c in cells] == expected
    with pytest.raises(InvalidRequest, match="'purple' is in neither the prompt nor the negative prompt"):
        XYZPlot(base, x=Axis.parse("prompt_sr", "purple, green")).cells()


def test_sampler_and_schedule_axes_combine_into_one_sampler_label():
    samplers = Axis.parse("sampler", "Euler, DPM++ 2M Karras")
    plot = XYZPlot(BASE, x=samplers, y=Axis.parse("scheduler", "Automatic, Exponential"))
    # 'Automatic' runs DPM++ 2M on Karras (A1111 1.10); the axis's schedule replaces the one a label names
    expected = ["Euler", "DPM++ 2M Karras", "Euler Exponential", "DPM++ 2M Exponential"]
    assert [c.sampler for c in plot.cells()] == expected


def test_seeds_random_once_for_all_cells_unless_kept_and_varied_along_an_axis():
    plot = XYZPlot(dataclasses.replace(BASE, seed=None), x=Axis.parse("steps", "1, 2"), y=Axis.parse("cfg", "3, 4"))
    fixed = plot.with_fixed_seeds().cells()
    assert len({c.seed for c in fixed}) == 1 and fixed[0].seed is not None
    assert {c.seed for c in dataclasses.replace(plot, fixed_seeds=False).with_fixed_seeds().cells()} == {None}
    varied = dataclasses.replace(plot, base=BASE, vary_seeds=(True, False, False)).cells()
    assert [c.seed for c in varied] == [7, 8, 7, 8]
    seeds = XYZPlot(BASE, x=Axis.parse("seed", "-1, 5")).with_fixed_seeds().cells()
    assert seeds[0].seed not in (None, -1) and seeds[1].seed == 5


@pytest.mark.parametrize(
    ("plot", "message"),
    [
        (XYZPlot(dataclasses.replace(BASE, num_images=2), x=Axis.parse("steps", "1")), "batch size and batch count"),
        (XYZPlot(BASE, x=Axis.parse("steps", "1"), y=Axis.parse("steps", "2")), "Steps axis is given twice"),
        (XYZPlot(BASE, x=Axis.parse("denoising", "0.5")), "Denoising axis needs an init image"),
        (XYZPlot(BASE, x=Axis.parse("hires_steps", "2")), "Hires steps axis needs the hires fix"),
        (XYZPlot(BASE, x=Axis.parse("steps", "1-40"), y=Axis.parse("cfg", "1-30")), "1200 cells is over the limit"),
        (XYZPlot(BASE, margin=501), "grid margin must be"),
    ],
)
def test_plans_that_cannot_run_are_refused(plot, message):
    with pytest.raises(InvalidRequest, match=message):
        plot.cells()


def test_denoising_axis_sets_img2img_strength_or_the_hires_pass():
    init = Image.new("RGB", (16, 16), "red")
    img2img = XYZPlot(dataclasses.replace(BASE, init_image=init), x=Axis.parse("denoising", "0.5, 1"))
    assert [c.strength for c in img2img.cells()] == [0.5, 1.0]
    hires = XYZPlot(dataclasses.replace(BASE, hires=HiresFix(2.0)), x=Axis.parse("denoising", "0.3"))
    assert hires.cells()[0].hires.strength == 0.3


# -- the grid -------------------------------------------------------------------------------------------------------


def _solid(colour, size=(16, 16)):
    return Image.new("RGB", size, colour)


def test_grid_without_legend_is_the_cells_in_rows_with_margins():
    images = [_solid(c) for c in ("red", "green", "blue", "white", "black", "yellow")]
    grid = draw_grid(images, 3, (16, 16), None, None, margin=2)
    assert grid.size == (3 * 16 + 2 * 2, 2 * 16 + 2)
    assert grid.getpixel((18 + 5, 5)) == (0, 128, 0) and grid.getpixel((36 + 5, 18 + 5)) == (255, 255, 0)
    assert grid.getpixel((16, 5)) == (255, 255, 255)  # the margin


def test_legend_adds_a_band_above_and_left_of_the_cells():
    images = [_solid("red"), _solid("blue")]
    plain = draw_grid(images, 2, (16, 16), None, None)
    labelled = draw_grid(images, 2, (16, 16), ["Steps: 1", "Steps: 2"], ["CFG Scale: 3"])
    top, left = labelled.height - plain.height, labelled.width - plain.width
    assert top > 0 and left > 0
    assert np.array_equal(np.asarray(labelled)[top:, left:], np.asarray(plain))
    band = np.asarray(labelled)[:top, left:]
    assert (band < 128).any()  # text drawn


# -- running it -----------------------------------------------------------------------------------------------------


def test_each_cell_is_the_single_generation_with_its_parameters(pipe):
    plot = XYZPlot(
        BASE,
        x=Axis.parse("sampler", "Euler, DDIM"),
        y=Axis.parse("steps", "1-2"),
        z=Axis.parse("seed", "3, 4"),
        draw_legend=False,
    )
    result = run_plot(pipe, plot)
    assert len(result.cells) == 8 and not result.interrupted
    assert result.grid.size == (2 * 16 * 2, 2 * 16)  # two 2x2 sub-grids side by side (no titles without a legend)
    for index, cell in enumerate(plot.cells()):
        single = pipe.run(cell)
        assert np.array_equal(np.asarray(result.cells[index].images[0]), np.asarray(single.images[0])), index
        ix, iy, iz = index % 2, index // 2 % 2, index // 4
        box = (iz * 32 + ix * 16, iy * 16, iz * 32 + ix * 16 + 16, iy * 16 + 16)
        assert np.array_equal(np.asarray(result.grid.crop(box)), np.asarray(single.images[0])), index


def test_grid_infotext_is_the_first_cell_s_with_the_axes(pipe):
    plot = XYZPlot(BASE, x=Axis.parse("steps", "1,2"), y=Axis.parse("cfg", "1-2 (+1)"))
    result = run_plot(pipe, plot)
    params = parse_infotext(result.grid_infotext)
    assert params["Prompt"] == "a red cube" and params["Steps"] == "1" and params["Seed"] == "7"
    assert params["Script"] == "X/Y/Z plot" and params["X Type"] == "Steps" and params["X Values"] == "1,2"
    assert params["Y Type"] == "CFG Scale" and params["Y Values"] == "1-2 (+1)" and "Z Type" not in params
    images, infotexts, seeds = result.outputs(include_sub_grids=True, include_cells=True)
    assert len(images) == 1 + 1 + 4 == len(infotexts) and seeds == [7] * 4
    assert infotexts[2] == result.cells[0].infotexts[0]


def test_interrupt_keeps_the_cells_formed_and_leaves_the_rest_blank(pipe):
    calls = []

    def stop_after_first_cell():
        calls.append(1)
        return len(results_started) > 1

    results_started = []
    plot = XYZPlot(BASE, x=Axis.parse("steps", "1, 2, 1"), draw_legend=False)
    result = run_plot(pipe, plot, should_stop=stop_after_first_cell, on_cell=lambda i, n: results_started.append(i))
    assert result.interrupted and results_started == [0, 1]
    first = pipe.run(plot.cells()[0]).images[0]
    assert np.array_equal(np.asarray(result.grid.crop((0, 0, 16, 16))), np.asarray(first))
    assert np.asarray(result.grid.crop((32, 0, 48, 16))).max() == 0  # never run: black


def test_a_cell_the_model_refuses_is_refused_before_any_runs(pipe):
    ran = []
    plot = XYZPlot(BASE, x=Axis.parse("steps", "1, 1001"))
    with pytest.raises(InvalidRequest, match="steps must be an integer from 1 to 1000"):
        run_plot(pipe, plot, on_cell=lambda i, n: ran.append(i))
    assert ran == []


# -- the CLI --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from support.tiny import make_tiny_components

    from ldmkit.loading import save_pretrained

    folder = tmp_path_factory.mktemp("model") / "tiny-model"
    save_pretrained(make_tiny_components(), folder)
    return folder


def test_cli_writes_the_grid_with_its_infotext_and_each_cell(tiny_model, tmp_path, capsys):
    from ldmkit.cli import main
    from ldmkit.metadata import read_infotext

    argv = ["generate", "a red cube", "--model", str(tiny_model), "--device", "cpu", "--seed", "7", "--steps", "2"]
    argv += ["--size", "16x16", "-o", str(tmp_path), "-q", "--x", "sampler=Euler,DDIM", "--y", "cfg=1-2 (+1)"]
    assert main([*argv, "--save-cells", "--no-legend"]) == 0
    printed = capsys.readouterr().out.split()
    grid_path = tmp_path / "00001-xyz-grid.png"
    assert printed == [str(grid_path), *(str(tmp_path / f"0000{i}-7.png") for i in range(2, 6))]
    params = parse_infotext(read_infotext(grid_path))
    assert params["X Type"] == "Sampler" and params["X Values"] == "Euler,DDIM" and params["Y Values"] == "1-2 (+1)"
    with Image.open(grid_path) as grid:
        assert grid.size == (32, 32)
        cells = [np.asarray(grid.crop((x, y, x + 16, y + 16))) for y in (0, 16) for x in (0, 16)]
    for index, cell in enumerate(cells):
        with Image.open(tmp_path / f"0000{index + 2}-7.png") as saved:
            assert np.array_equal(np.asarray(saved), cell), index


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--x", "steps"], "--x must be AXIS=VALUES"),
        (["--x", "checkpoint=a,b"], "unknown X/Y/Z axis 'checkpoint'"),
        (["--x", "steps=1,2", "-n", "2"], "one image per cell"),
        (["--x", "steps=0,2"], "steps must be an integer from 1 to 1000, got 0"),
        (["--x", "steps=1,2", "--vary-seeds", "w"], "--vary-seeds takes the letters x, y, z"),
    ],
)
def test_cli_refuses_bad_plots_in_one_line_before_loading(tmp_path, capsys, extra, message):
    from ldmkit.cli import main

    missing_model = tmp_path / "no-such-model"  # never reached: the plot is refused first
    assert main(["generate", "a red cube", "--model", str(missing_model), "-o", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm: error: ") and message in err and err.count("\n") == 1, err
