"""Synonyms and keywords people type for an emoji ("coffee" for hot beverage), from the emojilib npm package (MIT)."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

from ldmkit.data.codepoints import normalize_key

PACKAGE = "emojilib"
# A keyword shared by more emoji than this ("animal", "face") names a category, not a thing: it is not a synonym.
MAX_EMOJI_PER_KEYWORD = 3
# Words emojilib lacks, for the emoji nearest to them (added to its keywords): the "space rover".
EXTRA_KEYWORDS = {"1f699": ["rover", "space rover", "buggy"]}


def read_emojilib(tgz: Path) -> dict[str, list[str]]:
    """emojilib's .tgz -> {normalized code point key: [keywords]} (all of them, lower case)."""
    with tarfile.open(tgz) as tar:
        member = tar.extractfile("package/dist/emoji-en-US.json")
        if member is None:
            raise ValueError(f"{tgz}: no dist/emoji-en-US.json")
        table = json.loads(member.read())
    return {
        normalize_key("-".join(f"{ord(c):x}" for c in char)): [w.replace("_", " ").lower().strip() for w in words]
        for char, words in table.items()
    }


def specific(raw: dict[str, list[str]]) -> dict[str, list[str]]:
    """Only the keywords that name a few emoji: synonyms ("coffee"), not categories ("animal")."""
    counts = Counter(w for words in raw.values() for w in set(words))
    found = {
        key: sorted({w for w in words if w and counts[w] <= MAX_EMOJI_PER_KEYWORD and w.isascii()})
        for key, words in raw.items()
    }
    for key, words in EXTRA_KEYWORDS.items():
        found[key] = sorted(set(found.get(key, [])) | set(words))
    return found


def load_keywords(data_dir: Path) -> dict[str, list[str]]:
    """keywords.json as `ldm data emoji` wrote it; empty if the data set has none."""
    path = Path(data_dir) / "keywords.json"
    return json.loads(path.read_text()) if path.exists() else {}
