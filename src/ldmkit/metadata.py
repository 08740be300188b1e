"""Generation parameters in AUTOMATIC1111's 'parameters' PNG text chunk: write, read, parse."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

from ldmkit.errors import LdmError

PARAMETERS_KEY = "parameters"

# "key: value" pairs of the last line; a value may be a quoted string holding commas.
_PARAM_RE = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def format_infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """The text AUTOMATIC1111 writes: prompt line, 'Negative prompt:' line, 'Key: value, ...' line."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in params.items() if value is not None))
    return "\n".join(lines)


def _quote(value) -> str:
    text = str(value)
    if any(ch in text for ch in ',:\n"'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def parse_infotext(text: str) -> dict:
    """Inverse of format_infotext: {'Prompt', 'Negative prompt', and each 'Key': 'value'}."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM_RE.findall(last)) < 3:  # no parameter line: everything is prompt
        lines.append(last)
        last = ""
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    result = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    for key, value in _PARAM_RE.findall(last):
        if value.startswith('"') and value.endswith('"'):
            value = value[1:-1].replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
        result[key.strip()] = value
    return result


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
