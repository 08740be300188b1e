"""Generation parameters in AUTOMATIC1111's 'parameters' PNG text chunk (write, read, parse), and output files
saved atomically without overwriting."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import warnings
from pathlib import Path

from PIL import Image, PngImagePlugin

from ldmkit.errors import LdmError, describe

PARAMETERS_KEY = "parameters"

NEGATIVE_PREFIX = "Negative prompt:"
MIN_PARAMETERS = 3  # a last line with fewer "Key: value" pairs is read as prompt text, as A1111 reads it

_KEY = re.compile(r"\s*(\w[\w \-/]*):\s*")  # the start of each "Key: value" of the parameter line
_JSON = json.JSONDecoder(strict=False)  # quoted values are JSON strings, as A1111 writes them
# A numbered output's index: its leading digits, before a '-' (AUTOMATIC1111's '00042-<seed>.png').
_INDEX_RE = re.compile(r"([0-9]+)-")


def format_infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """The text AUTOMATIC1111 writes: prompt line, 'Negative prompt:' line, 'Key: value, ...' line."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in params.items() if value is not None))
    return "\n".join(lines)


def add_parameters(infotext: str, params: dict) -> str:
    """The infotext with more 'Key: value' pairs at the end of its parameters line (the last line)."""
    extra = ", ".join(f"{key}: {_quote(value)}" for key, value in params.items() if value is not None)
    return f"{infotext}, {extra}" if extra else infotext


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
    """The value at `start` (a JSON string when quoted, else the text up to the comma) and where the next begins."""
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
    """The 'parameters' text of a PNG, or None when it has none.

    Only the header and the text chunks before the pixels are read, never the pixels, so a huge image
    costs nothing; Pillow caps decompressed text chunks (PngImagePlugin.MAX_TEXT_CHUNK, 1 MiB).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # no pixel is decoded here
            with Image.open(path) as image:
                return image.info.get(PARAMETERS_KEY)
    except FileNotFoundError:
        raise LdmError(f"no such file: {path}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged or hostile file fails in many ways (zlib, struct, bombs)
        raise LdmError(f"cannot read {path} as an image: {describe(exc)}") from None


def png_info(infotext: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, infotext)
    return info


def save_new_file(write, path: Path) -> Path:
    """Write a file atomically under exactly `path`, never overwriting: an existing name is an LdmError.

    `write(tmp_path)` writes the content into a temporary file beside it, which is then hard-linked into
    place; the link fails instead of overwriting when another process took the name first.
    """
    tmp = _write_temporary(write, path.parent)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise LdmError(f"{path} already exists; it is not overwritten") from None
        except OSError as error:
            raise _write_error(path.parent, error) from None
    finally:
        _remove(tmp)
    return path


def save_numbered_file(write, folder: Path, make_name, start_index: int | None = None) -> Path:
    """Write a file atomically under make_name(index) for an index no other file of the folder has.

    Indices start at `start_index`, or one past the folder's largest (AUTOMATIC1111's numbering), and
    are unique across processes writing into the same folder at once: an index is claimed with a
    marker file created exclusively (O_EXCL), checked free, used, and the marker removed. A marker
    left behind by a killed process only makes later runs skip that one index.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _write_error(folder, error) from None
    tmp = _write_temporary(write, folder)
    try:
        index = next_free_index(folder) if start_index is None else start_index
        while (path := _link_under_free_index(tmp, folder, index, make_name)) is None:
            index += 1
        return path
    finally:
        _remove(tmp)


def _link_under_free_index(tmp: Path, folder: Path, index: int, make_name) -> Path | None:
    """Link tmp as make_name(index) if no file holds the index yet; None if one does (or is being written)."""
    name = make_name(index)
    if file_index(name) != index:
        raise ValueError(f"a numbered file name must start with its index and '-': {name!r} for {index}")
    marker = folder / f".index-{index}.claim"
    try:
        _create_exclusive(marker)
    except FileExistsError:
        return None  # another process is saving under this index right now
    except OSError as error:
        raise _write_error(folder, error) from None
    try:
        if any(file_index(p.name) == index for p in folder.iterdir()):
            return None
        path = folder / name
        os.link(tmp, path)
        return path
    except FileExistsError:
        return None
    except OSError as error:
        raise _write_error(folder, error) from None
    finally:
        _remove(marker)


def _write_temporary(write, folder: Path) -> Path:
    """A hidden temporary file in `folder` holding what write(path) wrote; removed again if writing fails."""
    while True:
        tmp = folder / f".tmp-{secrets.token_hex(8)}.part"
        try:
            _create_exclusive(tmp)
            break
        except FileExistsError:
            continue
        except OSError as error:
            raise _write_error(folder, error) from None
    try:
        write(tmp)
    except OSError as error:
        _remove(tmp)
        raise _write_error(folder, error) from None
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def _create_exclusive(path: Path) -> None:
    # Mode 0666 as open() uses, so the user's umask decides the permissions (mkstemp's 0600 would not).
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _write_error(folder: Path, error: OSError) -> LdmError:
    """One line for a failed write (a full disk, a read-only folder), without the temporary file's name."""
    return LdmError(f"cannot write to {folder}: {error.strerror or error}")


def file_index(name: str) -> int | None:
    """The index a numbered file name starts with ('00042-123.png' -> 42), or None."""
    match = _INDEX_RE.match(name)
    return int(match[1]) if match else None


def next_free_index(folder: Path) -> int:
    """One past the largest index among the folder's numbered files (past 99999 the numbers grow a digit)."""
    if not folder.is_dir():
        return 1
    return max((i for p in folder.iterdir() if (i := file_index(p.name)) is not None), default=0) + 1


def save_png(
    image: Image.Image, folder: Path, make_name, infotext: str | None = None, start_index: int | None = None
) -> Path:
    """Save a PNG with its parameters chunk under a fresh index, atomically and without overwriting."""
    pnginfo = png_info(infotext) if infotext else None
    return save_numbered_file(
        lambda tmp: image.save(tmp, format="PNG", pnginfo=pnginfo), folder, make_name, start_index
    )


def append_params(infotext: str, params: dict) -> str:
    """An infotext with more 'Key: value' pairs at the end of its parameter line (as A1111's scripts add theirs)."""
    extra = ", ".join(f"{key}: {_quote(value)}" for key, value in params.items() if value is not None)
    return f"{infotext}, {extra}" if extra else infotext
