"""Requests far larger than the model's native size (what clients send by default: Open WebUI 512x512, OpenAI's
client 1024x1024), which a small model draws badly and slowly: run them at the native size and upscale the result,
refuse them naming the native size, or run them as asked (`ldm serve --oversize`, docs/server.md).

The native size is the model's own (its UNet's sample_size times the VAE's scale factor: Pipeline.default_size).
A request is oversize when a side of its base pass is over OVERSIZE_FACTOR times the native side; "native" then
runs it with the native size's pixel count at the request's aspect ratio (sides rounded to multiples of 8, never
larger than asked) and upscales every image to the size asked, with the policy's upscaler (ldmkit.upscalers). The
image's parameters keep the size generated ("Size") and add AUTOMATIC1111's extras keys "Postprocess upscale to" and
"Postprocess upscaler".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ldmkit.errors import InvalidRequest
from ldmkit.metadata import add_parameters
from ldmkit.params import GenerationParams
from ldmkit.pipeline import GenerationResult
from ldmkit.upscalers import UpscalerLibrary

OVERSIZE_MODES = ("native", "refuse", "as-is")
OVERSIZE_FACTOR = 2  # a side over twice the native side is oversize


@dataclass(frozen=True)
class OversizePolicy:
    mode: str = "as-is"
    upscaler: str = "Lanczos"  # an upscaler of the pipeline's UpscalerLibrary, for "native"

    def __post_init__(self):
        if self.mode not in OVERSIZE_MODES:
            raise InvalidRequest(f"--oversize must be one of {', '.join(OVERSIZE_MODES)}, got {self.mode!r}")

    def fit(self, p: GenerationParams, native: int) -> tuple[GenerationParams, tuple[int, int] | None]:
        """(the request to run, the size to deliver its images at, None: as they come) for a prepared request
        (its size concrete)."""
        if self.mode == "as-is" or max(p.width, p.height) <= OVERSIZE_FACTOR * native:
            return p, None
        if self.mode == "refuse":
            limit = OVERSIZE_FACTOR * native
            raise InvalidRequest(
                f"size {p.width}x{p.height} is over this model's native size {native}x{native}: ask for sides of at "
                f"most {limit} (the server runs with --oversize refuse)"
            )
        return dataclasses.replace(
            p, width=native_side(p.width, p.height, native), height=native_side(p.height, p.width, native)
        ), p.final_size

    def deliver(self, result: GenerationResult, size: tuple[int, int], upscalers: UpscalerLibrary) -> GenerationResult:
        """The images upscaled to the size asked, each one's parameters saying how."""
        upscaled = [upscalers.upscale(image, self.upscaler, size) for image in result.images]
        record = {"Postprocess upscale to": f"{size[0]}x{size[1]}", "Postprocess upscaler": self.upscaler}
        infotexts = [add_parameters(text, record) for text in result.infotexts]
        return dataclasses.replace(result, images=upscaled, infotexts=infotexts)


AS_IS = OversizePolicy()  # every request runs at the size it asks


def native_side(side: int, other: int, native: int) -> int:
    """One side of the native size's pixel count at the aspect ratio side:other, a multiple of 8, at most `side`."""
    scale = min(1.0, native / math.sqrt(side * other))
    return min(side, max(8, round(side * scale / 8) * 8))
