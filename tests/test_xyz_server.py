"""The X/Y/Z plot over AUTOMATIC1111's API: `script_name` and `script_args` as A1111 1.10's script takes them,
sent by `webuiapi` and as raw JSON; each cell is the single txt2img with its parameters."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

pytest.importorskip("fastapi", reason="server extras not installed (pip install -e .[server])")
webuiapi = pytest.importorskip("webuiapi", reason="server test extras not installed")

from e2e.serving import serve_tiny  # noqa: E402

from ldmkit.server.a1111_xyz import SCRIPT_ARGS, axis_labels  # noqa: E402
from ldmkit.server.limits import ServerLimits  # noqa: E402

FAST = {"width": 16, "height": 16, "steps": 2}
# A1111 1.10's txt2img axis indices: Seed 1, Steps 4, CFG Scale 6, Prompt S/R 7, Sampler 9, Checkpoint name 11
SEED, STEPS, CFG, PROMPT_SR, SAMPLER, CHECKPOINT = 1, 4, 6, 7, 9, 11


@pytest.fixture(scope="module")
def url():
    with serve_tiny(ui=False, limits=ServerLimits(max_grid_cells=6)) as (base_url, _pipe, _app):
        yield base_url


def script_args(x=(0, ""), y=(0, ""), z=(0, ""), dropdowns=([], [], []), **options) -> list:
    """A full script_args list, as A1111's UI (and clients copying it) sends it."""
    values = [*x[:2], dropdowns[0], *y[:2], dropdowns[1], *z[:2], dropdowns[2]]
    defaults = dict(SCRIPT_ARGS[9:])
    return values + [options.get(name, default) for name, default in defaults.items()]


def image_of(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def txt2img(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a red cube", **FAST, **body}, timeout=120)


def test_axis_indices_follow_a1111_1_10_per_tab():
    txt = axis_labels("txt2img")
    assert [txt[i] for i in (SEED, STEPS, CFG, PROMPT_SR, SAMPLER, CHECKPOINT)] == [
        "Seed", "Steps", "CFG Scale", "Prompt S/R", "Sampler", "Checkpoint name"
    ]  # fmt: skip
    assert (txt.index("Schedule type"), txt.index("Clip skip"), txt.index("Denoising"), txt[-1]) == (17, 25, 26, "Size")
    img = axis_labels("img2img")
    assert (img.index("CFG Scale"), img.index("Sampler"), img.index("Denoising"), len(img)) == (5, 9, 25, 42)


def test_webuiapi_plot_answers_the_grid_then_each_cell_equal_to_its_single_txt2img(url):
    host, port = url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    args = script_args(x=(STEPS, "1,2"), y=(CFG, "1-2 (+1)"), include_lone_images=True)
    result = api.txt2img(prompt="a red cube", seed=5, script_name="X/Y/Z plot", script_args=args, **FAST)
    assert result.info["sampler_name"] == "Euler a"  # webuiapi's default
    grid, cells = result.images[0], result.images[1:]
    assert len(cells) == 4 and grid.width > 32 and grid.height > 32  # the legend's bands around 2x2 cells
    info = result.info
    assert info["all_seeds"] == [5] * 4 and info["index_of_first_image"] == 1
    assert 'Script: X/Y/Z plot, X Type: Steps, X Values: "1,2", Y Type: CFG Scale' in info["infotexts"][0]
    assert grid.info["parameters"] == info["infotexts"][0]
    for index, (steps, cfg) in enumerate([(1, 1), (2, 1), (1, 2), (2, 2)]):
        single = image_of(txt2img(url, seed=5, steps=steps, cfg_scale=cfg, sampler_name="Euler a").json()["images"][0])
        assert np.array_equal(np.asarray(cells[index]), np.asarray(single)), index
        assert f"Steps: {steps}," in info["infotexts"][1 + index]
    assert np.array_equal(np.asarray(grid)[-16:, -16:], np.asarray(cells[3]))  # bottom-right cell of the grid


def test_raw_payload_dropdown_sampler_axis_z_sub_grids_and_lowercase_name(url):
    args = script_args(x=(SAMPLER, ""), z=(SEED, "3, 4"), dropdowns=(["Euler", "DDIM"], [], []), include_sub_grids=True)
    response = txt2img(url, script_name="x/y/z plot", script_args=args)
    assert response.status_code == 200, response.text
    body = response.json()
    info = json.loads(body["info"])
    assert len(body["images"]) == 1 + 2 and info["index_of_first_image"] == 3  # grid, one sub-grid per Z value
    assert info["all_seeds"] == [3, 3, 4, 4]
    sub_grid = image_of(body["images"][1])
    grid = image_of(body["images"][0])
    assert grid.width == 2 * sub_grid.width and grid.height > sub_grid.height  # side by side, under their titles
    assert 'Z Type: Seed, Z Values: "3, 4"' in info["infotexts"][0]


def test_a_short_script_args_list_takes_the_script_defaults(url):
    response = txt2img(url, seed=2, script_name="X/Y/Z plot", script_args=[STEPS, "1, 2"])
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert len(response.json()["images"]) == 1 and info["all_seeds"] == [2, 2]  # the grid only (no lone images)
    assert "X Type: Steps" in info["infotexts"][0] and "Y Type" not in info["infotexts"][0]


def test_img2img_denoising_axis(url):
    init = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(init, format="PNG")
    body = {
        "prompt": "a red cube",
        "init_images": [base64.b64encode(init.getvalue()).decode()],
        "script_name": "X/Y/Z plot",
        "script_args": script_args(x=(25, "0.5, 1"), include_lone_images=True, no_fixed_seeds=False),
        "seed": 9,
        **FAST,
    }
    response = requests.post(f"{url}/sdapi/v1/img2img", json=body, timeout=120)
    assert response.status_code == 200, response.text
    infotexts = json.loads(response.json()["info"])["infotexts"]
    assert "Denoising strength: 0.5" in infotexts[1] and "Denoising strength: 1.0" in infotexts[2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (script_args(x=(CHECKPOINT, "model.safetensors")), "A1111's 'Checkpoint name' axis, which ldmkit's"),
        (script_args(x=(99, "1")), "x_type) must be an axis index from 0 to"),
        (script_args(x=(STEPS, "1-4"), y=(CFG, "1,2")), "8 cells is over this server's limit max_grid_cells = 6"),
        (script_args(x=(STEPS, "5-1")), "range '5-1' is empty"),
        (script_args(x=(STEPS, "1,2"), draw_legend="yes"), "script_args[9] (draw_legend) must be true or false"),
        (script_args(x=(STEPS, "1,2"), margin_size=900), "margin_size) must be an integer from 0 to 500"),
        (script_args(x=(PROMPT_SR, "blue, green")), "'blue' is in neither the prompt nor the negative prompt"),
        ([*script_args(x=(STEPS, "1")), "extra"], "take at most 18 values"),
    ],
)
def test_bad_script_args_are_refused_with_400_naming_them(url, args, message):
    response = txt2img(url, script_name="X/Y/Z plot", script_args=args)
    assert response.status_code == 400 and message in response.json()["detail"], response.text


def test_other_scripts_and_batches_are_refused(url):
    other = txt2img(url, script_name="Prompt matrix")
    assert other.status_code == 400 and "runs the 'x/y/z plot' script only" in other.text
    batch = txt2img(url, script_name="X/Y/Z plot", script_args=script_args(x=(STEPS, "1,2")), batch_size=2)
    assert batch.status_code == 400 and "one image per cell" in batch.text


def test_progress_counts_cells_and_interrupt_answers_the_grid_formed_so_far():
    with serve_tiny(ui=False) as (base_url, pipe, _app), ThreadPoolExecutor(1) as pool:
        pipe.hold(at_step=1)  # the first cell's step 0 is done; it waits at step 1
        args = script_args(x=(STEPS, "2, 2, 2"), include_lone_images=True)
        answer = pool.submit(txt2img, base_url, seed=5, script_name="X/Y/Z plot", script_args=args)
        assert pipe.held.wait(30)
        progress = requests.get(f"{base_url}/sdapi/v1/progress?skip_current_image=true", timeout=10).json()
        assert (progress["state"]["job_count"], progress["state"]["job_no"]) == (3, 0)
        assert progress["progress"] == pytest.approx((0 + 1 / 2) / 3)
        requests.post(f"{base_url}/sdapi/v1/interrupt", timeout=10)
        pipe.release()
        response = answer.result(timeout=60)
    assert response.status_code == 200, response.text
    body, info = response.json(), json.loads(response.json()["info"])
    assert len(body["images"]) == 1 + 1 and info["all_seeds"] == [5]  # the grid and the one cell formed
    grid = np.asarray(image_of(body["images"][0]))
    assert grid[-16:, -32:].max() == 0  # the two cells never run are black


def test_scripts_and_script_info_list_the_plot(url):
    assert requests.get(f"{url}/sdapi/v1/scripts", timeout=10).json() == {
        "txt2img": ["x/y/z plot"],
        "img2img": ["x/y/z plot"],
    }
    info = requests.get(f"{url}/sdapi/v1/script-info", timeout=10).json()
    assert [(s["name"], s["is_img2img"], len(s["args"])) for s in info] == [
        ("x/y/z plot", False, 18),
        ("x/y/z plot", True, 18),
    ]
    assert info[0]["args"][0]["choices"][STEPS] == "Steps" and info[0]["args"][16]["maximum"] == 500


# -- the web UI -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ui_url():
    pytest.importorskip("gradio", reason="server extras not installed")
    with serve_tiny(ui=True) as (base_url, _pipe, _app):
        yield base_url


def ui_values(url: str, **by_label) -> list:
    """The txt2img tab's inputs (its endpoint /run is the first tab's), defaults with those named by label replaced."""
    endpoint = requests.get(f"{url}/gradio_api/info", timeout=30).json()["named_endpoints"]["/run"]
    values = [p.get("parameter_default") for p in endpoint["parameters"]]
    labels = [p["label"] for p in endpoint["parameters"]]
    for label, value in {"Negative prompt": "", **by_label}.items():
        values[labels.index(label)] = value
    return values


def test_ui_plot_shows_the_grid_then_each_cell(ui_url):
    from test_ui_security import call

    values = ui_values(
        ui_url, Prompt="a red cube", Steps=2, Width=16, Height=16, **{"Seed (-1: random)": 5},
        **{"X type": "Steps", "X values": "1, 2", "Y type": "CFG Scale", "Y values": "1-2 (+1)"},
    )  # fmt: skip
    event, payload = call(ui_url, "run", values)
    assert event == "complete", payload
    _preview, status, gallery, parameters, _state = payload
    assert status == "Done: 4 image(s), seed(s) 5, 5, 5, 5."
    assert [item["caption"] for item in gallery] == ["X/Y/Z plot"] + ["seed 5"] * 4
    assert 'X Type: Steps, X Values: "1, 2", Y Type: CFG Scale' in parameters  # the grid's, shown first


def test_ui_plot_with_a_bad_axis_says_why(ui_url):
    from test_ui_security import call

    values = ui_values(ui_url, Prompt="a red cube", Width=16, Height=16, **{"X type": "Steps", "X values": "9-1"})
    event, payload = call(ui_url, "run", values)
    assert event == "error" and "range &#x27;9-1&#x27; is empty" in payload["error"], payload  # HTML-escaped
