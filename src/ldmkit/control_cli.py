"""`ldm generate --control NAME=IMAGE ...`: ControlNet units from the command line. Light to import (no torch).

Each --control starts a unit. A per-unit option given once applies to every unit; given as many times as
--control, its values go to the units in order.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldmkit.control_preprocess import PREPROCESSORS
from ldmkit.control_units import ControlUnit, parse_control_mode, parse_hr_option, parse_resize_mode
from ldmkit.errors import InvalidRequest

# option -> (ControlUnit field, argparse type, help)
PER_UNIT_OPTIONS = {
    "--control-module": (
        "module",
        str,
        f"preprocessor making the control map: {', '.join(PREPROCESSORS)} (default none)",
    ),
    "--control-weight": ("weight", float, "scale of the ControlNet's residuals, 0-2 (default 1)"),
    "--control-start": (
        "guidance_start",
        float,
        "fraction of the steps where the ControlNet starts guiding (default 0)",
    ),
    "--control-end": ("guidance_end", float, "fraction of the steps where it stops (default 1)"),
    "--control-mode": (
        "control_mode",
        str,
        "balanced, prompt (my prompt is more important) or control (ControlNet is more important)",
    ),
    "--control-resize": (
        "resize_mode",
        str,
        "fitting the map to the size: resize (stretch), crop (default) or fill (pad)",
    ),
    "--control-res": ("processor_res", int, "resolution the preprocessor works at (default 512)"),
    "--control-threshold-a": ("threshold_a", float, "the preprocessor's first parameter (canny: low threshold, 100)"),
    "--control-threshold-b": ("threshold_b", float, "its second (canny: high threshold, 200)"),
    "--control-hr": ("hr_option", str, "with --hires-scale: which passes it guides: both, low or high"),
}  # fmt: skip
_PARSERS = {"control_mode": parse_control_mode, "resize_mode": parse_resize_mode, "hr_option": parse_hr_option}


def add_control_options(parser) -> None:
    parser.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="NAME=IMAGE",
        help="guide by a ControlNet (a name in --controlnet-dir, or a path) and its control image; repeatable",
    )
    for option, (field, kind, help_text) in PER_UNIT_OPTIONS.items():
        parser.add_argument(option, action="append", type=kind, default=[], metavar=field.upper(), help=help_text)
    parser.add_argument(
        "--control-pixel-perfect", action="store_true", help="every unit: preprocessor resolution from the image size"
    )


def units_from_args(args: argparse.Namespace, load_image) -> tuple[ControlUnit, ...]:
    """The units the options describe, validated; `load_image(path, what)` reads each control image."""
    count = len(args.control)
    values: list[dict] = [{} for _ in range(count)]
    for option, (field, _, _) in PER_UNIT_OPTIONS.items():
        given = getattr(args, option.lstrip("-").replace("-", "_"))
        if not given:
            continue
        if count == 0:
            raise InvalidRequest(f"{option} needs a --control NAME=IMAGE to apply to")
        if len(given) not in (1, count):
            raise InvalidRequest(
                f"{option} is given {len(given)} times for {count} --control units: give it once or once each"
            )
        for unit, value in zip(values, given * count if len(given) == 1 else given):
            unit[field] = _PARSERS.get(field, lambda v: v)(value)
    units = []
    for index, (spec, fields) in enumerate(zip(args.control, values)):
        name, sep, image_path = spec.partition("=")
        if not sep or not name or not image_path:
            raise InvalidRequest(f"--control must look like NAME=IMAGE, got {spec!r}")
        image = load_image(Path(image_path), f"control image {index}")
        units.append(ControlUnit(model=name, image=image, pixel_perfect=args.control_pixel_perfect, **fields))
    return tuple(units)
