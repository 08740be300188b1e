"""X/Y/Z plot: one request varied along up to three axes, run cell by cell and laid out as a labelled grid.

An axis is a kind (steps, sampler, prompt S/R, ...) and its values, written as AUTOMATIC1111's X/Y/Z plot script
takes them: a comma-separated list (CSV: quote a value that holds a comma) and, for numeric kinds, ranges:
"1-5" (1, 2, 3, 4, 5), "1-10 (+3)" (a step: 1, 4, 7, 10), "1-10 [4]" (a count, evenly spaced: 1, 4, 7, 10).
Cell (ix, iy, iz) is the base request with each axis's value applied; the cells run X fastest, then Y, then Z, one
request at a time. The grid has one row per Y value, one column per X value, X labels on top and Y labels on the
left; with a Z axis, one such grid per Z value, titled, side by side.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from ldmkit.errors import InvalidRequest
from ldmkit.metadata import append_params
from ldmkit.params import MAX_SEED, GenerationParams, is_int, random_seed

MAX_CELLS = 1000  # cells in one plot outside a server (a server's limit, max_grid_cells, is lower)
MAX_GRID_PIXELS = 200_000_000  # the assembled grid, before its labels: A1111's default img_max_size_mp (200)
MAX_MARGIN = 500  # px between cells: A1111's slider maximum
SCRIPT_TITLE = "X/Y/Z plot"  # A1111's script_name (compared in any case)


# -- axis kinds -----------------------------------------------------------------------------------------------------


def _set(field: str):
    def apply(fields: dict, value, values) -> None:
        fields[field] = value

    return apply


def _prompt_sr(fields: dict, value: str, values: tuple) -> None:
    """A1111's Prompt S/R: the first value is the text searched for; each value replaces it, in both prompts."""
    search = values[0]
    fields["prompt"] = fields["prompt"].replace(search, value)
    fields["negative_prompt"] = fields["negative_prompt"].replace(search, value)


def _denoising(fields: dict, value: float, values) -> None:
    """img2img's strength, or the hires fix's second pass (as A1111's 'Denoising' sets denoising_strength)."""
    if fields["init_image"] is not None:
        fields["strength"] = value
    elif fields["hires"] is not None:
        fields["hires"] = dataclasses.replace(fields["hires"], strength=value)
    else:
        raise InvalidRequest("the Denoising axis needs an init image (img2img) or the hires fix")


def _hires_steps(fields: dict, value: int, values) -> None:
    if fields["hires"] is None:
        raise InvalidRequest("the Hires steps axis needs the hires fix")
    fields["hires"] = dataclasses.replace(fields["hires"], steps=value)


def _size(fields: dict, value: tuple[int, int], values) -> None:
    fields["width"], fields["height"] = value


def _parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if match is None:
        raise InvalidRequest(f"size {text!r} must look like 512x768")
    return int(match.group(1)), int(match.group(2))


def _format_size(value: tuple[int, int]) -> str:
    return f"{value[0]}x{value[1]}"


def _check_samplers(values: tuple) -> None:
    from ldmkit.samplers import get_sampler  # imports diffusers

    for value in values:
        get_sampler(value)


def _check_schedules(values: tuple) -> None:
    from ldmkit.schedules import get_schedule_type

    for value in values:
        get_schedule_type(value)


def _check_prompt_sr(values: tuple) -> None:
    if not values[0]:
        raise InvalidRequest("Prompt S/R: the first value is the text to search for; it cannot be empty")


@dataclass(frozen=True)
class AxisKind:
    """What an axis varies: `apply` sets a cell's GenerationParams fields (a dict) to one of the axis's values."""

    name: str  # ldmkit's name (the CLI's `--x steps=...`)
    label: str  # AUTOMATIC1111's label (the grid's legend, the infotext's 'X Type')
    value_type: type  # int and float take ranges
    apply: Callable[[dict, object, tuple], None]
    aliases: tuple[str, ...] = ()
    parse: Callable[[str], object] | None = None  # for values that are not plain int/float/str
    show: Callable[[object], str] = str  # the value as the legend writes it
    check: Callable[[tuple], None] | None = None  # the whole list, before any cell is built
    labelled: bool = True  # the legend reads "Label: value" (A1111 writes bare values for some kinds)

    def legend(self, value) -> str:
        text = self.show(round(value, 8) if isinstance(value, float) else value)
        return f"{self.label}: {text}" if self.labelled else text


AXIS_KINDS = (
    AxisKind("nothing", "Nothing", str, lambda fields, value, values: None, aliases=("none",), labelled=False),
    AxisKind("seed", "Seed", int, _set("seed")),
    AxisKind("steps", "Steps", int, _set("steps")),
    AxisKind("hires_steps", "Hires steps", int, _hires_steps, aliases=("hires steps",)),
    AxisKind("cfg", "CFG Scale", float, _set("guidance"), aliases=("cfg scale", "guidance", "cfg_scale")),
    AxisKind("prompt_sr", "Prompt S/R", str, _prompt_sr, aliases=("prompt s/r", "sr"), check=_check_prompt_sr,
             labelled=False),
    AxisKind("sampler", "Sampler", str, _set("sampler"), check=_check_samplers, labelled=False),
    AxisKind("scheduler", "Schedule type", str, _set("schedule"), aliases=("schedule type", "schedule"),
             check=_check_schedules),
    AxisKind("denoising", "Denoising", float, _denoising, aliases=("strength", "denoising_strength")),
    AxisKind("clip_skip", "Clip skip", int, _set("clip_skip"), aliases=("clip skip",)),
    AxisKind("size", "Size", tuple, _size, parse=_parse_size, show=_format_size),
)  # fmt: skip
NOTHING = AXIS_KINDS[0]


def axis_kind(name: str) -> AxisKind:
    """A kind by ldmkit's name, an alias or A1111's label, in any case."""
    wanted = name.strip().lower().replace("-", "_")
    for kind in AXIS_KINDS:
        if wanted in (kind.name, kind.label.lower(), *kind.aliases):
            return kind
    names = ", ".join(kind.name for kind in AXIS_KINDS[1:])
    raise InvalidRequest(f"unknown X/Y/Z axis {name!r}; use one of: {names}")


# -- values ---------------------------------------------------------------------------------------------------------

_NUMBER = r"[+-]?\s*\d+(?:\.\d*)?"
# "START-END", optionally followed by "(+STEP)" or "[COUNT]"; the signs of START and END are their own.
_RANGE = re.compile(rf"\s*({_NUMBER})\s*-\s*({_NUMBER})\s*(?:\(\s*([+-]\s*\d+(?:\.\d*)?)\s*\)|\[\s*(\d+)\s*\])?\s*")


def split_values(text: str) -> list[str]:
    """A1111's value list: comma-separated CSV fields, each stripped (quote a value that holds a comma)."""
    try:
        rows = list(csv.reader([line for line in text.splitlines() if line.strip()], skipinitialspace=True))
    except csv.Error as exc:
        raise InvalidRequest(f"cannot read the axis values {text!r}: {exc}") from None
    return [field.strip() for row in rows for field in row]


def expand_range(text: str, value_type: type) -> list | None:
    """The values a range stands for ('1-10 (+3)', '0.5-1.5 [3]'), or None when `text` is no range."""
    match = _RANGE.fullmatch(text)
    if match is None:
        return None
    start, end = (_number(g, value_type) for g in match.group(1, 2))
    step_text, count_text = match.group(3), match.group(4)
    if count_text is not None:
        count = int(count_text)
        if not 1 <= count <= MAX_CELLS:
            raise InvalidRequest(f"range {text!r}: the count in [...] must be from 1 to {MAX_CELLS}")
        # Evenly spaced from start to end inclusive; integer axes truncate each value toward zero, as A1111 does.
        points = [round(start + (end - start) * i / (count - 1), 8) if count > 1 else start for i in range(count)]
        return [int(p) if value_type is int else p for p in points]
    step = 1 if step_text is None else _number(step_text, value_type)
    if step == 0:
        raise InvalidRequest(f"range {text!r}: the step cannot be 0")
    count = math.floor((end - start) / step + 1e-9) + 1  # start, start + step, ... up to end inclusive
    if count < 1:
        raise InvalidRequest(f"range {text!r} is empty: going from {start} to {end} needs a negative step, e.g. (-1)")
    if count > MAX_CELLS:
        raise InvalidRequest(f"range {text!r} has over {MAX_CELLS} values")
    return [start + i * step if value_type is int else round(start + i * step, 8) for i in range(count)]


def _number(text: str, value_type: type) -> int | float:
    text = text.replace(" ", "")
    if value_type is int and "." in text:
        raise InvalidRequest(f"{text!r} is not an integer")
    return value_type(text)


def parse_values(kind: AxisKind, text: str) -> tuple:
    """The axis's values from A1111's text form: a list, numeric ranges expanded; each of the kind's type."""
    if kind is NOTHING:
        return ("",)
    values = []
    for item in split_values(text):
        expanded = expand_range(item, kind.value_type) if kind.value_type in (int, float) else None
        values.extend(expanded if expanded is not None else [_one_value(kind, item)])
        if len(values) > MAX_CELLS:
            raise InvalidRequest(f"the {kind.label} axis has over {MAX_CELLS} values")
    if not values:
        raise InvalidRequest(f"the {kind.label} axis has no values")
    return tuple(values)


def _one_value(kind: AxisKind, item: str):
    if kind.parse is not None:
        return kind.parse(item)
    if kind.value_type is str:
        return item
    try:
        number = float(item)
    except ValueError:
        raise InvalidRequest(f"{kind.label} value {item!r} is not a number or a range") from None
    if kind.value_type is int:
        if not number.is_integer():
            raise InvalidRequest(f"{kind.label} value {item!r} is not an integer")
        return int(number)
    return number


@dataclass(frozen=True)
class Axis:
    kind: AxisKind = NOTHING
    values: tuple = ("",)
    text: str = ""  # as given: the infotext's 'X Values'

    @classmethod
    def parse(cls, kind: str | AxisKind, text: str) -> Axis:
        kind = kind if isinstance(kind, AxisKind) else axis_kind(kind)
        values = parse_values(kind, text)
        if kind.check is not None:
            kind.check(values)
        return cls(kind, values, text)

    @property
    def is_nothing(self) -> bool:
        return self.kind is NOTHING

    def legends(self) -> list[str]:
        return [self.kind.legend(value) for value in self.values]


# -- the plan -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class XYZPlot:
    """A request varied along X, Y and Z; `cells()` are the requests it runs, X fastest."""

    base: GenerationParams
    x: Axis = Axis()
    y: Axis = Axis()
    z: Axis = Axis()
    draw_legend: bool = True
    margin: int = 0  # px between cells (A1111's 'Grid margins')
    fixed_seeds: bool = True  # a random seed (-1) is drawn once, so every cell shares it (A1111: not 'Keep -1')
    vary_seeds: tuple[bool, bool, bool] = (False, False, False)  # cell seed += its index along X, Y, Z

    @property
    def axes(self) -> tuple[Axis, Axis, Axis]:
        return self.x, self.y, self.z

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.x.values), len(self.y.values), len(self.z.values)

    @property
    def cell_count(self) -> int:
        return math.prod(self.shape)

    def check(self) -> None:
        """The plan itself, before any cell is built: one image per cell, sizes and counts within bounds."""
        if not isinstance(self.base.prompt, str):
            raise InvalidRequest("an X/Y/Z plot takes one prompt (use a Prompt S/R axis to vary it)")
        if isinstance(self.base.seed, tuple):
            raise InvalidRequest("an X/Y/Z plot takes one seed (use a Seed axis to vary it)")
        if self.base.num_images != 1 or self.base.batch_count != 1:
            raise InvalidRequest(
                "an X/Y/Z plot makes one image per cell: batch size and batch count must be 1, got "
                f"{self.base.num_images} and {self.base.batch_count}"
            )
        kinds = [axis.kind for axis in self.axes if not axis.is_nothing]
        repeated = {kind.label for kind in kinds if kinds.count(kind) > 1}
        if repeated:
            raise InvalidRequest(f"the {', '.join(sorted(repeated))} axis is given twice")
        if self.cell_count > MAX_CELLS:
            raise InvalidRequest(f"X/Y/Z plot of {self.cell_count} cells is over the limit of {MAX_CELLS}")
        if not is_int(self.margin) or not 0 <= self.margin <= MAX_MARGIN:
            raise InvalidRequest(f"grid margin must be an integer from 0 to {MAX_MARGIN} px, got {self.margin!r}")
        for axis in self.axes:
            if axis.kind.name == "prompt_sr":
                search = axis.values[0]
                if search not in self.base.prompt and search not in self.base.negative_prompt:
                    raise InvalidRequest(f"Prompt S/R: {search!r} is in neither the prompt nor the negative prompt")

    def with_fixed_seeds(self) -> XYZPlot:
        """Random seeds (None, or -1 on a Seed axis) drawn now, so that cells agree on them (unless not fixed_seeds)."""
        if not self.fixed_seeds:
            return self
        base = self.base if self.base.seed is not None else dataclasses.replace(self.base, seed=random_seed())
        axes = [
            dataclasses.replace(axis, values=tuple(random_seed() if v == -1 else v for v in axis.values))
            if axis.kind.name == "seed"
            else axis
            for axis in self.axes
        ]
        return dataclasses.replace(self, base=base, x=axes[0], y=axes[1], z=axes[2])

    def cells(self) -> list[GenerationParams]:
        """One request per cell, in A1111's index order ix + iy * nx + iz * nx * ny (X fastest)."""
        self.check()
        nx, ny, nz = self.shape
        return [self._cell((ix, iy, iz)) for iz in range(nz) for iy in range(ny) for ix in range(nx)]

    def _cell(self, index: tuple[int, int, int]) -> GenerationParams:
        fields = self.base.as_kwargs()
        for axis, i in zip(self.axes, index):
            axis.kind.apply(fields, axis.values[i], axis.values)
        if fields["seed"] == -1:  # a Seed axis's -1 when seeds are not fixed: each cell draws its own
            fields["seed"] = None
        if fields["seed"] is not None:
            fields["seed"] += sum(i for i, vary in zip(index, self.vary_seeds) if vary)
            if fields["seed"] > MAX_SEED:
                raise InvalidRequest(f"seed {fields['seed']} of cell {index} is over {MAX_SEED}")
        schedule = fields.pop("schedule", None)
        if schedule is not None:
            fields["sampler"] = _with_schedule(fields["sampler"], schedule)
        return GenerationParams(**fields)

    def infotext_params(self) -> dict:
        """What A1111 adds to the grid's infotext."""
        params = {"Script": SCRIPT_TITLE}
        for letter, axis in zip("XYZ", self.axes):
            if not axis.is_nothing:
                params[f"{letter} Type"] = axis.kind.label
                params[f"{letter} Values"] = axis.text
                if axis.kind.name == "seed" and self.fixed_seeds:
                    params[f"Fixed {letter} Values"] = ", ".join(map(str, axis.values))
        return params


def _with_schedule(sampler: str | None, schedule: str) -> str:
    """The sampler's algorithm on the Schedule type axis's schedule (which replaces a schedule the name carries)."""
    from ldmkit.samplers import DEFAULT_SAMPLER, get_sampler

    algorithm = get_sampler(sampler or DEFAULT_SAMPLER).algorithm.name
    return get_sampler(algorithm, schedule).name


# -- running it -----------------------------------------------------------------------------------------------------


@dataclass
class PlotResult:
    """The grid (the Z sub-grids side by side), each sub-grid, and the result of each cell that ran."""

    grid: Image.Image | None  # None: stopped before any cell formed
    sub_grids: list[Image.Image]
    cells: list  # GenerationResult per cell run, in index order; missing at the end if stopped
    grid_infotext: str
    interrupted: bool = False

    def outputs(self, include_sub_grids: bool = False, include_cells: bool = False):
        """(images, infotexts, seeds) as A1111's script returns them: the grid, then sub-grids, then cells."""
        if self.grid is None:
            return [], [], []
        images, infotexts = [self.grid], [self.grid_infotext]
        if include_sub_grids:
            images += self.sub_grids
            infotexts += [self.grid_infotext] * len(self.sub_grids)
        formed = [result for result in self.cells if result.images]
        if include_cells:
            images += [result.images[0] for result in formed]
            infotexts += [result.infotexts[0] for result in formed]
        return images, infotexts, [result.seeds[0] for result in formed]


def prepare_cells(pipe, plot: XYZPlot, limits=None) -> tuple[XYZPlot, list[GenerationParams]]:
    """The plot with its seeds fixed and every cell checked against the model (and a server's limits): all before
    the first step runs."""
    plot = plot.with_fixed_seeds()
    if limits is not None:
        limits.check_grid_cells(plot.cell_count)
    cells = [pipe.prepare(cell, limits) for cell in plot.cells()]
    width = max(cell.final_size[0] for cell in cells)
    height = max(cell.final_size[1] for cell in cells)
    if width * height * len(cells) > MAX_GRID_PIXELS:
        raise InvalidRequest(
            f"X/Y/Z plot of {len(cells)} cells of {width}x{height} is over {MAX_GRID_PIXELS // 1_000_000} megapixels"
        )
    return plot, cells


def run_plot(
    pipe,
    plot: XYZPlot,
    callback=None,
    should_stop: Callable[[], bool] | None = None,
    limits=None,
    on_cell: Callable[[int, int], None] | None = None,
    prepared: list[GenerationParams] | None = None,
) -> PlotResult:
    """Run each cell with `pipe` (a Pipeline), then lay the grid out. should_stop as for Pipeline.run: True stops
    after the cell being formed (the grid shows the cells formed, the rest blank); raising abandons the plot.
    on_cell(index, count) is called as each cell starts. `prepared`: the cells prepare_cells returned for `plot`."""
    if prepared is None:
        plot, prepared = prepare_cells(pipe, plot, limits)
    results, interrupted = [], False
    for index, cell in enumerate(prepared):
        if should_stop is not None and should_stop():
            interrupted = True
            break
        if on_cell is not None:
            on_cell(index, len(prepared))
        result = pipe.run(cell, callback, should_stop)
        results.append(result)
        if result.interrupted:
            interrupted = True
            break
    return assemble(plot, prepared, results, interrupted)


def assemble(plot: XYZPlot, cells: list[GenerationParams], results: list, interrupted: bool = False) -> PlotResult:
    formed = [result for result in results if result.images]
    if not formed:
        return PlotResult(None, [], results, "", interrupted)
    slot = (max(cell.final_size[0] for cell in cells), max(cell.final_size[1] for cell in cells))
    images = [result.images[0] if result.images else None for result in results]
    images += [None] * (len(cells) - len(images))  # cells never run: left blank, as A1111 leaves them
    nx, ny, nz = plot.shape
    x_labels, y_labels, z_labels = (axis.legends() if plot.draw_legend else None for axis in plot.axes)
    sub_grids = [
        draw_grid(images[iz * nx * ny : (iz + 1) * nx * ny], nx, slot, x_labels, y_labels, plot.margin)
        for iz in range(nz)
    ]
    grid = sub_grids[0] if nz == 1 else draw_titled_row(sub_grids, z_labels, slot, plot.margin)
    grid_infotext = append_params(formed[0].infotexts[0], plot.infotext_params())
    return PlotResult(grid, sub_grids, results, grid_infotext, interrupted)


# -- drawing --------------------------------------------------------------------------------------------------------

_TEXT = (0, 0, 0)
_BACKGROUND = (255, 255, 255)


def draw_grid(
    images: list[Image.Image | None],
    columns: int,
    slot: tuple[int, int],
    x_labels: list[str] | None,
    y_labels: list[str] | None,
    margin: int = 0,
) -> Image.Image:
    """Cells in rows of `columns`, each in a slot-sized box (a missing one black), X labels above the columns and
    Y labels left of the rows (none when a list is None or all empty)."""
    rows = math.ceil(len(images) / columns)
    width, height = slot
    font = _font(slot)
    pad = font.size // 2
    x_labels = x_labels if x_labels and any(x_labels) else None
    y_labels = y_labels if y_labels and any(y_labels) else None
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    x_lines = [_wrap(measure, text, font, width - 2 * pad) for text in x_labels] if x_labels else []
    y_lines = [_wrap(measure, text, font, max(width, 4 * font.size) - 2 * pad) for text in y_labels] if y_labels else []
    line_height = _line_height(font)
    top = max(len(lines) for lines in x_lines) * line_height + 2 * pad if x_lines else 0
    left = max(_text_width(measure, line, font) for lines in y_lines for line in lines) + 2 * pad if y_lines else 0
    grid = Image.new(
        "RGB", (left + columns * width + (columns - 1) * margin, top + rows * height + (rows - 1) * margin), _BACKGROUND
    )
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = left + (i % columns) * (width + margin), top + (i // columns) * (height + margin)
        grid.paste(image if image is not None else Image.new("RGB", slot), (x, y))
    for column, lines in enumerate(x_lines):
        centre = left + column * (width + margin) + width / 2
        _draw_lines(draw, lines, font, centre, top - pad - len(lines) * line_height, line_height)
    for row, lines in enumerate(y_lines):
        middle = top + row * (height + margin) + height / 2
        _draw_lines(draw, lines, font, left / 2, middle - len(lines) * line_height / 2, line_height)
    return grid


def draw_titled_row(
    grids: list[Image.Image], titles: list[str] | None, slot: tuple[int, int], margin: int = 0
) -> Image.Image:
    """Sub-grids side by side, each under its title (the Z axis's legend), lettered as the cells' legends."""
    width, height = max(g.width for g in grids), max(g.height for g in grids)
    font = _font(slot)
    pad = font.size // 2
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    titles = titles if titles and any(titles) else None
    title_lines = [_wrap(measure, text, font, width - 2 * pad) for text in titles] if titles else []
    line_height = _line_height(font)
    top = max(len(lines) for lines in title_lines) * line_height + 2 * pad if title_lines else 0
    row = Image.new("RGB", (len(grids) * width + (len(grids) - 1) * margin, top + height), _BACKGROUND)
    draw = ImageDraw.Draw(row)
    for i, grid in enumerate(grids):
        row.paste(grid, (i * (width + margin), top))
    for i, lines in enumerate(title_lines):
        centre = i * (width + margin) + width / 2
        _draw_lines(draw, lines, font, centre, top - pad - len(lines) * line_height, line_height)
    return row


def _font(slot: tuple[int, int]) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font, sized to the cells as A1111 sizes its legend ((width + height) / 25), at least 10 px."""
    return ImageFont.load_default(size=max(10, (slot[0] + slot[1]) // 25))


def _line_height(font) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    return math.ceil(draw.textlength(text, font=font))


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> list[str]:
    """Words in lines no wider than max_width (a longer word gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and _text_width(draw, f"{lines[-1]} {word}", font) <= max_width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _draw_lines(draw: ImageDraw.ImageDraw, lines: list[str], font, centre: float, top: float, line_height: int):
    for i, line in enumerate(lines):
        draw.text((centre, top + i * line_height), line, font=font, fill=_TEXT, anchor="ma")
