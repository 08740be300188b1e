"""The web UI reads only files uploaded to this server, keeps them in a bounded private folder, and answers
only its own host names and origins (issue 15, item 1, 9 and 16)."""

import io
import json
import os
import sys
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "e2e"))
from serving import serve_tiny  # noqa: E402

from ldmkit.metadata import png_info  # noqa: E402
from ldmkit.server.limits import ServerLimits  # noqa: E402
from ldmkit.server.ui_files import UiFileCache  # noqa: E402


@pytest.fixture(scope="module")
def server():
    with serve_tiny(limits=ServerLimits(max_input_pixels=64 * 64)) as (url, _pipe, app):
        yield url, app


def call(url: str, endpoint: str, data: list) -> tuple[str, dict]:
    """One Gradio API call: (event name, payload) of its last server-sent event."""
    started = requests.post(f"{url}/gradio_api/call/{endpoint}", json={"data": data}, timeout=30)
    started.raise_for_status()
    stream = requests.get(f"{url}/gradio_api/call/{endpoint}/{started.json()['event_id']}", timeout=60)
    events = [block for block in stream.text.strip().split("\n\n") if block]
    event, data_line = events[-1].split("\n")[:2]
    return event.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))


def file_data(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


def upload(url: str, image: Image.Image, infotext: str | None = None) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(infotext) if infotext else None)
    response = requests.post(f"{url}/gradio_api/upload", files={"files": ("a.png", buffer.getvalue())}, timeout=30)
    response.raise_for_status()
    return response.json()[0]


def secret_png(tmp_path: Path) -> Path:
    path = tmp_path / "secret.png"
    Image.new("RGB", (16, 16), "red").save(path, pnginfo=png_info("secret prompt\nSteps: 1"))
    return path


@pytest.mark.parametrize("endpoint", ["read_png_info", "_image_size"])
def test_a_path_on_disk_is_refused_as_an_input_and_never_copied(server, tmp_path, endpoint):
    url, app = server
    secret = secret_png(tmp_path)
    for path in ("/etc/passwd", str(secret)):
        event, payload = call(url, endpoint, [file_data(path)])
        assert event == "error"
        assert "not uploaded by a user" in payload["error"]
    cached = list(Path(os.environ["GRADIO_TEMP_DIR"]).rglob("*"))
    assert not [p for p in cached if p.name in ("passwd", "secret.png")]


def test_a_path_on_disk_is_refused_by_the_img2img_tab(server, tmp_path):
    url, _ = server
    info = requests.get(f"{url}/gradio_api/info", timeout=30).json()["named_endpoints"]
    img2img = info["/run_1"]["parameters"]
    values = [p.get("parameter_default") for p in img2img]
    labels = [p["label"] for p in img2img]
    values[labels.index("Prompt")] = "a cat"
    values[labels.index("Init image")] = file_data(str(secret_png(tmp_path)))
    event, payload = call(url, "run_1", values)
    assert event == "error"
    assert "not uploaded by a user" in payload["error"]


def test_files_on_disk_are_not_served(server, tmp_path):
    url, _ = server
    for path in ("/etc/passwd", str(secret_png(tmp_path)), str(Path.cwd() / "pyproject.toml")):
        response = requests.get(f"{url}/gradio_api/file={path}", timeout=30)
        assert response.status_code in (403, 404), path
        assert b"secret prompt" not in response.content and b"root:" not in response.content


def test_an_uploaded_png_is_read(server):
    url, _ = server
    infotext = "a cat\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 7, Size: 16x16"
    path = upload(url, Image.new("RGB", (16, 16), "blue"), infotext)
    event, payload = call(url, "read_png_info", [file_data(path)])
    assert event == "complete"
    assert payload[0] == infotext
    assert (payload[1]["Prompt"], payload[1]["Seed"]) == ("a cat", "7")


def test_the_ui_applies_the_servers_input_pixel_limit(server):
    url, _ = server
    path = upload(url, Image.new("RGB", (65, 64), "blue"), "a cat")
    event, payload = call(url, "read_png_info", [file_data(path)])
    assert event == "error"
    assert "max_input_pixels = 4096" in payload["error"]
    event, payload = call(url, "_image_size", [file_data(path)])
    assert event == "error"
    assert "max_input_pixels = 4096" in payload["error"]


def test_other_host_names_are_refused(server):
    url, _ = server
    assert requests.get(f"{url}/sdapi/v1/samplers", timeout=30).status_code == 200
    for host in ("evil.example", "attacker.example:7860"):
        response = requests.get(f"{url}/sdapi/v1/samplers", headers={"Host": host}, timeout=30)
        assert response.status_code == 400
        assert requests.get(f"{url}/", headers={"Host": host}, timeout=30).status_code == 400


def test_no_cross_origin_reads_with_or_without_credentials(server):
    url, _ = server
    for origin in ("http://evil.example", "http://localhost:9999", "null"):
        preflight = requests.options(
            f"{url}/gradio_api/upload",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
            timeout=30,
        )
        assert "access-control-allow-origin" not in preflight.headers
        simple = requests.get(f"{url}/gradio_api/info", headers={"Origin": origin}, timeout=30)
        assert "access-control-allow-origin" not in simple.headers
        assert "access-control-allow-credentials" not in simple.headers


def test_a_configured_origin_may_read():
    with serve_tiny(ui=False, allowed_origins=("https://app.example",)) as (url, _pipe, _app):
        response = requests.get(f"{url}/sdapi/v1/samplers", headers={"Origin": "https://app.example"}, timeout=30)
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        response = requests.get(f"{url}/sdapi/v1/samplers", headers={"Origin": "https://evil.example"}, timeout=30)
        assert "access-control-allow-origin" not in response.headers


def test_the_ui_cache_is_private_and_removed_at_shutdown():
    with serve_tiny() as (url, _pipe, _app):
        folder = Path(os.environ["GRADIO_TEMP_DIR"])
        assert folder.name.startswith("ldmkit-ui-")
        path = Path(upload(url, Image.new("RGB", (16, 16), "blue")))
        assert path.is_file() and folder in path.parents
    assert not folder.exists()


def test_sweep_deletes_old_files_then_the_oldest_until_the_folder_fits(tmp_path):
    cache = UiFileCache(tmp_path, max_bytes=250, max_age_seconds=100)
    now = time.time()
    ages = {"old": 500, "a": 50, "b": 40, "c": 30}  # seconds
    for name, age in ages.items():
        path = tmp_path / name / "file.png"
        path.parent.mkdir()
        path.write_bytes(b"x" * 100)
        os.utime(path, (now - age, now - age))
    freed = cache.sweep(now)
    assert freed == 200  # "old" by age, then "a", the oldest, to get under 250 bytes
    assert sorted(p.parent.name for p in tmp_path.rglob("*.png")) == ["b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c"]  # emptied folders go too
