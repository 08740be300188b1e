"""The server's limits: what one request may ask for, and the request body size limit as ASGI middleware.

The pipeline has its own hard limits (ldmkit.params.MAX_STEPS, MAX_SIDE, MAX_IMAGES, and a memory
estimate); a server shared by several clients wants tighter ones, so no single request holds the
one worker for long or takes all the memory. A request beyond them is a 4xx whose message names the
limit, as the field of ServerLimits (`ldm serve --max-steps` and so on set them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ldmkit.errors import InvalidRequest
from ldmkit.params import is_int


@dataclass(frozen=True)
class ServerLimits:
    max_pixels: int = 2048 * 2048  # per generated image (width * height)
    max_input_pixels: int = 4096 * 4096  # per uploaded image, read from its header before decoding
    max_steps: int = 250  # denoising steps per image: as many as the ADM paper sampled with; DPM++ needs ~30
    max_images: int = 16  # per request: batch_size * n_iter (AUTOMATIC1111), n (OpenAI)
    max_prompt_chars: int = 10_000  # prompt and negative prompt, each
    max_loras: int = 8  # distinct LoRAs one request applies (each is a file to read and layers to add)
    max_body_bytes: int = 32 * 1024 * 1024  # a few large base64 PNGs; a larger body is refused (413)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not is_int(value) or value < 1:
                raise InvalidRequest(f"server limit {field.name} must be a positive integer, got {value!r}")

    def check(self, prompt, negative_prompt, steps, num_images) -> None:
        """Refuse (LimitExceeded) what is over a limit; values of the wrong type are the pipeline's to refuse."""
        for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
            if isinstance(text, str) and len(text) > self.max_prompt_chars:
                raise LimitExceeded(f"{name} of {len(text)} characters", "max_prompt_chars", self.max_prompt_chars)
        if is_int(steps) and steps > self.max_steps:
            raise LimitExceeded(f"{steps} steps", "max_steps", self.max_steps)
        if is_int(num_images) and num_images > self.max_images:
            raise LimitExceeded(f"{num_images} images in one request", "max_images", self.max_images)

    def check_input(self, image, what: str) -> None:
        """An uploaded image already decoded (imaging.decode_image refuses larger ones before decoding)."""
        if image is not None and image.width * image.height > self.max_input_pixels:
            size = f"{image.width}x{image.height}"
            raise LimitExceeded(f"{what} of {size} pixels", "max_input_pixels", self.max_input_pixels, "pixels")

    def check_loras(self, count: int) -> None:
        if count > self.max_loras:
            raise LimitExceeded(f"{count} different LoRAs in one request", "max_loras", self.max_loras)

    def check_size(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise LimitExceeded(
                f"size {width}x{height} ({width * height} pixels)", "max_pixels", self.max_pixels, "pixels per image"
            )


DEFAULT_LIMITS = ServerLimits()


class LimitExceeded(InvalidRequest):
    """A request over one of the server's limits; the message names the limit and its value."""

    def __init__(self, what: str, limit: str, value: int, unit: str = ""):
        super().__init__(f"{what} is over this server's limit {limit} = {value}{' ' + unit if unit else ''}")
        self.limit = limit


class BodySizeLimit:
    """Checked from Content-Length, and counted for chunked bodies.

    Not FastAPI's own max_body_size: that answers an oversized declared body in plain text, and each
    API's clients parse their own error shape (OpenAI's under /v1).
    """

    def __init__(self, app, max_bytes: int, error):
        self.app = app
        self.max_bytes = max_bytes
        self.error = error  # error(path, status, message, kind) -> Response

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body is over this server's limit max_body_bytes = {self.max_bytes} bytes"
        too_large = self.error(scope["path"], 413, message, "LimitExceeded")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(scope, receive, send)

        received = 0
        refused = False

        async def limited_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not refused:
                    # Answer 413 now; the app sees a client that left, and its own reply is dropped.
                    refused = True
                    await too_large(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)
