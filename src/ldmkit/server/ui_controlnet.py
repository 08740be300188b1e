"""The web UI's ControlNet panel: per unit a sketch pad (or upload), a ControlNet of --controlnet-dir, a preprocessor
with its sliders, how the unit guides, and a preview of the control map.

The panel's values become `ControlUnit`s, the same units the A1111 API builds, checked by the same
`GenerationParams.validate`; as the API, a unit names a ControlNet of the server's folder only, never a path.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
from PIL import Image

from ldmkit.control_preprocess import DEFAULT_RESOLUTION, PREPROCESSORS, RESIZE_MODES, RESOLUTION_RANGE, detect
from ldmkit.control_units import CONTROL_MODES, MAX_WEIGHT, ControlUnit
from ldmkit.controlnet import ControlNetLibrary
from ldmkit.server.imaging import decode_image
from ldmkit.server.ui_errors import user_error

UNITS = 2  # units shown per tab (the extension's UI shows 3; each costs a ControlNet call per step)
CANVAS = 512  # the sketch pad's drawing size; the map is fitted to the generation size as any image is
DEFAULT_MODULE = "invert"  # the pad draws black lines on white; ControlNets are trained on white lines on black
NO_MODELS = "No ControlNets: start the server with `--controlnet-dir DIR` to use them here."
UNIT_FIELDS = (
    "enabled", "image", "model", "module", "processor_res", "threshold_a", "threshold_b", "weight",
    "guidance_start", "guidance_end", "control_mode", "resize_mode", "pixel_perfect",
)  # fmt: skip


def control_image_input(**kwargs) -> gr.ImageEditor:
    """An ImageEditor (upload, then draw over it, or draw on the blank canvas) that hands the handler its composite
    file undecoded, so that `control_image` applies the server's max_input_pixels before any pixel is decoded.

    Gradio's ImageEditor.preprocess decodes every layer first; its method is replaced on this instance, since a
    subclass of a Gradio component makes Gradio write a .pyi stub next to the subclass's source at import.
    """
    editor = gr.ImageEditor(**kwargs)

    def composite_file(payload):
        if payload is None:
            return None
        if payload.id is not None:  # the page sent its layers as blobs ahead of the event
            blobs = editor.blob_storage.pop(payload.id, None)
            return None if blobs is None else blobs.composite
        return None if payload.composite is None else payload.composite.path

    editor.preprocess = composite_file
    return editor


@dataclass
class ControlNetPanel:
    """One tab's panel: `inputs` go into the tab's handler, `units` reads their values back."""

    library: ControlNetLibrary
    inputs: dict[str, gr.components.Component]  # "controlnet_{unit}_{field}" -> component

    def units(self, values: dict, max_pixels: int) -> tuple[ControlUnit, ...]:
        """The enabled units, as the handler's values hold them; the queue validates them."""
        units = []
        for index in range(len(self.inputs) // len(UNIT_FIELDS)):  # none when the folder had no ControlNet
            v = {field: values[f"controlnet_{index}_{field}"] for field in UNIT_FIELDS}
            if not v["enabled"]:
                continue
            if v["model"] is None:
                raise gr.Error(f"ControlNet unit {index}: pick a ControlNet model.")
            self.library.resolve_name(v["model"])  # a name of the folder; never a path from the page
            preprocessor = PREPROCESSORS.get(v["module"])
            units.append(
                ControlUnit(
                    model=v["model"],
                    image=control_image(v["image"], f"ControlNet unit {index} image", max_pixels),
                    module=v["module"],
                    weight=float(v["weight"]),
                    guidance_start=float(v["guidance_start"]),
                    guidance_end=float(v["guidance_end"]),
                    processor_res=int(v["processor_res"]),
                    threshold_a=_threshold(v["threshold_a"], preprocessor and preprocessor.slider_a),
                    threshold_b=_threshold(v["threshold_b"], preprocessor and preprocessor.slider_b),
                    resize_mode=v["resize_mode"],
                    control_mode=v["control_mode"],
                    pixel_perfect=bool(v["pixel_perfect"]),
                )
            )
        return tuple(units)


def controlnet_panel(library: ControlNetLibrary, mode: str, max_pixels: int) -> ControlNetPanel:
    """The accordion of `mode`'s tab; with no ControlNet in the folder, a note saying how to add some."""
    titles = library.titles()
    inputs: dict[str, gr.components.Component] = {}
    with gr.Accordion("ControlNet", open=False, elem_id=f"{mode}-controlnet"):
        if not titles:
            gr.Markdown(NO_MODELS, elem_id=f"{mode}-controlnet-none")
            return ControlNetPanel(library, {})
        for index in range(UNITS):
            with gr.Tab(f"Unit {index}", id=f"{mode}-controlnet-{index}"):
                unit = _unit_controls(library, titles, f"{mode}-controlnet-{index}", max_pixels)
            inputs.update({f"controlnet_{index}_{field}": component for field, component in unit.items()})
    return ControlNetPanel(library, inputs)


def _unit_controls(
    library: ControlNetLibrary, titles: list[str], prefix: str, max_pixels: int
) -> dict[str, gr.components.Component]:
    c: dict[str, gr.components.Component] = {}
    c["enabled"] = gr.Checkbox(label="Enable", elem_id=f"{prefix}-enable")
    with gr.Row():
        with gr.Column(scale=3):
            c["image"] = control_image_input(
                label="Control image: draw (brush tool), or upload and draw over it",
                type="filepath",
                image_mode=None,
                sources=("upload", "clipboard"),
                brush=gr.Brush(colors=["#000000", "#ffffff"], default_color="#000000", default_size=6),
                canvas_size=(CANVAS, CANVAS),
                layers=False,
                format="png",
                height=420,
                elem_id=f"{prefix}-image",
            )
        with gr.Column(scale=2):
            control_map = gr.Image(
                label="Control map", format="png", interactive=False, height=260, elem_id=f"{prefix}-map"
            )
            with gr.Row():
                c["model"] = gr.Dropdown(titles, value=titles[0], label="Model", elem_id=f"{prefix}-model")
                refresh = gr.Button("Refresh", elem_id=f"{prefix}-refresh", scale=0, min_width=80)
            with gr.Row():
                c["module"] = gr.Dropdown(
                    list(PREPROCESSORS), value=DEFAULT_MODULE, label="Preprocessor", elem_id=f"{prefix}-module"
                )
                preview = gr.Button("Preview map", elem_id=f"{prefix}-preview", scale=0, min_width=120)
    with gr.Row():
        low, high = RESOLUTION_RANGE
        shown = PREPROCESSORS[DEFAULT_MODULE]
        c["processor_res"] = gr.Slider(
            low,
            high,
            value=DEFAULT_RESOLUTION,
            step=8,
            label="Preprocessor resolution",
            visible=shown.has_resolution,
            elem_id=f"{prefix}-res",
        )
        for name, slider in (("threshold_a", shown.slider_a), ("threshold_b", shown.slider_b)):
            c[name] = gr.Slider(**_slider_props(slider), elem_id=f"{prefix}-{name.replace('_', '-')}")
        c["pixel_perfect"] = gr.Checkbox(label="Pixel perfect", elem_id=f"{prefix}-pixel-perfect")
    with gr.Row():
        c["weight"] = gr.Slider(
            0.0, MAX_WEIGHT, value=1.0, step=0.05, label="Control weight", elem_id=f"{prefix}-weight"
        )
        c["guidance_start"] = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Starting control step")
        c["guidance_end"] = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Ending control step")
    with gr.Row():
        c["control_mode"] = gr.Radio(list(CONTROL_MODES), value=CONTROL_MODES[0], label="Control mode")
        c["resize_mode"] = gr.Radio(list(RESIZE_MODES), value="Crop and Resize", label="Resize mode")

    sliders = [c["processor_res"], c["threshold_a"], c["threshold_b"]]
    c["module"].change(_module_sliders, c["module"], sliders, queue=False, api_visibility="private")
    refresh.click(  # the folder read again, as /controlnet/model_list?update=true reads it
        lambda current: _model_choices(library.titles(), current),
        c["model"],
        c["model"],
        api_name=f"{prefix.replace('-', '_')}_refresh",
    )
    preview.click(
        lambda image, module, res, a, b: preview_map(image, module, res, a, b, max_pixels),
        [c["image"], c["module"], *sliders],
        control_map,
        api_name=f"{prefix.replace('-', '_')}_preview",
    )
    return c


def _model_choices(titles: list[str], current: str | None):
    """The dropdown with the folder's ControlNets now, keeping the chosen one if it is still there."""
    if not titles:
        return gr.update(choices=[], value=None)
    return gr.update(choices=titles, value=current if current in titles else titles[0])


def _module_sliders(module: str):
    """The resolution and threshold sliders of `module`: shown with its labels, ranges and defaults, or hidden."""
    preprocessor = PREPROCESSORS[module]
    return [
        gr.update(visible=preprocessor.has_resolution),
        gr.update(**_slider_props(preprocessor.slider_a)),
        gr.update(**_slider_props(preprocessor.slider_b)),
    ]


def _slider_props(slider) -> dict:
    if slider is None:
        return {"visible": False}
    return {
        "visible": True,
        "label": slider.label,
        "minimum": slider.minimum,
        "maximum": slider.maximum,
        "value": slider.default,
        "step": 1,
    }


def preview_map(image, module: str, processor_res, threshold_a, threshold_b, max_pixels: int) -> Image.Image:
    """The control map `module` makes of the pad's image (before it is fitted to the generation size)."""
    picture = control_image(image, "control image", max_pixels)
    if picture is None:
        raise gr.Error("Draw or upload a control image first.")
    preprocessor = PREPROCESSORS.get(module)
    a = _threshold(threshold_a, preprocessor and preprocessor.slider_a)
    b = _threshold(threshold_b, preprocessor and preprocessor.slider_b)
    return Image.fromarray(user_error(lambda: detect(picture, module, int(processor_res), a, b)))


def control_image(data, what: str, max_pixels: int) -> Image.Image | None:
    """The pad's composite, on white where nothing was drawn; None for a pad left empty (img2img then uses its init
    image, as A1111 does)."""
    if data is None:
        return None
    image = user_error(lambda: decode_image(data, what, max_pixels))
    if image.has_transparency_data:
        image = image.convert("RGBA")
        if image.getchannel("A").getextrema()[1] == 0:
            return None  # nothing drawn, nothing uploaded
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
    return image.convert("RGB")


def _threshold(value, slider) -> float | None:
    """A slider's value for a module that has that slider; None (its default) for one that has not."""
    return None if slider is None or value is None else float(value)
