"""AUTOMATIC1111's X/Y/Z plot script over its API: `script_name: "x/y/z plot"` and `script_args` -> ldmkit.xyz.

script_args are the script's inputs in the order of its run() in A1111 1.10: three (type, values text, values
dropdown) triples for X, Y and Z, then draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds,
vary_seeds_x/y/z, margin_size, csv_mode. A shorter list takes the script's UI defaults for the rest, as A1111 does.
An axis type is an index into the axis options A1111 shows on that tab (txt2img or img2img) in that order; a label
("Steps") is taken too. Axis kinds ldmkit's plot lacks are refused by name.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from ldmkit.errors import InvalidRequest
from ldmkit.params import GenerationParams, is_int
from ldmkit.xyz import MAX_MARGIN, SCRIPT_TITLE, Axis, XYZPlot, axis_kind

SCRIPT_NAME = SCRIPT_TITLE.lower()  # as A1111's /scripts lists it; script_name is compared in any case
TXT2IMG, IMG2IMG = "txt2img", "img2img"

# A1111 1.10's axis options (scripts/xyz_grid.py), in order; the second item limits one to a tab.
_A1111_AXES = [
    ("Nothing", None), ("Seed", None), ("Var. seed", None), ("Var. strength", None), ("Steps", None),
    ("Hires steps", TXT2IMG), ("CFG Scale", None), ("Image CFG Scale", IMG2IMG), ("Prompt S/R", None),
    ("Prompt order", None), ("Sampler", TXT2IMG), ("Hires sampler", TXT2IMG), ("Sampler", IMG2IMG),
    ("Checkpoint name", None), ("Negative Guidance minimum sigma", None), ("Sigma Churn", None), ("Sigma min", None),
    ("Sigma max", None), ("Sigma noise", None), ("Schedule type", None), ("Schedule min sigma", None),
    ("Schedule max sigma", None), ("Schedule rho", None), ("Skip Early CFG", None), ("Beta schedule alpha", None),
    ("Beta schedule beta", None), ("Eta", None), ("Clip skip", None), ("Denoising", None),
    ("Initial noise multiplier", None), ("Extra noise", None), ("Hires upscaler", TXT2IMG),
    ("Cond. Image Mask Weight", IMG2IMG), ("VAE", None), ("Styles", None), ("UniPC Order", None),
    ("Face restore", None), ("Token merging ratio", None), ("Token merging ratio high-res", None),
    ("Always discard next-to-last sigma", None), ("SGM noise multiplier", None), ("Refiner checkpoint", None),
    ("Refiner switch at", None), ("RNG source", None), ("FP8 mode", None), ("Size", None),
]  # fmt: skip
# Those whose values A1111's UI picks from a dropdown (x_values_dropdown), unless csv_mode.
_DROPDOWN_AXES = {"Sampler", "Schedule type"}


def axis_labels(tab: str) -> list[str]:
    """The axis options A1111 shows on a tab: what an axis type indexes."""
    return [label for label, only in _A1111_AXES if only in (None, tab)]


def supported_labels(tab: str) -> list[str]:
    return [label for label in axis_labels(tab) if _kind_or_none(label) is not None]


def _kind_or_none(label: str):
    try:
        return axis_kind(label)
    except InvalidRequest:
        return None


# (name, default): the script's run() arguments after p, with its UI's defaults (X: Seed, Y and Z: Nothing).
SCRIPT_ARGS = (
    ("x_type", 1), ("x_values", ""), ("x_values_dropdown", []),
    ("y_type", 0), ("y_values", ""), ("y_values_dropdown", []),
    ("z_type", 0), ("z_values", ""), ("z_values_dropdown", []),
    ("draw_legend", True), ("include_lone_images", False), ("include_sub_grids", False), ("no_fixed_seeds", False),
    ("vary_seeds_x", False), ("vary_seeds_y", False), ("vary_seeds_z", False), ("margin_size", 0),
    ("csv_mode", False),
)  # fmt: skip
_FLAGS = ("draw_legend", "include_lone_images", "include_sub_grids", "no_fixed_seeds", "vary_seeds_x", "vary_seeds_y",
          "vary_seeds_z", "csv_mode")  # fmt: skip


def is_xyz_script(name: str | None) -> bool:
    return isinstance(name, str) and name.strip().lower() == SCRIPT_NAME


@dataclass(frozen=True)
class ScriptRequest:
    """The plot and what the answer holds besides the grid."""

    plot: XYZPlot
    include_sub_grids: bool
    include_cells: bool


def plot_from_script_args(script_args: list, tab: str, base: GenerationParams) -> ScriptRequest:
    """A1111's script_args for its X/Y/Z plot -> the plot; every value checked, every unsupported one refused."""
    if not isinstance(script_args, list):
        raise InvalidRequest(f"script_args must be a list, got {type(script_args).__name__}")
    if len(script_args) > len(SCRIPT_ARGS):
        raise InvalidRequest(
            f"script_args for x/y/z plot take at most {len(SCRIPT_ARGS)} values (A1111 1.10's), got {len(script_args)}"
        )
    args = {name: default for name, default in SCRIPT_ARGS}
    args.update(zip([name for name, _ in SCRIPT_ARGS], script_args))
    for position, name in enumerate(name for name, _ in SCRIPT_ARGS):
        if name in _FLAGS and not isinstance(args[name], bool):
            raise InvalidRequest(f"script_args[{position}] ({name}) must be true or false, got {args[name]!r}")
    margin = args["margin_size"]
    if not is_int(margin) or not 0 <= margin <= MAX_MARGIN:
        raise InvalidRequest(f"script_args[16] (margin_size) must be an integer from 0 to {MAX_MARGIN}, got {margin!r}")
    x, y, z = (_axis(args, letter, tab) for letter in "xyz")
    plot = XYZPlot(
        base,
        x,
        y,
        z,
        draw_legend=args["draw_legend"],
        margin=margin,
        fixed_seeds=not args["no_fixed_seeds"],
        vary_seeds=(args["vary_seeds_x"], args["vary_seeds_y"], args["vary_seeds_z"]),
    )
    plot.check()
    return ScriptRequest(plot, args["include_sub_grids"], args["include_lone_images"])


def _axis(args: dict, letter: str, tab: str) -> Axis:
    position = "xyz".index(letter) * 3
    axis_type = args[f"{letter}_type"]
    labels = axis_labels(tab)
    if is_int(axis_type) and 0 <= axis_type < len(labels):
        label = labels[axis_type]
    elif isinstance(axis_type, str) and axis_type.strip().lower() in (lab.lower() for lab in labels):
        label = next(lab for lab in labels if lab.lower() == axis_type.strip().lower())
    else:
        raise InvalidRequest(
            f"script_args[{position}] ({letter}_type) must be an axis index from 0 to {len(labels) - 1} of A1111's "
            f"{tab} list or its label, got {axis_type!r}"
        )
    kind = _kind_or_none(label)
    if kind is None:
        raise InvalidRequest(
            f"script_args[{position}] ({letter}_type) = {axis_type!r} is A1111's {label!r} axis, which ldmkit's "
            f"X/Y/Z plot does not support; it supports: {', '.join(supported_labels(tab)[1:])}"
        )
    text, dropdown = args[f"{letter}_values"], args[f"{letter}_values_dropdown"]
    if not isinstance(text, str):
        raise InvalidRequest(f"script_args[{position + 1}] ({letter}_values) must be text, got {text!r}")
    if not (isinstance(dropdown, list) and all(isinstance(v, str) for v in dropdown)):
        raise InvalidRequest(f"script_args[{position + 2}] ({letter}_values_dropdown) must be a list of texts")
    if label in _DROPDOWN_AXES and not args["csv_mode"] and dropdown:
        text = _csv_line(dropdown)  # A1111 reads the dropdown's choices for these, unless csv_mode
    return Axis.parse(kind, text)


def _csv_line(values: list[str]) -> str:
    with io.StringIO() as line:
        csv.writer(line).writerow(values)
        return line.getvalue().strip()


def script_info() -> list[dict]:
    """GET /sdapi/v1/script-info: the script's arguments as A1111 describes them, for each tab."""
    return [
        {
            "name": SCRIPT_NAME,
            "is_alwayson": False,
            "is_img2img": tab == IMG2IMG,
            "args": [_arg_info(name, default, tab) for name, default in SCRIPT_ARGS],
        }
        for tab in (TXT2IMG, IMG2IMG)
    ]


def _arg_info(name: str, default, tab: str) -> dict:
    info = {"label": name, "value": default, "minimum": None, "maximum": None, "step": None, "choices": None}
    if name.endswith("_type"):  # an index into these; ldmkit runs supported_labels(tab) of them
        info["choices"] = axis_labels(tab)
    elif name == "margin_size":
        info.update(minimum=0, maximum=MAX_MARGIN, step=2)
    return info
