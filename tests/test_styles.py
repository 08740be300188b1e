"""A1111's prompt styles: the styles file, how a style joins a prompt, and their use from the API and the CLI."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from conftest import make_tiny_components
from PIL import Image

from ldmkit.cli import main
from ldmkit.errors import InvalidRequest, LdmError
from ldmkit.loading import save_pretrained
from ldmkit.metadata import parse_infotext, read_infotext
from ldmkit.styles import Style, StyleLibrary, merge

STYLES_CSV = (
    "name,prompt,negative_prompt\n"
    'cinematic,"cinematic still of {prompt}, film grain","cartoon, {prompt}"\n'
    "ink,ink drawing,colour\n"
    "empty,,\n"
)


@pytest.fixture
def styles_file(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(STYLES_CSV, encoding="utf-8")
    return path


# -- the file and the rule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "style, text, expected",
    [
        ("cinematic still of {prompt}, grain", "an otter", "cinematic still of an otter, grain"),
        ("{prompt} and {prompt}", "a", "a and a"),  # every placeholder, as str.replace does
        ("ink drawing", "an otter", "an otter, ink drawing"),
        ("  ink drawing ", " an otter ", "an otter, ink drawing"),  # both sides stripped when appending
        ("ink drawing", "", "ink drawing"),  # an empty side is left out, with its comma
        ("", "an otter", "an otter"),
        ("{prompt}", "", ""),
    ],
)
def test_a_style_takes_the_prompt_at_its_placeholder_or_is_appended(style, text, expected):
    assert merge(style, text) == expected


def test_the_file_is_read_in_order_and_styles_apply_in_the_order_named(styles_file):
    styles = StyleLibrary.load(styles_file)
    assert styles.names() == ["cinematic", "ink", "empty"]
    assert styles.styles["ink"] == Style("ink", "ink drawing", "colour")
    prompt, negative = styles.apply(["ink", "cinematic"], "an otter", "blurry")
    assert prompt == "cinematic still of an otter, ink drawing, film grain"
    assert negative == "cartoon, blurry, colour"
    assert styles.apply(["None", ""], "an otter", "blurry") == ("an otter", "blurry")  # clients' "no style"


def test_a_bom_and_a1111s_older_text_column_are_read(tmp_path):
    path = tmp_path / "old.csv"
    path.write_bytes("\ufeffname, text\nold, watercolour\n".encode())
    assert StyleLibrary.load(path).styles["old"] == Style("old", "watercolour", "")


@pytest.mark.parametrize(
    "content, reason",
    [("title,text2\nx,y\n", "needs a header with the columns name,prompt,negative_prompt"), ("", "no header")],
)
def test_a_file_without_the_columns_is_one_line(tmp_path, content, reason):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(LdmError, match=reason):
        StyleLibrary.load(path)


def test_an_unknown_style_is_refused_by_name(styles_file):
    with pytest.raises(InvalidRequest, match=r"unknown style\(s\) 'noir'; the styles are: cinematic, ink, empty"):
        StyleLibrary.load(styles_file).apply(["ink", "noir"], "an otter", "")


def test_the_default_is_styles_csv_in_the_working_directory(styles_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert StyleLibrary.from_option(None).names() == ["cinematic", "ink", "empty"]
    monkeypatch.chdir(tmp_path.parent)
    assert StyleLibrary.from_option(None).names() == []
    with pytest.raises(LdmError, match="styles file not found"):
        StyleLibrary.from_option(tmp_path / "missing.csv")


# -- the A1111 API ----------------------------------------------------------------------------------

FAST = {"width": 16, "height": 16, "steps": 3, "seed": 4, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    pytest.importorskip("fastapi", reason="server extras not installed")
    from e2e.serving import serve_tiny

    path = tmp_path_factory.mktemp("styles") / "styles.csv"
    path.write_text(STYLES_CSV, encoding="utf-8")
    with serve_tiny(ui=False, styles=StyleLibrary.load(path)) as (running_url, _, _):
        yield running_url


def txt2img(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/sdapi/v1/txt2img", json={**FAST, **body}, timeout=60)


def pixels(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))


def test_prompt_styles_lists_the_file_as_a1111_does(url):
    assert requests.get(f"{url}/sdapi/v1/prompt-styles", timeout=10).json() == [
        {
            "name": "cinematic",
            "prompt": "cinematic still of {prompt}, film grain",
            "negative_prompt": "cartoon, {prompt}",
        },
        {"name": "ink", "prompt": "ink drawing", "negative_prompt": "colour"},
        {"name": "empty", "prompt": "", "negative_prompt": ""},
    ]


def test_styles_are_the_expanded_prompt_and_the_infotext_records_it(url):
    styled = txt2img(url, prompt="an otter", negative_prompt="blurry", styles=["cinematic", "ink"])
    expanded = txt2img(
        url, prompt="cinematic still of an otter, film grain, ink drawing", negative_prompt="cartoon, blurry, colour"
    )
    assert np.array_equal(pixels(styled), pixels(expanded))
    assert not np.array_equal(pixels(styled), pixels(txt2img(url, prompt="an otter", negative_prompt="blurry")))
    info = json.loads(styled.json()["info"])
    written = parse_infotext(info["infotexts"][0])  # A1111 writes the final prompt (its all_prompts)
    assert written["Prompt"] == "cinematic still of an otter, film grain, ink drawing"
    assert written["Negative prompt"] == "cartoon, blurry, colour"
    assert info["prompt"] == "an otter" and info["negative_prompt"] == "blurry"  # Processed.js: the request's
    assert info["all_prompts"] == ["cinematic still of an otter, film grain, ink drawing"]
    assert info["all_negative_prompts"] == ["cartoon, blurry, colour"]
    assert info["styles"] == ["cinematic", "ink"]


def test_img2img_applies_styles_too(url):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buffer, format="PNG")
    init = base64.b64encode(buffer.getvalue()).decode()

    def img2img(**body):
        return requests.post(f"{url}/sdapi/v1/img2img", json={**FAST, "init_images": [init], **body}, timeout=60)

    styled = img2img(prompt="a fox", styles=["ink"])
    assert np.array_equal(pixels(styled), pixels(img2img(prompt="a fox, ink drawing", negative_prompt="colour")))


def test_an_unknown_style_is_a_400_naming_it(url):
    refused = txt2img(url, prompt="an otter", styles=["ink", "noir"])
    assert refused.status_code == 400 and "unknown style(s) 'noir'" in refused.json()["detail"]


# -- the CLI ----------------------------------------------------------------------------------------


def test_generate_applies_styles_in_order_and_records_the_expanded_prompt(styles_file, tmp_path):
    model = tmp_path / "tiny-model"
    save_pretrained(make_tiny_components(), model)
    common = ["--steps", "2", "--seed", "3", "--size", "16x16", "--model", str(model), "--device", "cpu", "-q"]
    styled_args = ["an otter", "--negative", "blurry", "--styles-file", str(styles_file), "--style", "ink"]
    assert main(["generate", *styled_args, "--style", "cinematic", *common, "-o", str(tmp_path / "a")]) == 0
    plain_args = ["cinematic still of an otter, ink drawing, film grain", "--negative", "cartoon, blurry, colour"]
    assert main(["generate", *plain_args, *common, "-o", str(tmp_path / "b")]) == 0
    (styled,), (plain,) = (sorted((tmp_path / d).glob("*.png")) for d in "ab")
    assert np.array_equal(np.asarray(Image.open(styled)), np.asarray(Image.open(plain)))
    assert read_infotext(styled).splitlines()[:2] == [
        "cinematic still of an otter, ink drawing, film grain",
        "Negative prompt: cartoon, blurry, colour",
    ]


def test_generate_refuses_an_unknown_style_before_loading_a_model(styles_file, tmp_path, capsys):
    args = ["generate", "x", "--styles-file", str(styles_file), "--style", "noir", "--model", str(tmp_path / "none")]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        "ldm: error: unknown style(s) 'noir'; the styles are: cinematic, ink, empty"
    )


# -- the web UI -------------------------------------------------------------------------------------


def test_the_ui_offers_the_styles_and_applies_them_in_the_order_picked(styles_file):
    pytest.importorskip("gradio")
    import torch

    from ldmkit.pipeline import Pipeline
    from ldmkit.server.queue import GenerationQueue
    from ldmkit.server.ui import _request, build_ui

    styles = StyleLibrary.load(styles_file)
    queue = GenerationQueue(Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32))
    components = {c["props"].get("elem_id"): c["props"] for c in build_ui(queue, styles).config["components"]}
    choices = [choice[0] for choice in components["txt2img-styles"]["choices"]]
    assert choices == ["cinematic", "ink", "empty"] and components["img2img-styles"]["multiselect"] is True
    no_styles = {c["props"].get("elem_id") for c in build_ui(queue).config["components"]}
    assert "txt2img-styles" not in no_styles  # no styles file: no dropdown
    values = {
        "prompt": "an otter", "negative": "blurry", "styles": ["ink", "cinematic"], "steps": 2, "guidance": 7,
        "sampler": "Euler", "schedule_type": "Automatic", "seed": 1, "width": 16, "height": 16, "batch_size": 1,
        "n_iter": 1, "clip_skip": 1,
    }  # fmt: skip
    request = _request(values, 1 << 20, None, styles)
    assert request.prompt == "cinematic still of an otter, ink drawing, film grain"
    assert request.negative_prompt == "cartoon, blurry, colour"
