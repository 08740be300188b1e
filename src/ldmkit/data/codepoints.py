"""Emoji code point keys, one spelling for every source (icon sets, WebP file names, emojilib)."""

from __future__ import annotations

# Code points that only select a presentation; dropped so "2764-fe0f" and "2764" are the same emoji.
PRESENTATION_SELECTORS = {"fe0e", "fe0f"}


def normalize_key(codepoints: str) -> str:
    """'2764-FE0F' -> '2764': lower case, hyphen separated, presentation selectors dropped."""
    parts = [p.lower().lstrip("0") or "0" for p in codepoints.replace("_", "-").split("-") if p]
    return "-".join(p for p in parts if p not in PRESENTATION_SELECTORS)
