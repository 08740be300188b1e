"""The web UI (Gradio): txt2img and img2img tabs with live intermediates, a gallery that keeps parameters, PNG info.

Generation goes through the same queue as the HTTP APIs. The event handler is an async generator:
it submits a job, then yields a cheap preview of the predicted clean image whenever the worker has
taken a new step, then the final images. Cancelling the event (the Cancel button, or the browser
leaving) cancels the task at its await, and the `finally` hands the job's place back.
"""

from __future__ import annotations

import asyncio

import gradio as gr

from ldmkit.errors import LdmError
from ldmkit.metadata import PARAMETERS_KEY, parse_infotext
from ldmkit.previews import make_grid, preview_images
from ldmkit.samplers import DEFAULT_SAMPLER, SAMPLERS
from ldmkit.server.imaging import decode_image
from ldmkit.server.queue import Cancelled, GenerationQueue, GenerationRequest, Job, QueueFull, as_asyncio

POLL_SECONDS = 0.1  # how often the page may get a new preview

# Previews fill their box whatever the model's size; latent previews are blocky, so keep them crisp.
CSS = ".ldm-preview img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


def build_ui(queue: GenerationQueue) -> gr.Blocks:
    with gr.Blocks(title="ldmkit", analytics_enabled=False) as demo:
        gr.Markdown(f"### ldmkit · model: `{queue.pipe.model_name}`")
        with gr.Tab("txt2img", id="txt2img"):
            _generation_tab(queue, img2img=False)
        with gr.Tab("img2img", id="img2img"):
            _generation_tab(queue, img2img=True)
        with gr.Tab("PNG info", id="png-info"):
            _png_info_tab()
    return demo


def _generation_tab(queue: GenerationQueue, img2img: bool) -> None:
    name = "img2img" if img2img else "txt2img"
    size = queue.pipe.default_size
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id=f"{name}-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{name}-negative")
            extra = []
            if img2img:
                init_image = gr.Image(label="Init image", type="filepath", image_mode=None, sources=["upload", "clipboard"], height=256, elem_id="img2img-init")
                strength = gr.Slider(0.0, 1.0, value=0.75, step=0.01, label="Denoising strength", elem_id="img2img-strength")
                extra = [init_image, strength]
            with gr.Row():
                sampler = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler")
                steps = gr.Slider(1, 150, value=25, step=1, label="Steps")
            with gr.Row():
                width = gr.Slider(8, 2048, value=size, step=8, label="Width")
                height = gr.Slider(8, 2048, value=size, step=8, label="Height")
            with gr.Row():
                guidance = gr.Slider(0.0, 30.0, value=7.5, step=0.5, label="CFG scale")
                seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", scale=2)
                random_seed = gr.Button("Random seed", scale=1, min_width=80)
            with gr.Row():
                batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size")
                n_iter = gr.Slider(1, 16, value=1, step=1, label="Batch count")
        with gr.Column(scale=3):
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id=f"{name}-generate")
                cancel = gr.Button("Cancel", variant="stop", elem_id=f"{name}-cancel")
            status = gr.Markdown("Ready.", elem_id=f"{name}-status")
            with gr.Row(equal_height=True):
                preview = gr.Image(label="Live preview", format="png", interactive=False, height=320, elem_id=f"{name}-preview", elem_classes=["ldm-preview"])
                gallery = gr.Gallery(label="Images", format="png", columns=2, height=320, object_fit="contain", elem_id=f"{name}-gallery")
            parameters = gr.Textbox(label="Parameters of the selected image", lines=3, interactive=False, elem_id=f"{name}-parameters")
    infotexts = gr.State([])

    async def run(prompt, negative, sampler, steps, guidance, seed, width, height, batch_size, n_iter, *extra, progress=gr.Progress()):
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=negative,
            steps=int(steps),
            guidance=float(guidance),
            sampler=sampler,
            seed=None if seed in (None, -1) else int(seed),
            width=int(width),
            height=int(height),
            batch_size=int(batch_size),
            n_iter=int(n_iter),
        )
        if img2img:
            path, request.strength = extra
            if path is None:
                raise gr.Error("Upload an init image first.")
            request.init_image = await asyncio.to_thread(_user_error, lambda: decode_image(path, "init image").convert("RGB"))
        job = _user_error(lambda: queue.submit(request))
        try:
            async for update in _watch(queue, job, progress):
                yield {preview: update[0], status: update[1]}
            result = job.future.result()
        except Cancelled:
            yield {status: "Cancelled."}
            return
        finally:
            queue.cancel(job)  # no-op once done; frees the place if this task was cancelled
        for image, text in zip(result.images, result.infotexts):
            image.info[PARAMETERS_KEY] = text  # Gradio writes PNG text info into the files it serves
        seeds = ", ".join(map(str, result.seeds))
        yield {
            preview: make_grid(result.images),
            gallery: [(image, f"seed {s}") for image, s in zip(result.images, result.seeds)],
            parameters: result.infotexts[0],
            infotexts: result.infotexts,
            status: f"Done: {len(result.images)} image(s), seed(s) {seeds}.",
        }

    inputs = [prompt, negative, sampler, steps, guidance, seed, width, height, batch_size, n_iter, *extra]
    outputs = [preview, status, gallery, parameters, infotexts]
    # Our queue (not Gradio's) decides who waits: Gradio may run every session's handler at once.
    event = generate.click(run, inputs, outputs, concurrency_limit=None, show_progress_on=[gallery])
    cancel.click(lambda: "Cancelled.", None, status, cancels=[event])
    random_seed.click(lambda: -1, None, seed)
    gallery.select(_selected_infotext, infotexts, parameters)


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
            line = f"Step {step.step + 1}/{step.total}" + (f", batch {job.batch + 1}/{r.n_iter}" if r.n_iter > 1 else "")
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


def _user_error(make):
    """Run make(); a problem with the user's input becomes a Gradio error toast instead of a crash."""
    try:
        return make()
    except (LdmError, QueueFull) as exc:
        raise gr.Error(str(exc)) from None


def _png_info_tab() -> None:
    with gr.Row():
        upload = gr.Image(label="PNG", type="filepath", image_mode=None, sources=["upload", "clipboard"], elem_id="png-info-image")
        with gr.Column():
            text = gr.Textbox(label="Parameters", lines=5, interactive=False, elem_id="png-info-text")
            parsed = gr.JSON(label="Parsed")
    upload.change(read_png_info, upload, [text, parsed])


def read_png_info(path: str | None) -> tuple[str, dict]:
    """The 'parameters' text of an uploaded image, and its fields."""
    if path is None:
        return "", {}
    infotext = _user_error(lambda: decode_image(path, "upload")).info.get(PARAMETERS_KEY)
    if not infotext:
        return "This image carries no generation parameters.", {}
    return infotext, parse_infotext(infotext)
