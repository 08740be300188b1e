"""A model folder's own sampling defaults: its optional `ldmkit.json`, e.g. {"default_guidance": 3.5}.

SD checkpoints draw well at guidance 7.5 (params.DEFAULT_GUIDANCE), which every model gets unless its folder says
otherwise; a small model trained otherwise may not (`ldm eval` on the shipped one: CLIP names 92.6% of its bare-name
images right at 3.5, 81.3% at 7.5), so its folder names its own. Requests that name a guidance keep theirs. A file
that cannot be read as these keys and values is refused at load (ModelLoadError), never ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

from ldmkit.errors import ModelLoadError
from ldmkit.params import MAX_GUIDANCE, is_guidance

FILE_NAME = "ldmkit.json"
KEYS = ("default_guidance",)


def read_default_guidance(folder: Path) -> float | None:
    """The default guidance `folder`'s ldmkit.json names; None when it has no such file or the file names none."""
    path = folder / FILE_NAME
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise ModelLoadError(f'{path} must hold a JSON object, such as {{"default_guidance": 3.5}}')
    for key in values:
        if key not in KEYS:
            raise ModelLoadError(f"{path}: unknown key {key!r} (known: {', '.join(KEYS)})")
    if "default_guidance" not in values:
        return None
    guidance = values["default_guidance"]
    if not is_guidance(guidance):
        raise ModelLoadError(
            f"{path}: default_guidance must be a finite number from 0 to {MAX_GUIDANCE}, got {guidance!r}"
        )
    return float(guidance)


def write_default_guidance(folder: Path, guidance: float) -> None:
    """Write `folder`'s ldmkit.json naming `guidance`."""
    (folder / FILE_NAME).write_text(json.dumps({"default_guidance": guidance}) + "\n")
