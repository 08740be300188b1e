"""AUTOMATIC1111's prompt styles: named prompt and negative-prompt texts kept in a CSV file (columns name, prompt,
negative_prompt), added to a request's prompts as A1111 adds them.

A style text holding `{prompt}` has the user's text put there; any other is appended after ", " (an empty side is
left out). Several styles apply in the order named, each to the result of the one before (A1111's
modules/styles.py behaves so). Torch-free: the CLI checks styles before loading a model.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from ldmkit.errors import InvalidRequest, LdmError

DEFAULT_STYLES_FILE = "styles.csv"  # read from the working directory when no file is named (A1111's file name)
PROMPT_PLACEHOLDER = "{prompt}"
NO_STYLE = ("", "None")  # what clients send for no style (AIYA: ["None"]); A1111 applies nothing for them


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


def merge(style_text: str, text: str) -> str:
    """One style text applied to one prompt."""
    if PROMPT_PLACEHOLDER in style_text:
        return style_text.replace(PROMPT_PLACEHOLDER, text)
    return ", ".join(part for part in (text.strip(), style_text.strip()) if part)


class StyleLibrary:
    """The styles of one file, by name, in the file's order."""

    def __init__(self, styles: list[Style] = (), source: Path | None = None):
        self.styles = {style.name: style for style in styles}
        self.source = source

    @classmethod
    def load(cls, path: str | os.PathLike) -> StyleLibrary:
        """Read a styles CSV (UTF-8, a BOM allowed; A1111's older 'text' column is read as 'prompt')."""
        path = Path(path).expanduser()
        try:
            with open(path, encoding="utf-8-sig", newline="") as file:
                reader = csv.DictReader(file, skipinitialspace=True)
                columns = reader.fieldnames or []
                text_column = "prompt" if "prompt" in columns else "text" if "text" in columns else None
                if "name" not in columns or text_column is None:
                    raise LdmError(
                        f"styles file {path} needs a header with the columns name,prompt,negative_prompt"
                        f" (found: {','.join(columns) or 'no header'})"
                    )
                styles = [
                    Style(row["name"], row[text_column] or "", row.get("negative_prompt") or "")
                    for row in reader
                    if row.get("name")
                ]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise LdmError(f"cannot read styles file {path}: {getattr(exc, 'strerror', None) or exc}") from None
        return cls(styles, path)

    @classmethod
    def from_option(cls, path: str | os.PathLike | None) -> StyleLibrary:
        """The file an option names (it must exist), else ./styles.csv when there is one, else no styles."""
        if path is not None:
            if not Path(path).expanduser().is_file():
                raise LdmError(f"styles file not found: {path}")
            return cls.load(path)
        if Path(DEFAULT_STYLES_FILE).is_file():
            return cls.load(DEFAULT_STYLES_FILE)
        return cls()

    def names(self) -> list[str]:
        return list(self.styles)

    def check(self, names) -> list[Style]:
        """The styles `names` asks for, in order; a name this library lacks is refused by name."""
        if isinstance(names, str) or not all(isinstance(name, str) for name in names):
            raise InvalidRequest(f"styles must be a list of style names, got {names!r}")
        unknown = [name for name in names if name not in NO_STYLE and name not in self.styles]
        if unknown:
            have = ", ".join(self.styles) or "none (no styles file was read)"
            raise InvalidRequest(f"unknown style(s) {', '.join(map(repr, unknown))}; the styles are: {have}")
        return [self.styles[name] for name in names if name not in NO_STYLE]

    def apply(self, names, prompt: str, negative_prompt: str) -> tuple[str, str]:
        """The prompt and negative prompt with the named styles applied."""
        for style in self.check(names):
            prompt = merge(style.prompt, prompt)
            negative_prompt = merge(style.negative_prompt, negative_prompt)
        return prompt, negative_prompt
