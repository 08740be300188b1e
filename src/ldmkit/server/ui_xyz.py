"""The web UI's X/Y/Z plot accordion: an axis type and its values for X, Y and Z (ldmkit.xyz); with any axis set,
the tab's request becomes the plot's base and the gallery shows the grid, then each cell."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ldmkit.params import GenerationParams
from ldmkit.xyz import AXIS_KINDS, NOTHING, Axis, XYZPlot

AXIS_CHOICES = [kind.label for kind in AXIS_KINDS]  # A1111's labels: "Nothing", "Seed", "Steps", ...


@dataclass
class XYZPanel:
    inputs: dict[str, gr.components.Component]  # "xyz_{letter}_type" / "xyz_{letter}_values" -> component

    def plot(self, values: dict, base: GenerationParams) -> XYZPlot | None:
        """The plot the panel describes over `base`, or None when every axis is Nothing."""
        axes = [
            Axis.parse(values[f"xyz_{letter}_type"], values[f"xyz_{letter}_values"] or "")
            if values[f"xyz_{letter}_type"] != NOTHING.label
            else Axis()
            for letter in "xyz"
        ]
        if all(axis.is_nothing for axis in axes):
            return None
        return XYZPlot(base, *axes)


def xyz_panel(mode: str) -> XYZPanel:
    inputs = {}
    with gr.Accordion("X/Y/Z plot", open=False, elem_id=f"{mode}-xyz"):
        for letter in "xyz":
            with gr.Row():
                inputs[f"xyz_{letter}_type"] = gr.Dropdown(
                    AXIS_CHOICES, value=NOTHING.label, label=f"{letter.upper()} type", elem_id=f"{mode}-xyz-{letter}"
                )
                inputs[f"xyz_{letter}_values"] = gr.Textbox(
                    label=f"{letter.upper()} values",
                    placeholder="10, 20, 30 or a range: 1-10 (+2), 1-10 [4]",
                    scale=3,
                    elem_id=f"{mode}-xyz-{letter}-values",
                )
    return XYZPanel(inputs)
