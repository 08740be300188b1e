"""The web UI in headless Chromium: type a prompt, press Generate, see intermediates, then the final image.

Uses Debian's chromium (never a downloaded browser) through Playwright. LDM_UI_SCREENSHOT=docs/ui.png
retakes the docs' screenshot: the shipped default model generating "red apple, 3d render".
"""

from __future__ import annotations

import io
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("gradio", reason="server extras not installed (pip install -e .[server])")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright not installed (see .ci/server-deps.sh)")

from e2e.serving import serve, serve_tiny, tiny_pipeline

from ldmkit.metadata import png_info
from ldmkit.pipeline import Pipeline
from ldmkit.server.app import create_app
from ldmkit.server.ui_controlnet import CANVAS

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None, reason=f"no {CHROMIUM}: apt-get install chromium (CI does)"
)


@pytest.fixture(scope="module")
def ui():
    with serve_tiny() as (url, pipe, app):
        pipe.step_seconds = 0.1  # a step as slow as a real model's, so intermediates can be seen
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(url + "/")
            yield page, app.state.queue
            browser.close()


def test_generate_shows_intermediates_then_the_final_image_with_its_parameters(ui):
    page, _ = ui
    page.fill("#txt2img-prompt textarea", "a red cube")
    steps = page.locator("input[aria-label='number input for Steps']").first
    steps.fill("12")
    steps.press("Enter")
    page.click("#txt2img-generate")

    page.wait_for_selector("#txt2img-preview img")
    status = page.inner_text("#txt2img-status")
    assert status.startswith("Step ") and "/12" in status  # an intermediate, while the image forms...
    assert page.locator("#txt2img-gallery img").count() == 0  # ...before any final image

    page.wait_for_selector("#txt2img-gallery img")
    page.wait_for_function("document.querySelector('#txt2img-status').innerText.startsWith('Done')")
    parameters = page.input_value("#txt2img-parameters textarea")
    assert parameters.startswith("a red cube\nSteps: 12,") and "Seed: " in parameters
    assert "Sampler: DPM++ 2M Karras," in parameters  # the default sampler on its Automatic schedule type

    # The gallery serves PNGs that keep their parameters, as AUTOMATIC1111's do.
    source = page.locator("#txt2img-gallery img").first.get_attribute("src")
    image = Image.open(io.BytesIO(page.request.get(source).body()))
    assert image.info["parameters"] == parameters


def test_cancel_stops_the_generation_and_frees_the_worker(ui):
    page, queue = ui
    page.click("button[role='tab']:has-text('txt2img')")
    steps = page.locator("input[aria-label='number input for Steps']").first
    steps.fill("150")
    steps.press("Enter")
    page.click("#txt2img-generate")
    page.wait_for_function("document.querySelector('#txt2img-status').innerText.startsWith('Step')")
    page.click("#txt2img-cancel")
    page.wait_for_function("document.querySelector('#txt2img-status').innerText.startsWith('Cancelled')")
    wait_until_idle(queue)


def test_closing_the_page_frees_the_worker(ui):
    page, queue = ui
    other = page.context.browser.new_page()
    other.goto(page.url)
    steps = other.locator("input[aria-label='number input for Steps']").first
    steps.fill("150")
    steps.press("Enter")
    other.click("#txt2img-generate")
    other.wait_for_function("document.querySelector('#txt2img-status').innerText.startsWith('Step')")
    other.close()
    wait_until_idle(queue)


def wait_until_idle(queue, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while queue.current is not None:  # a cancelled job stops at its next step
        assert time.monotonic() < deadline, "the cancelled job is still running"
        time.sleep(0.05)


def test_img2img_tab_repaints_an_uploaded_image(ui, tmp_path):
    page, queue = ui
    wait_until_idle(queue)  # the previous test closed a page mid-generation
    path = tmp_path / "init.png"
    Image.new("RGB", (32, 24), (200, 40, 40)).save(path)
    page.click("button[role='tab']:has-text('img2img')")
    page.set_input_files("#img2img-init input[type='file']", str(path))
    # Generate only once the upload has landed (its size fills the width field), or the click races it
    page.wait_for_function("document.querySelector(\"#img2img-width input[type='number']\").value === '32'")
    page.fill("#img2img-prompt textarea", "a blue cube")
    page.click("#img2img-generate")
    page.wait_for_function("document.querySelector('#img2img-status').innerText.startsWith('Done')")
    parameters = page.input_value("#img2img-parameters textarea")
    assert parameters.startswith("a blue cube\n") and "Denoising strength: 0.75" in parameters


def test_hires_fix_controls_upscale_the_txt2img_image(ui):
    page, _ = ui
    page.click("button[role='tab']:has-text('txt2img')")
    steps = page.locator("input[aria-label='number input for Steps']").first
    steps.fill("3")
    steps.press("Enter")
    page.click("#txt2img-hires button")  # the accordion opens
    page.check("#txt2img-hires-enable input[type='checkbox']")
    page.click("#txt2img-generate")
    page.wait_for_function("document.querySelector('#txt2img-status').innerText.startsWith('Done')")
    parameters = page.input_value("#txt2img-parameters textarea")
    assert "Hires upscale: 2.0" in parameters and "Hires upscaler: Latent" in parameters
    source = page.locator("#txt2img-gallery img").first.get_attribute("src")
    assert Image.open(io.BytesIO(page.request.get(source).body())).size == (32, 32)  # the tiny model's 16, twice
    page.uncheck("#txt2img-hires-enable input[type='checkbox']")


def test_inpaint_tab_repaints_under_an_uploaded_mask(ui, tmp_path):
    page, _ = ui
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.new("RGB", (24, 16), (40, 40, 200)).save(init)
    Image.new("L", (24, 16), 255).save(mask)
    page.click("button[role='tab']:has-text('inpaint')")
    page.fill("#inpaint-prompt textarea", "a green cube")
    page.click("#inpaint-generate")
    page.wait_for_selector(".toast-body:has-text('Upload an init image first')")  # nothing uploaded yet
    page.set_input_files("#inpaint-init input[type='file']", str(init))
    page.set_input_files("#inpaint-mask input[type='file']", str(mask))
    page.wait_for_function(
        "document.querySelector(\"#inpaint-width input[type='number']\").value === '24'"
    )  # from the upload
    page.click("#inpaint-generate")
    page.wait_for_function("document.querySelector('#inpaint-status').innerText.startsWith('Done')")
    parameters = page.input_value("#inpaint-parameters textarea")
    assert parameters.startswith("a green cube\n") and "Mask blur: 4" in parameters and "Size: 24x16" in parameters


def test_a_lora_problem_is_shown_with_its_reason_before_the_request_queues(ui):
    page, queue = ui
    page.click("button[role='tab']:has-text('txt2img')")
    page.fill("#txt2img-prompt textarea", "a cube <lora:nowhere:1>")  # Pipeline.prepare finds no LoRA folder
    page.click("#txt2img-generate")
    page.wait_for_selector(
        ".toast-body:has-text('the prompt has <lora:...> tags but no LoRA folder is set')"
    )  # escaped, not eaten as HTML
    assert queue.current is None and queue.waiting() == 0  # refused before it took a place
    wait_until_idle(queue)


def test_png_info_tab_reads_parameters_from_an_upload(ui, tmp_path):
    page, _ = ui
    path = tmp_path / "with-parameters.png"
    Image.new("RGB", (8, 8)).save(
        path, pnginfo=png_info("a boat\nSteps: 9, Sampler: Euler, CFG scale: 7, Seed: 11, Size: 8x8")
    )
    page.click("button[role='tab']:has-text('PNG info')")
    page.set_input_files("#png-info-image input[type='file']", str(path))
    page.wait_for_function("document.querySelector('#png-info-text textarea').value.includes('Seed: 11')")
    assert page.input_value("#png-info-text textarea").startswith("a boat\n")


@pytest.mark.skipif(
    not os.environ.get("LDM_UI_SCREENSHOT"), reason="LDM_UI_SCREENSHOT=docs/ui.png retakes the docs' screenshots"
)
def test_screenshots_of_the_default_model_for_the_docs(tmp_path):
    """docs/ui.png: txt2img of "red apple, 3d render"; docs/ui-inpaint.png: its first image's apple repainted green."""
    path = os.environ["LDM_UI_SCREENSHOT"]
    app = create_app(
        Pipeline.from_pretrained(None, device="cpu")
    )  # the shipped model; the CPU for the same pixels anywhere
    with serve(app) as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(120_000)
        page.goto(url + "/")
        apples = generate_for_screenshot(page, "txt2img", "red apple, 3d render", seed=1, batch_size=4)
        page.screenshot(path=path)

        init, mask = tmp_path / "apple.png", tmp_path / "mask.png"
        init.write_bytes(page.request.get(apples[0]).body())
        mask_image = Image.new("L", Image.open(init).size, 0)
        ImageDraw.Draw(mask_image).ellipse((16, 28, 112, 120), fill=255)  # the apple's body, not its leaf
        mask_image.save(mask)
        page.click("button[role='tab']:has-text('inpaint')")
        page.set_input_files("#inpaint-init input[type='file']", str(init))
        page.set_input_files("#inpaint-mask input[type='file']", str(mask))
        generate_for_screenshot(page, "inpaint", "green apple, 3d render", seed=1, batch_size=2)
        root, extension = os.path.splitext(path)
        page.screenshot(path=f"{root}-inpaint{extension}")
        browser.close()


def generate_for_screenshot(page, tab: str, prompt: str, seed: int, batch_size: int, maps: int = 0) -> list[str]:
    """Generate in a tab; the gallery's image URLs (the generated images: `maps` ControlNet maps follow them)."""
    page.fill(f"#{tab}-prompt textarea", prompt)
    for field, value in (("seed", seed), ("batch-size", batch_size)):
        box = page.locator(f"#{tab}-{field} input[type='number']")
        box.fill(str(value))
        box.press("Enter")
    page.click(f"#{tab}-generate")
    page.wait_for_function(f"document.querySelector('#{tab}-status').innerText.startsWith('Done')")
    page.wait_for_function(f"document.querySelectorAll('#{tab}-gallery img').length === {batch_size + maps}")
    page.wait_for_timeout(500)  # let the gallery's images finish loading
    return [page.locator(f"#{tab}-gallery img").nth(i).get_attribute("src") for i in range(batch_size)]


def test_the_ui_refuses_a_path_that_was_not_uploaded(ui, tmp_path):
    """A script in the page names a file on the server's disk as the PNG-info input: refused, never served."""
    page, _ = ui
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret, pnginfo=png_info("secret prompt\nSteps: 1, Seed: 1, Size: 8x8"))
    answer = page.evaluate(
        """async (path) => {
            const body = JSON.stringify({data: [{path, meta: {_type: "gradio.FileData"}}]});
            const started = await fetch("/gradio_api/call/read_png_info",
                                        {method: "POST", headers: {"Content-Type": "application/json"}, body});
            const {event_id} = await started.json();
            return await (await fetch(`/gradio_api/call/read_png_info/${event_id}`)).text();
        }""",
        str(secret),
    )
    assert "event: error" in answer and "not uploaded by a user" in answer
    assert "secret prompt" not in answer
    served = page.request.get(f"{page.url.rstrip('/')}/gradio_api/file={secret}")
    assert served.status in (403, 404)


@pytest.fixture(scope="module")
def controlnet_ui(ui, tmp_path_factory):
    """A page (of `ui`'s browser: one Playwright per process) of a server whose --controlnet-dir holds one tiny
    random ControlNet."""
    from support.controlnet import make_tiny_controlnet

    folder = tmp_path_factory.mktemp("controlnets")
    make_tiny_controlnet(1).save_pretrained(folder / "control_sketch")
    with serve(create_app(tiny_pipeline(controlnet_dir=folder))) as url:
        page = ui[0].context.browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(30_000)
        page.goto(url + "/")
        yield page
        page.close()


def test_controlnet_panel_sketch_preview_and_generate(controlnet_ui):
    """Draw a stroke on the pad, preview its map, generate with the unit: the infotext names it and the gallery
    shows its map after the image. LDM_UI_SCREENSHOT=docs/ui.png also writes docs/ui-controlnet.png."""
    page = controlnet_ui
    unit = "#txt2img-controlnet-0"
    open_controlnet_panel(page)
    page.click(f"{unit}-image button[aria-label='Brush']")
    canvas = page.locator(f"{unit}-image canvas").first.bounding_box()
    middle_x, middle_y = canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2
    page.mouse.move(middle_x - 100, middle_y - 60)
    page.mouse.down()
    for step in range(1, 21):  # a zigzag, in small moves as a hand draws
        page.mouse.move(middle_x - 100 + 10 * step, middle_y - 60 + (40 if step % 4 < 2 else -20) + 3 * step)
    page.mouse.up()

    page.click(f"{unit}-preview")
    page.wait_for_selector(f"{unit}-map img")
    control_map = Image.open(io.BytesIO(page.request.get(page.get_attribute(f"{unit}-map img", "src")).body()))
    pixels = np.asarray(control_map.convert("L"))
    assert pixels.shape == (CANVAS, CANVAS)  # "invert" runs on the pad's composite as it is
    drawn = pixels > 127  # the stroke, now white on black
    assert 0.002 < drawn.mean() < 0.2 and pixels[0, 0] == 0

    page.check(f"{unit}-enable input[type='checkbox']")
    page.fill("#txt2img-prompt textarea", "a scribbled cat")
    steps = page.locator("input[aria-label='number input for Steps']").first
    steps.fill("3")
    steps.press("Enter")
    page.click("#txt2img-generate")
    page.wait_for_function("document.querySelector('#txt2img-status').innerText.startsWith('Done')")
    parameters = page.input_value("#txt2img-parameters textarea")
    assert 'ControlNet 0: "Module: invert, Model: control_sketch [' in parameters
    page.wait_for_function("document.querySelectorAll('#txt2img-gallery img').length === 2")  # the image, its map
    if os.environ.get("LDM_UI_SCREENSHOT"):
        root, extension = os.path.splitext(os.environ["LDM_UI_SCREENSHOT"])
        page.wait_for_timeout(500)  # let the gallery's images finish loading
        page.screenshot(path=f"{root}-controlnet{extension}", full_page=True)


def test_controlnet_preprocessor_shows_its_own_sliders(controlnet_ui):
    page = controlnet_ui
    unit = "#txt2img-controlnet-1"
    open_controlnet_panel(page)
    page.click("#txt2img-controlnet button[role='tab']:has-text('Unit 1')")
    assert not page.is_visible(f"{unit}-threshold-a")  # "invert" has no parameters
    page.click(f"{unit}-module input")
    page.click("ul[role='listbox'] li:has-text('canny')")
    page.wait_for_selector(f"{unit}-threshold-a:has-text('Canny Low Threshold')")
    assert page.input_value(f"{unit}-threshold-a input[type='number']") == "100"
    assert page.input_value(f"{unit}-threshold-b input[type='number']") == "200"
    assert page.is_visible(f"{unit}-res")


def open_controlnet_panel(page):
    if not page.is_visible("#txt2img-controlnet-0-enable"):
        page.click("#txt2img-controlnet button")  # the accordion opens


def test_a_star_drawn_on_the_pad_becomes_a_star_with_the_shipped_controlnet(ui):
    """The shipped model's server lists its own ControlNet with no option; a star drawn with the mouse and the empty
    prompt gives an image whose edges follow the drawing (edge F1 within 2 px, against the map the gallery shows).
    LDM_UI_SCREENSHOT=docs/ui.png also writes docs/ui-controlnet-shipped.png."""
    pytest.importorskip("cv2")
    from ldmkit.eval.controlnet import canny_edges, edge_f1

    with serve(create_app(Pipeline.from_pretrained(None, device="cpu"))) as url:
        page = ui[0].context.browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(url + "/")
        unit = "#txt2img-controlnet-0"
        open_controlnet_panel(page)
        page.click(f"{unit}-model input")
        page.click("ul[role='listbox'] li:has-text('emoji-lines')")  # the model folder's own, listed unasked
        page.click(f"{unit}-image button[aria-label='Brush']")
        box = page.locator(f"{unit}-image canvas").first.bounding_box()
        centre_x, centre_y, radius = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, box["height"] * 0.35
        angles = -np.pi / 2 + np.arange(11) * np.pi / 5  # a five-pointed star, closed
        radii = np.where(np.arange(11) % 2 == 0, radius, radius * 0.4)
        corners = [(centre_x + r * np.cos(a), centre_y + r * np.sin(a)) for r, a in zip(radii, angles)]
        page.mouse.move(*corners[0])
        page.mouse.down()
        for (x0, y0), (x1, y1) in zip(corners, corners[1:]):
            for t in np.linspace(0.1, 1.0, 10):  # in small moves, as a hand draws
                page.mouse.move(x0 + t * (x1 - x0), y0 + t * (y1 - y0))
        page.mouse.up()
        page.check(f"{unit}-enable input[type='checkbox']")
        generated = generate_for_screenshot(page, "txt2img", "", seed=1, batch_size=2, maps=1)
        if os.environ.get("LDM_UI_SCREENSHOT"):
            root, extension = os.path.splitext(os.environ["LDM_UI_SCREENSHOT"])
            page.screenshot(path=f"{root}-controlnet-shipped{extension}", full_page=True)
        control_map = page.locator("#txt2img-gallery img").nth(2).get_attribute("src")
        drawing = np.asarray(Image.open(io.BytesIO(page.request.get(control_map).body())).convert("L")) > 127
        for src in generated:
            image = Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")
            assert image.size == (drawing.shape[1], drawing.shape[0])
            assert edge_f1(canny_edges(image), drawing, 2)["f1"] > 0.5
        page.close()
