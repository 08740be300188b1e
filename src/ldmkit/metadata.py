"""Generation parameters in AUTOMATIC1111's 'parameters' PNG text chunk: write, read, parse."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

from ldmkit.errors import LdmError

PARAMETERS_KEY = "parameters"

NEGATIVE_PREFIX = "Negative prompt:"
MIN_PARAMETERS = 3  # a last line with fewer "Key: value" pairs is read as prompt text, as A1111 reads it

_KEY = re.compile(r"\s*(\w[\w \-/]*):\s*")  # the start of each "Key: value" of the parameter line
_JSON = json.JSONDecoder(strict=False)  # quoted values are JSON strings, as A1111 writes them


def format_infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """The text AUTOMATIC1111 writes: prompt line, 'Negative prompt:' line, 'Key: value, ...' line."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in params.items() if value is not None))
    return "\n".join(lines)


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(ch in text for ch in ',:\n"') else text


def parse_infotext(text: str) -> dict:
    """Inverse of format_infotext: {'Prompt', 'Negative prompt', and each 'Key': 'value'}."""
    lines = text.strip().split("\n")
    params = _parameters(lines[-1])
    if len(params) >= MIN_PARAMETERS:
        lines.pop()
    else:
        params = {}
    negative_at = next((i for i, line in enumerate(lines) if line.startswith(NEGATIVE_PREFIX)), len(lines))
    negative = lines[negative_at:]
    if negative:
        negative[0] = negative[0].removeprefix(NEGATIVE_PREFIX).strip()
    return {"Prompt": "\n".join(lines[:negative_at]), "Negative prompt": "\n".join(negative), **params}


def _parameters(line: str) -> dict[str, str]:
    """{key: value} of a 'Key: value, Key: "quoted, value"' line; a stretch that is no pair is skipped to its comma."""
    params = {}
    position = 0
    while position < len(line):
        key = _KEY.match(line, position)
        if key is None:
            position = _after_comma(line, position)
            continue
        params[key[1].strip()], position = _value(line, key.end())
    return params


def _value(line: str, start: int) -> tuple[str, int]:
    """The value at `start` (a JSON string when quoted, else the text up to the comma) and where the next pair starts."""
    if line.startswith('"', start):
        try:
            value, end = _JSON.raw_decode(line, start)
            return str(value), _after_comma(line, end)
        except json.JSONDecodeError:
            pass  # not JSON after all: read it as written
    end = _after_comma(line, start)
    return line[start:end].removesuffix(","), end


def _after_comma(line: str, position: int) -> int:
    comma = line.find(",", position)
    return len(line) if comma == -1 else comma + 1


def read_infotext(path: str | os.PathLike) -> str | None:
    """The 'parameters' text of a PNG, or None when it has none."""
    try:
        with Image.open(path) as image:
            return image.info.get(PARAMETERS_KEY)
    except FileNotFoundError:
        raise LdmError(f"no such file: {path}") from None
    except OSError as exc:
        raise LdmError(f"cannot read {path} as an image: {exc}") from None


def png_info(infotext: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, infotext)
    return info


def save_new_file(write, folder: Path, make_name, start_index: int | None = None) -> Path:
    """Write a file atomically under the first free name make_name(index) gives, never overwriting.

    `write(tmp_path)` writes the content; the finished file is then hard-linked into place, which
    fails instead of overwriting when another process took the name first. Indices start at
    `start_index`, or one past the folder's largest.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        index = next_free_index(folder) if start_index is None else start_index
        while True:
            path = folder / make_name(index)
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                index += 1
    finally:
        os.unlink(tmp)


def next_free_index(folder: Path) -> int:
    """One past the largest leading 5-digit index among the folder's files (A1111's numbering)."""
    indices = [int(p.name[:5]) for p in folder.iterdir() if p.name[:5].isdigit()]
    return max(indices, default=0) + 1


def save_png(
    image: Image.Image, folder: Path, make_name, infotext: str | None = None, start_index: int | None = None
) -> Path:
    """Save a PNG with its parameters chunk, atomically and without overwriting."""
    pnginfo = png_info(infotext) if infotext else None
    return save_new_file(lambda tmp: image.save(tmp, format="PNG", pnginfo=pnginfo), folder, make_name, start_index)
