"""The web UI (Gradio): txt2img (with hires fix), img2img and inpaint tabs with live intermediates and an X/Y/Z plot,
a gallery that keeps parameters, PNG info.

Generation goes through the same queue as the HTTP APIs. The event handler is an async generator:
it submits a job, then yields a cheap preview of the predicted clean image whenever the worker has
taken a new step, then the final images. The Cancel button cancels the job in the queue, and the
handler ends on "Cancelled."; a browser that leaves has Gradio cancel the task at its await, and the
`finally` hands the job's place back.
"""

from __future__ import annotations

import asyncio

import gradio as gr

from ldmkit.metadata import PARAMETERS_KEY, parse_infotext
from ldmkit.params import MAX_HIRES_SCALE, MAX_MASK_BLUR, GenerationParams, HiresFix
from ldmkit.previews import make_grid, preview_images
from ldmkit.samplers import DEFAULT_SAMPLER, DEFAULT_SCHEDULE_TYPE, SAMPLERS, get_sampler
from ldmkit.schedules import SCHEDULE_TYPES
from ldmkit.server.a1111 import mask_from_image
from ldmkit.server.imaging import decode_image
from ldmkit.server.queue import Cancelled, GenerationQueue, Job, as_asyncio
from ldmkit.server.ui_controlnet import ControlNetPanel, controlnet_panel
from ldmkit.server.ui_errors import user_error as _user_error
from ldmkit.server.ui_options import advanced_kwargs, advanced_panel, hires_pass_inputs, hires_pass_kwargs
from ldmkit.server.ui_xyz import xyz_panel
from ldmkit.styles import StyleLibrary
from ldmkit.xyz import PlotResult

POLL_SECONDS = 0.1  # how often the page may get a new preview

# Previews fill their box whatever the model's size; latent previews are blocky, so keep them crisp.
CSS = ".ldm-preview img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


def mount_ui(app, queue: GenerationQueue) -> gr.Blocks:
    """Serve the UI at / of `app` (whose lifespan owns the UI's file cache, ldmkit.server.ui_files)."""
    demo = build_ui(queue, app.state.styles)
    gr.mount_gradio_app(
        app,
        demo,
        path="/",
        max_file_size=queue.limits.max_body_bytes,
        ssr_mode=False,
        footer_links=["api"],
        css=CSS,
    )
    # Gradio accepts a file input only if a user uploaded it, but checks that only for Blocks that
    # `launch()` started: mounted ones never are, so any path on disk would be copied into the cache
    # and served back (/etc/passwd through the PNG info tab). Mark the Blocks started so the check runs.
    demo.has_launched = True
    return demo


def build_ui(queue: GenerationQueue, styles: StyleLibrary | None = None) -> gr.Blocks:
    styles = styles or StyleLibrary()
    with gr.Blocks(title="ldmkit", analytics_enabled=False) as demo:
        gr.Markdown(f"### ldmkit · model: `{queue.pipe.model_name}`")
        for mode in MODES:
            with gr.Tab(mode, id=mode):
                _generation_tab(queue, mode, styles)
        with gr.Tab("PNG info", id="png-info"):
            _png_info_tab(queue.limits.max_input_pixels)
    return demo


MODES = ("txt2img", "img2img", "inpaint")
CONTROLNET_MODES = ("txt2img", "img2img", "inpaint")  # the tabs with a ControlNet panel
HIRES_UPSCALERS = {"Latent": "latent", "Lanczos": "pixel"}  # A1111's names for ldmkit's two; models by their own


def _generation_tab(queue: GenerationQueue, mode: str, styles: StyleLibrary) -> None:
    size, guidance = queue.pipe.default_size, queue.pipe.default_guidance  # the served model's own
    fields: dict[str, gr.components.Component] = {}  # the handler's inputs, by name
    with gr.Row():
        with gr.Column(scale=2):
            fields["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id=f"{mode}-prompt")
            fields["negative"] = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{mode}-negative")
            if styles.names():  # the styles file's (ldm serve --styles), applied in the order picked
                fields["styles"] = gr.Dropdown(
                    styles.names(), value=[], multiselect=True, label="Styles", elem_id=f"{mode}-styles"
                )
            if mode != "txt2img":
                with gr.Row():
                    fields["init_image"] = _upload("Init image", f"{mode}-init")
                    if mode == "inpaint":
                        fields["mask"] = _upload("Mask (white = repaint)", "inpaint-mask")
                with gr.Row():
                    strength = 1.0 if mode == "inpaint" else 0.75
                    fields["strength"] = gr.Slider(
                        0.0, 1.0, value=strength, step=0.01, label="Denoising strength", elem_id=f"{mode}-strength"
                    )
                    if mode == "inpaint":
                        fields["mask_blur"] = gr.Slider(
                            0, MAX_MASK_BLUR, value=4, step=1, label="Mask blur", elem_id="inpaint-mask-blur"
                        )
            with gr.Row():
                fields["sampler"] = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler")
                fields["schedule_type"] = gr.Dropdown(
                    list(SCHEDULE_TYPES), value=DEFAULT_SCHEDULE_TYPE, label="Schedule type", elem_id=f"{mode}-schedule"
                )
                fields["steps"] = gr.Slider(1, 150, value=25, step=1, label="Steps")
            with gr.Row():
                fields["width"] = gr.Slider(8, 2048, value=size, step=8, label="Width", elem_id=f"{mode}-width")
                fields["height"] = gr.Slider(8, 2048, value=size, step=8, label="Height", elem_id=f"{mode}-height")
            with gr.Row():
                fields["guidance"] = gr.Slider(
                    0.0, 30.0, value=guidance, step=0.5, label="CFG scale", elem_id=f"{mode}-cfg-scale"
                )
                fields["seed"] = gr.Number(
                    value=-1, precision=0, label="Seed (-1: random)", scale=2, elem_id=f"{mode}-seed"
                )
                random_seed = gr.Button("Random seed", scale=1, min_width=80)
            with gr.Row():
                fields["batch_size"] = gr.Slider(
                    1, 8, value=1, step=1, label="Batch size", elem_id=f"{mode}-batch-size"
                )
                fields["n_iter"] = gr.Slider(1, 16, value=1, step=1, label="Batch count")
                layers = queue.pipe.max_clip_skip
                fields["clip_skip"] = gr.Slider(
                    1, layers, value=1, step=1, label="Clip skip", elem_id=f"{mode}-clip-skip"
                )
            if mode == "txt2img":
                with gr.Accordion("Hires fix", open=False, elem_id="txt2img-hires"):
                    fields["hires"] = gr.Checkbox(
                        label="Enable: generate at the size above, upscale, then repaint details",
                        elem_id="txt2img-hires-enable",
                    )
                    with gr.Row():
                        fields["hires_scale"] = gr.Slider(
                            1.05,
                            MAX_HIRES_SCALE,
                            value=2.0,
                            step=0.05,
                            label="Upscale by",
                            elem_id="txt2img-hires-scale",
                        )
                        fields["hires_strength"] = gr.Slider(
                            0.01,
                            1.0,
                            value=0.7,
                            step=0.01,
                            label="Denoising strength",
                            elem_id="txt2img-hires-strength",
                        )
                    with gr.Row():
                        fields["hires_steps"] = gr.Slider(
                            0, 150, value=0, step=1, label="Hires steps (0: same as Steps)"
                        )
                        fields["hires_upscaler"] = gr.Dropdown(
                            [*HIRES_UPSCALERS, *(i.name for i in queue.pipe.upscalers.entries() if i.is_model)],
                            value="Latent",
                            label="Upscaler",
                        )
                    hires_pass_inputs(fields)
            advanced_panel(mode, fields, queue.pipe.vaes.names())
            xyz = xyz_panel(mode)
            fields.update(xyz.inputs)
        with gr.Column(scale=3):
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id=f"{mode}-generate")
                cancel = gr.Button("Cancel", variant="stop", elem_id=f"{mode}-cancel")
            status = gr.Markdown("Ready.", elem_id=f"{mode}-status")
            with gr.Row(equal_height=True):
                preview = gr.Image(
                    label="Live preview",
                    format="png",
                    interactive=False,
                    height=320,
                    elem_id=f"{mode}-preview",
                    elem_classes=["ldm-preview"],
                )
                gallery = gr.Gallery(
                    label="Images", format="png", columns=2, height=320, object_fit="contain", elem_id=f"{mode}-gallery"
                )
            parameters = gr.Textbox(
                label="Parameters of the selected image", lines=3, interactive=False, elem_id=f"{mode}-parameters"
            )
    controlnet = None
    if mode in CONTROLNET_MODES:  # full width below: the sketch pad wants room
        controlnet = controlnet_panel(queue.pipe.controlnets, mode, queue.limits.max_input_pixels)
        fields.update(controlnet.inputs)
    infotexts = gr.State([])

    running: dict[str, Job] = {}  # browser session -> its job in this tab, for the Cancel button

    max_pixels = queue.limits.max_input_pixels
    automatic_vae = None if queue.pipe.vaes.automatic is None else str(queue.pipe.vaes.automatic)

    async def run(session: gr.Request, *values, progress=gr.Progress()):  # noqa: B008 (Gradio's way)
        try:  # a request refused before it runs (bad input, an unknown LoRA, a full queue) says so in the status too
            request = await asyncio.to_thread(
                _user_error,
                lambda: _request(dict(zip(fields, values)), max_pixels, controlnet, styles, automatic_vae),
            )
            plot = _user_error(lambda: xyz.plot(dict(zip(fields, values)), request))
            job = _user_error(lambda: queue.submit(request) if plot is None else queue.submit_plot(plot))
        except gr.Error as error:
            yield {status: f"Failed: {error.message}"}
            raise
        running[session.session_hash] = job
        try:
            async for update in _watch(queue, job, progress):
                yield {preview: update[0], status: update[1]}
            result = _user_error(job.future.result)  # what only the worker finds (an unknown LoRA...) is the user's too
        except Cancelled:
            yield {status: "Cancelled."}
            return
        except gr.Error as error:
            yield {status: f"Failed: {error.message}"}
            raise
        finally:
            queue.cancel(job)  # no-op once done; frees the place if this task was cancelled
            if running.get(session.session_hash) is job:
                del running[session.session_hash]
        if isinstance(result, PlotResult):  # the grid, then each cell
            images, texts, seeds = result.outputs(include_cells=True)
            captions, maps = ["X/Y/Z plot", *(f"seed {s}" for s in seeds)], []
        else:
            images, texts, seeds = result.images, result.infotexts, result.seeds
            captions = [f"seed {s}" for s in seeds]
            # Each ControlNet unit's map follows the images, as A1111 shows them; selecting one shows the run's text.
            maps = [(image, f"ControlNet map {i}") for i, image in enumerate(result.control_maps)]
        for image, text in zip(images, texts):
            image.info[PARAMETERS_KEY] = text  # Gradio writes PNG text info into the files it serves
        yield {
            preview: images[0] if isinstance(result, PlotResult) else make_grid(images),
            gallery: list(zip(images, captions)) + maps,
            parameters: texts[0],
            infotexts: texts + [texts[0]] * len(maps),
            status: f"Done: {len(seeds)} image(s), seed(s) {', '.join(map(str, seeds))}.",
        }

    outputs = [preview, status, gallery, parameters, infotexts]
    # Our queue (not Gradio's) decides who waits: Gradio may run every session's handler at once.
    generate.click(run, list(fields.values()), outputs, concurrency_limit=None, show_progress_on=[gallery])

    # Cancel stops the job in our queue; the handler above then ends on "Cancelled." in its own stream.
    # (Gradio's `cancels=` would kill the handler instead, racing its last "Step" update to the status.)
    def cancel_job(session: gr.Request):
        if (job := running.get(session.session_hash)) is not None:
            queue.cancel(job)

    cancel.click(cancel_job, None, None, queue=False)
    random_seed.click(lambda: -1, None, fields["seed"])
    if "init_image" in fields:  # the uploaded image's size becomes the generation size, as the APIs default
        fields["init_image"].upload(
            lambda path: _image_size(path, max_pixels),
            fields["init_image"],
            [fields["width"], fields["height"]],
            api_name="_image_size",
        )
    gallery.select(_selected_infotext, infotexts, parameters)


def _upload(label: str, elem_id: str) -> gr.Image:
    return gr.Image(
        label=label, type="filepath", image_mode=None, sources=["upload", "clipboard"], height=256, elem_id=elem_id
    )


def _image_size(path: str | None, max_pixels: int):
    if path is None:
        return gr.skip(), gr.skip()
    width, height = _user_error(lambda: decode_image(path, "init image", max_pixels)).size
    return max(8, min(2048, width // 8 * 8)), max(8, min(2048, height // 8 * 8))


def _request(
    v: dict,
    max_pixels: int,
    controlnet: ControlNetPanel | None = None,
    styles: StyleLibrary | None = None,
    automatic_vae: str | None = None,
) -> GenerationParams:
    """The tab's input values -> a queue request; uploads are decoded here (off the event loop)."""
    prompt, negative_prompt = v["prompt"], v["negative"]
    if v.get("styles") and styles is not None:
        prompt, negative_prompt = styles.apply(v["styles"], prompt, negative_prompt)
    fields = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "steps": int(v["steps"]),
        "guidance": float(v["guidance"]),
        "sampler": get_sampler(v["sampler"], v["schedule_type"]).name,  # a pair it cannot run exactly is refused
        "seed": None if v["seed"] in (None, -1) else int(v["seed"]),
        "width": int(v["width"]),
        "height": int(v["height"]),
        "num_images": int(v["batch_size"]),
        "batch_count": int(v["n_iter"]),
        "clip_skip": int(v["clip_skip"]),
    }
    if "init_image" in v:
        if v["init_image"] is None:
            raise gr.Error("Upload an init image first.")
        fields["init_image"] = decode_image(v["init_image"], "init image", max_pixels).convert("RGB")
        fields["strength"] = float(v["strength"])
    if "mask" in v:
        if v["mask"] is None:
            raise gr.Error("Upload a mask too: white where the image is to be repainted.")
        fields["mask_image"] = mask_from_image(decode_image(v["mask"], "mask", max_pixels))
        fields["mask_blur"] = int(v["mask_blur"])
    if v.get("hires"):
        scale, strength, steps = float(v["hires_scale"]), float(v["hires_strength"]), int(v["hires_steps"])
        upscaler = HIRES_UPSCALERS.get(v["hires_upscaler"], v["hires_upscaler"])
        fields["hires"] = HiresFix(scale, strength, steps or None, upscaler, **hires_pass_kwargs(v))
    if controlnet is not None:
        fields["controls"] = controlnet.units(v, max_pixels)
    return GenerationParams(**fields, **advanced_kwargs(v, automatic_vae))


async def _watch(queue: GenerationQueue, job: Job, progress: gr.Progress):
    """Yield (preview image, status line) for each new step the worker took, until the job ends."""
    shown, last_position = 0, None
    finished = as_asyncio(job)
    while True:
        await asyncio.wait({finished}, timeout=POLL_SECONDS)
        step = job.step
        if step is not None and job.steps_taken > shown:
            # Even a job that ended meanwhile shows its last step once: no run goes without a preview.
            shown = job.steps_taken
            previews = await asyncio.to_thread(preview_images, queue.pipe, step, "fast")
            r = job.request
            line = f"Step {step.step + 1}/{step.total}" + (
                f", batch {job.batch + 1}/{r.batch_count}" if r.batch_count > 1 else ""
            )
            if job.plot is not None:
                line = f"Cell {job.cell + 1}/{len(job.cells)}, {line[0].lower()}{line[1:]}"
            progress(job.progress(), desc=line)
            yield make_grid(previews), f"{line}…"
        elif not job.done and (position := queue.position(job)) != last_position:
            last_position = position
            if position:
                yield None, f"Waiting: {position} request(s) ahead."
        if finished.done():
            return


def _selected_infotext(texts: list[str], event: gr.SelectData) -> str:
    return texts[event.index] if texts else ""


def _png_info_tab(max_pixels: int) -> None:
    with gr.Row():
        upload = gr.Image(
            label="PNG", type="filepath", image_mode=None, sources=["upload", "clipboard"], elem_id="png-info-image"
        )
        with gr.Column():
            text = gr.Textbox(label="Parameters", lines=5, interactive=False, elem_id="png-info-text")
            parsed = gr.JSON(label="Parsed")
    upload.change(lambda path: read_png_info(path, max_pixels), upload, [text, parsed], api_name="read_png_info")


def read_png_info(path: str | None, max_pixels: int) -> tuple[str, dict]:
    """The 'parameters' text of an uploaded image, and its fields."""
    if path is None:
        return "", {}
    infotext = _user_error(lambda: decode_image(path, "upload", max_pixels)).info.get(PARAMETERS_KEY)
    if not infotext:
        return "This image carries no generation parameters.", {}
    return infotext, parse_infotext(infotext)
