"""The server's limits: what one request may ask for, and the request body limits as ASGI middleware.

The pipeline has its own hard limits (ldmkit.params.MAX_STEPS, MAX_SIDE, MAX_IMAGES, and a memory
estimate); a server shared by several clients wants tighter ones, so no single request holds the
one worker for long or takes all the memory. A request beyond them is a 4xx whose message names the
limit, as the field of ServerLimits (`ldm serve --max-steps` and so on set them).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
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
    max_prompt_chunks: int = 32  # 75-token chunks of the prompt and of the negative prompt (each BREAK starts one)
    max_loras: int = 8  # distinct LoRAs one request applies (each is a file to read and layers to add)
    max_grid_cells: int = 64  # cells of one X/Y/Z plot (each is one image generated)
    max_body_bytes: int = 32 * 1024 * 1024  # a few large base64 PNGs; a larger body is refused (413)
    max_ui_cache_bytes: int = 1024 * 1024 * 1024  # the web UI's uploads and served images, oldest deleted first
    max_ui_cache_seconds: int = 3600  # and none kept longer
    # Decoding a body costs several times its size (the bytes, the JSON text, the decoded base64, the
    # pixels); bodies of more than 64 KiB are handled while their sizes fit this budget, others wait.
    max_body_bytes_in_flight: int = 64 * 1024 * 1024
    max_header_seconds: int = 10  # to send a request's head; a slower client is disconnected
    max_body_seconds: int = 60  # to send its body: 32 MiB at 0.6 MB/s; a slower client is disconnected

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

    def check_grid_cells(self, count: int) -> None:
        if count > self.max_grid_cells:
            raise LimitExceeded(f"X/Y/Z plot of {count} cells", "max_grid_cells", self.max_grid_cells)

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
    """Checked from Content-Length, and counted for chunked bodies; large bodies wait for their turn.

    Not FastAPI's own max_body_size: that answers an oversized declared body in plain text, and each
    API's clients parse their own error shape (OpenAI's under /v1). A body over SMALL_BODY bytes is
    handed to the app whole only when it fits the `in_flight` budget, which it holds until the app
    starts its response: the app's copies of it (JSON text, base64, pixels) are made by then.
    """

    SMALL_BODY = 64 * 1024  # control requests (interrupt, progress, a txt2img) never wait

    def __init__(self, app, max_bytes: int, error, in_flight: int | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.error = error  # error(path, status, message, kind) -> Response
        self.budget = ByteBudget(in_flight or 2 * max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body is over this server's limit max_body_bytes = {self.max_bytes} bytes"
        too_large = self.error(scope["path"], 413, message, "LimitExceeded")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(scope, receive, send)

        received = held = 0
        refused = False

        async def limited_receive():
            nonlocal received, refused, held
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not refused:
                    # Answer 413 now; the app sees a client that left, and its own reply is dropped.
                    refused = True
                    await too_large(scope, receive, send)
                    return {"type": "http.disconnect"}
                if not message.get("more_body", False) and received > self.SMALL_BODY and not held:
                    held = await self.budget.acquire(received)
            return message

        async def guarded_send(message):
            nonlocal held
            if message["type"] == "http.response.start" and held:
                self.budget.release(held)
                held = 0
            if not refused:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        finally:
            if held:
                self.budget.release(held)


class ByteBudget:
    """An asyncio semaphore counted in bytes, granted first come, first served (a large body is not
    passed over forever by smaller ones). A request larger than the whole budget takes all of it."""

    def __init__(self, total: int):
        self.total = self.free = total
        self._waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    async def acquire(self, amount: int) -> int:
        """Wait until `amount` bytes (at most the total) are free, take them, and return how many were taken."""
        amount = min(amount, self.total)
        if not self._waiting and amount <= self.free:
            self.free -= amount
            return amount
        granted = asyncio.get_running_loop().create_future()
        self._waiting.append((amount, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.cancelled():  # cancelled while waiting: those behind may fit now
                with contextlib.suppress(ValueError):
                    self._waiting.remove((amount, granted))
                self._grant()
            else:  # granted just as the request was cancelled
                self.release(amount)
            raise
        return amount

    def release(self, amount: int) -> None:
        self.free += amount
        self._grant()

    def _grant(self) -> None:
        while self._waiting and (self._waiting[0][1].cancelled() or self._waiting[0][0] <= self.free):
            amount, granted = self._waiting.popleft()
            if not granted.cancelled():
                self.free -= amount
                granted.set_result(None)
