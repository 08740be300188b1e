"""`ldm generate --x AXIS=VALUES [--y ...] [--z ...]`: an X/Y/Z plot of the request (ldmkit.xyz), written as one
labelled grid PNG (and, with --save-cells, each cell's image)."""

from __future__ import annotations

import dataclasses
import sys

from ldmkit.errors import InvalidRequest, LdmError


def add_xyz_options(parser) -> None:
    group = parser.add_argument_group("X/Y/Z plot (docs/xyz.md)")
    for letter, where in (("x", "columns"), ("y", "rows"), ("z", "one grid per value, side by side")):
        group.add_argument(
            f"--{letter}",
            default=None,
            metavar="AXIS=VALUES",
            help=f"vary AXIS over VALUES ({where}): seed, steps, cfg, sampler, scheduler, prompt_sr, denoising, "
            "clip_skip, size, hires_steps; VALUES a comma list or a range '1-5', '1-10 (+2)', '1-10 [4]'"
            if letter == "x"
            else f"as --x, for the {where}",
        )
    group.add_argument("--save-cells", action="store_true", help="with --x/--y/--z: also write each cell's image")
    group.add_argument("--no-legend", action="store_true", help="with --x/--y/--z: no labels around the grid")
    group.add_argument("--grid-margin", type=int, default=0, metavar="PX", help="px between the grid's cells")
    group.add_argument(
        "--vary-seeds", default="", metavar="AXES", help="e.g. 'x' or 'xz': a cell's seed + its index along them"
    )


def wants_plot(args) -> bool:
    return any(getattr(args, letter) is not None for letter in "xyz")


def plot_from_args(args, requests: list):
    """The plot the options describe, checked (every cell too) before any model loads."""
    from ldmkit.xyz import Axis, XYZPlot

    if len(requests) != 1:
        raise InvalidRequest("an X/Y/Z plot takes one prompt, not --prompts (use a prompt_sr axis to vary it)")
    if args.save_intermediates:
        raise InvalidRequest("--save-intermediates is not supported with --x/--y/--z")
    unknown = set(args.vary_seeds.lower()) - set("xyz")
    if unknown:
        raise InvalidRequest(f"--vary-seeds takes the letters x, y, z, got {args.vary_seeds!r}")
    axes = {}
    for letter in "xyz":
        option = getattr(args, letter)
        if option is None:
            axes[letter] = Axis()
            continue
        kind, equals, values = option.partition("=")
        if not equals:
            raise InvalidRequest(f"--{letter} must be AXIS=VALUES, e.g. steps=10,20; got {option!r}")
        axes[letter] = Axis.parse(kind, values)
    plot = XYZPlot(
        requests[0],
        **axes,
        draw_legend=not args.no_legend,
        margin=args.grid_margin,
        vary_seeds=tuple(letter in args.vary_seeds.lower() for letter in "xyz"),
    )
    for cell in plot.cells():
        cell.validate()
    return plot


def run_xyz(args, plot, stop, written_note) -> int:
    """Load the model, run the cells, write the grid (and the cells): each file whole, listed as it is written.

    `stop` and `written_note` are `ldm generate`'s (ldmkit.cli): its Ctrl-C handling and its note of the files
    written when a run ends early."""
    from tqdm import tqdm

    from ldmkit.cli_options import load_pipelines
    from ldmkit.distributed import launched_world_size
    from ldmkit.metadata import save_png
    from ldmkit.xyz import prepare_cells, run_plot

    if launched_world_size() > 1:
        raise InvalidRequest("the X/Y/Z plot runs in one process: start it without torchrun/accelerate launch")
    pipe, refiner = load_pipelines(args, args.device)
    if refiner is not None:
        plot = dataclasses.replace(plot, base=dataclasses.replace(plot.base, refiner=refiner))
    plot, cells = prepare_cells(pipe, plot)
    bar = None if args.quiet else tqdm(total=len(cells), unit="cell", leave=False)

    def on_cell(index: int, count: int) -> None:
        if bar is not None:
            bar.update(index - bar.n)

    try:
        with stop.installed():
            result = run_plot(pipe, plot, should_stop=stop, on_cell=on_cell, prepared=cells)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(written_note([])) from None
    finally:
        if bar is not None:
            bar.close()
    written = []
    try:
        written.append(save_png(result.grid, args.output_dir, lambda i: f"{i:05d}-xyz-grid.png", result.grid_infotext))
        print(written[-1], flush=True)
        if args.save_cells:
            for cell in result.cells:
                image, seed, infotext = cell.images[0], cell.seeds[0], cell.infotexts[0]
                written.append(save_png(image, args.output_dir, lambda i, s=seed: f"{i:05d}-{s}.png", infotext))
                print(written[-1], flush=True)
    except LdmError as exc:
        raise LdmError(f"{exc}; {written_note(written)}") from None
    print(f"ldm: X/Y/Z plot of {'x'.join(map(str, plot.shape))} cells", file=sys.stderr)
    return 0
