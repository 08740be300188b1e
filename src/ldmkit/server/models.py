"""The models a server holds: the one it serves and the refiners given with `ldm serve --refiner`, by the names
AUTOMATIC1111's clients use for them (the model's name, its file's name with or without the extension, or a title
"name [hash]" as /sdapi/v1/sd-models lists it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ldmkit.errors import InvalidRequest
from ldmkit.params import GenerationParams
from ldmkit.pipeline import Pipeline
from ldmkit.refiner import DEFAULT_SWITCH

NO_REFINER = (None, "", "None")  # what A1111's clients send for "no refiner"


def model_file(pipe: Pipeline) -> str:
    """The model's file or folder name, not where it is on the server's disk."""
    return Path(pipe.source).name


def find_model(name: str, models: list[Pipeline]) -> Pipeline:
    """The model called `name`; an unknown name is InvalidRequest (400) listing the known ones."""
    wanted = name.split(" [")[0].strip()  # "name [hash]" titles
    for model in models:
        if wanted in (model.model_name, model_file(model), Path(model_file(model)).stem):
            return model
    known = ", ".join(model.model_name for model in models)
    raise InvalidRequest(f"refiner_checkpoint {name!r} is not a model of this server (it has: {known})")


def with_refiner(
    generation: GenerationParams, checkpoint: str | None, switch_at: float | None, models: list[Pipeline]
) -> GenerationParams:
    """A1111's refiner_checkpoint / refiner_switch_at on a request: the refiner looked up among the server's models
    (the served one first). Without a checkpoint the switch point means nothing, as in A1111 (clients send both)."""
    if checkpoint in NO_REFINER:
        return generation
    refiner = find_model(checkpoint, models)
    return dataclasses.replace(
        generation, refiner=refiner, refiner_switch=DEFAULT_SWITCH if switch_at is None else switch_at
    )
