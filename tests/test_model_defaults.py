"""A model folder's own default guidance (its ldmkit.json): read at load, used wherever a request names none."""

import base64
import dataclasses
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from support.convert import save_single_file
from support.sdxl import make_tiny_sdxl_components
from support.tiny import make_tiny_components

from ldmkit.cli import main
from ldmkit.errors import ModelLoadError
from ldmkit.loading import load_components, save_pretrained
from ldmkit.metadata import parse_infotext, read_infotext
from ldmkit.pipeline import Pipeline

CPU = torch.device("cpu")
FAST = {"steps": 2, "seed": 3, "sampler": "Euler"}


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory):
    """The tiny model as a diffusers folder without ldmkit.json."""
    return save_pretrained(make_tiny_components(), tmp_path_factory.mktemp("models") / "plain")


@pytest.fixture(scope="module")
def own_folder(plain_folder, tmp_path_factory):
    """The same model whose folder names guidance 3.5."""
    folder = tmp_path_factory.mktemp("models") / "own"
    shutil.copytree(plain_folder, folder)
    (folder / "ldmkit.json").write_text('{"default_guidance": 3.5}\n')
    return folder


def with_file(plain_folder, tmp_path, text: str):
    folder = tmp_path / "model"
    shutil.copytree(plain_folder, folder)
    (folder / "ldmkit.json").write_text(text)
    return folder


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=int)


# -- loading -----------------------------------------------------------------------------------------------------


def test_the_file_sets_the_guidance_of_requests_that_name_none(own_folder):
    pipe = Pipeline.from_pretrained(own_folder)
    assert pipe.default_guidance == 3.5
    default = pipe.generate("an otter", **FAST)
    assert "CFG scale: 3.5," in default.infotexts[0]
    # the denoiser ran at 3.5 too, not only the metadata
    assert np.array_equal(pixels(default), pixels(pipe.generate("an otter", guidance=3.5, **FAST)))
    assert not np.array_equal(pixels(default), pixels(pipe.generate("an otter", guidance=7.5, **FAST)))
    explicit = pipe.generate("an otter", guidance=5.0, **FAST)
    assert "CFG scale: 5.0," in explicit.infotexts[0]


def test_without_the_file_the_default_is_7_5(plain_folder):
    assert load_components(plain_folder).default_guidance is None
    pipe = Pipeline.from_pretrained(plain_folder)
    assert pipe.default_guidance == 7.5
    assert "CFG scale: 7.5," in pipe.generate("an otter", **FAST).infotexts[0]


def test_a_single_file_ignores_the_files_beside_it_and_its_config_folder(own_folder, tmp_path):
    """A single file has no folder of its own: the folder it sits in (or its config=) may hold other models."""
    path = save_single_file(make_tiny_components(), tmp_path / "tiny.safetensors")
    (tmp_path / "ldmkit.json").write_text('{"default_guidance": 2}')
    assert load_components(path, config=own_folder).default_guidance is None


@pytest.mark.parametrize("make", [make_tiny_components, make_tiny_sdxl_components], ids=["sd", "sdxl"])
def test_save_pretrained_writes_the_file_and_load_reads_it(make, tmp_path):
    folder = save_pretrained(dataclasses.replace(make(), default_guidance=4.0), tmp_path / "model")
    assert json.loads((folder / "ldmkit.json").read_text()) == {"default_guidance": 4.0}
    assert load_components(folder).default_guidance == 4.0


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"default_guidance": 3.5, "sampler": "Euler"}', "ldmkit.json: unknown key 'sampler'"),
        ('{"default_guidance": "3.5"}', "json: default_guidance must be a finite number from 0 to 100.0, got '3.5'"),
        ('{"default_guidance": -1}', "default_guidance must be a finite number from 0 to 100.0, got -1"),
        ('{"default_guidance": 101}', "default_guidance must be a finite number from 0 to 100.0, got 101"),
        ('{"default_guidance": NaN}', "default_guidance must be a finite number from 0 to 100.0, got nan"),
        ('{"default_guidance": true}', "default_guidance must be a finite number from 0 to 100.0, got True"),
        ('{"default_guidance": null}', "default_guidance must be a finite number from 0 to 100.0, got None"),
        ("[3.5]", 'ldmkit.json must hold a JSON object, such as {"default_guidance": 3.5}'),
        ('{"default_guidance": 3.5', "ldmkit.json is not valid JSON"),
    ],
)  # fmt: skip
def test_a_bad_file_is_refused_at_load_naming_it_and_the_key(plain_folder, tmp_path, text, message):
    folder = with_file(plain_folder, tmp_path, text)
    with pytest.raises(ModelLoadError) as error:
        load_components(folder)
    assert message in str(error.value) and str(folder / "ldmkit.json") in str(error.value)
    assert "\n" not in str(error.value)


# -- the front ends ----------------------------------------------------------------------------------------------


def test_ldm_generate_without_guidance_records_the_models(own_folder, tmp_path):
    out = tmp_path / "out"
    assert (
        main(["generate", "an otter", "--steps", "2", "--seed", "1", "--model", str(own_folder), "-o", str(out)]) == 0
    )
    assert parse_infotext(read_infotext(out / "00001-1.png"))["CFG scale"] == "3.5"
    args = ["generate", "an otter", "--steps", "2", "--seed", "2", "--guidance", "6", "--model", str(own_folder)]
    assert main([*args, "-o", str(out)]) == 0
    assert parse_infotext(read_infotext(out / "00002-2.png"))["CFG scale"] == "6.0"


def test_ldm_generate_refuses_a_bad_file_in_one_line(plain_folder, tmp_path, capsys):
    folder = with_file(plain_folder, tmp_path, '{"guidance": 3.5}')
    assert main(["generate", "an otter", "--steps", "2", "--model", str(folder), "-o", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "ldmkit.json: unknown key 'guidance'" in lines[0], lines


def test_ldm_eval_generates_at_the_models_guidance_and_records_it(own_folder, monkeypatch):
    from ldmkit.eval import report

    class Generated(Exception):
        pass

    def generate_eval_images(model_dir, num_prompts, steps, guidance, *args):
        raise Generated(guidance)

    monkeypatch.setattr(report, "generate_eval_images", generate_eval_images)
    with pytest.raises(Generated) as asked:
        report.evaluate(own_folder, clip_dir=own_folder / "no-clip", data_dir=own_folder / "no-data", device="cpu")
    assert asked.value.args == (3.5,)  # the number, which evaluate also records as "guidance"


def tiny_pipe(default_guidance: float | None) -> Pipeline:
    return Pipeline(dataclasses.replace(make_tiny_components(), default_guidance=default_guidance), CPU, torch.float32)


def test_ldm_eval_generate_only_saves_the_settings_and_scoring_keeps_them(own_folder, tmp_path, capsys):
    """Images made on one machine and scored on another: the scores record the guidance and steps they were made at."""
    from ldmkit.eval import report, scenes

    prompts = {name: ps[:1] for name, ps in scenes.prompt_sets().items()}
    out = tmp_path / "images"
    with pytest.MonkeyPatch.context() as patch:  # one prompt per set keeps the tiny model's run short
        patch.setattr(scenes, "prompt_sets", lambda: prompts)
        patch.setattr(scenes, "seeds_for", lambda name, count: list(range(count)))
        args = ["eval", "--model", str(own_folder), "--prompts", "1", "--steps", "2", "--generate-only", str(out)]
        assert main([*args, "--size", "48"]) == 0
    assert float(torch.load(out / "guidance.pt")) == 3.5 and int(torch.load(out / "steps.pt")) == 2
    assert set(report.SETTINGS) <= {path.stem for path in out.glob("*.pt")}
    assert int(torch.load(out / "size.pt")) == 48 and torch.load(out / "plain.pt").shape[-2:] == (48, 48)
    capsys.readouterr()
    for extra, says in ((["--guidance", "7"], "were generated at guidance 3.5"), (["--size", "64"], "at 48 px")):
        assert main(["eval", "--model", str(own_folder), "--images", str(out), *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], lines
    assert main(["eval", "--model", str(own_folder), "--size", "60"]) == 2  # refused before anything loads
    assert "--size must be a positive multiple of 8" in capsys.readouterr().err


@pytest.fixture
def client():
    """A test client of a server over the tiny model with the given default guidance."""
    pytest.importorskip("fastapi", reason="server extras not installed")
    from fastapi.testclient import TestClient

    from ldmkit.server.app import create_app

    clients = []

    def start(default_guidance: float | None) -> TestClient:
        app = create_app(tiny_pipe(default_guidance), ui=False)
        clients.append(TestClient(app, base_url="http://127.0.0.1").__enter__())
        return clients[-1]

    yield start
    for started in clients:
        started.__exit__(None, None, None)


def txt2img(client, **fields) -> tuple[dict, dict]:
    body = {"prompt": "an otter", "width": 16, "height": 16, **FAST, "sampler_name": "Euler", **fields}
    body.pop("sampler")
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    return response.json()["parameters"], json.loads(response.json()["info"])


def test_a1111_without_cfg_scale_uses_the_models_and_keeps_a_given_one(client):
    own = client(3.5)
    parameters, info = txt2img(own)
    assert parameters["cfg_scale"] == info["cfg_scale"] == 3.5 and "CFG scale: 3.5," in info["infotexts"][0]
    parameters, info = txt2img(own, cfg_scale=5)
    assert parameters["cfg_scale"] == info["cfg_scale"] == 5 and "CFG scale: 5.0," in info["infotexts"][0]
    # a model whose folder names none: A1111's own default, 7 (not ldmkit's 7.5), as before
    parameters, info = txt2img(client(None))
    assert parameters["cfg_scale"] == info["cfg_scale"] == 7.0 and "CFG scale: 7.0," in info["infotexts"][0]


def test_openai_images_use_the_models_guidance(client):
    response = client(3.5).post("/v1/images/generations", json={"prompt": "an otter", "size": "16x16"})
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    assert parse_infotext(image.info["parameters"])["CFG scale"] == "3.5"


@pytest.mark.parametrize("default_guidance,slider", [(3.5, 3.5), (None, 7.5)])
def test_the_ui_cfg_slider_starts_at_the_models_guidance(default_guidance, slider):
    pytest.importorskip("gradio")
    from ldmkit.server.queue import GenerationQueue
    from ldmkit.server.ui import MODES, build_ui

    config = build_ui(GenerationQueue(tiny_pipe(default_guidance))).config
    components = {c["props"].get("elem_id"): c["props"] for c in config["components"]}
    assert [components[f"{mode}-cfg-scale"]["value"] for mode in MODES] == [slider] * len(MODES)
