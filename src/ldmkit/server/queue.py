"""One worker thread owns the model; requests wait their turn in a bounded FIFO.

Web UI and both HTTP APIs submit here, so the model runs one request at a time whoever asks, a
full queue is refused up front (503), and a request that is cancelled or whose client leaves gives
its place back at once (waiting) or at the next denoising step (running).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gc
import logging
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial

import torch
from PIL import Image

from ldmkit.errors import InvalidRequest
from ldmkit.hires import HiresFix
from ldmkit.inpainting import check_inpainting
from ldmkit.pipeline import MAX_SEED, GenerationResult, Pipeline, StepInfo, check_inputs
from ldmkit.previews import latent_rgb_projection
from ldmkit.prompts import check_clip_skip
from ldmkit.samplers import DEFAULT_SAMPLER
from ldmkit.server.limits import DEFAULT_LIMITS, ServerLimits

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every place in the queue is taken; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: its queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """The job was cancelled before it finished."""


class OutOfMemory(Exception):
    """The device ran out of memory during this job; the worker freed what it could and goes on."""

    def __init__(self):
        super().__init__("out of GPU memory; try a smaller size or batch")


class _Interrupted(Exception):
    """Raised from the step callback to stop sampling; carries the images decoded so far."""

    def __init__(self, images: list[Image.Image]):
        self.images = images


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 7.5
    sampler: str = DEFAULT_SAMPLER
    seed: int | None = None  # None: random; batch k of n_iter uses seed + k * batch_size onwards
    width: int | None = None  # None: the init image's or the model's native size
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    init_image: Image.Image | None = None
    strength: float = 0.75
    mask_image: Image.Image | None = None  # inpainting: white = repaint
    mask_blur: int = 4
    hires: HiresFix | None = None
    clip_skip: int = 1


class Job:
    """A submitted request: its future result, and its progress for previews and progress bars."""

    def __init__(self, request: GenerationRequest):
        self.request = request  # normalized: seed, size and sampler name are concrete
        self.future: Future[GenerationResult] = Future()
        self.created = time.time()
        self.started_at: float | None = None
        self.batch = 0  # index of the batch (of n_iter) being generated
        self.step: StepInfo | None = None  # the latest denoising step
        self.steps_taken = 0  # over all batches; lets a watcher tell a new step from the last one
        self.stop: str | None = None  # "cancel" or "interrupt", read by the worker at each step

    @property
    def done(self) -> bool:
        return self.future.done()

    def progress(self) -> float:
        """Fraction of the job's denoising steps done, over all its batches."""
        if self.step is None:
            return 0.0
        return (self.batch + (self.step.step + 1) / self.step.total) / self.request.n_iter

    def eta(self) -> float:
        """Seconds left, extrapolated from the time the steps so far took."""
        progress = self.progress()
        if self.started_at is None or progress == 0:
            return 0.0
        elapsed = time.monotonic() - self.started_at
        return elapsed / progress - elapsed


class GenerationQueue:
    def __init__(self, pipe: Pipeline, max_waiting: int = 8, limits: ServerLimits = DEFAULT_LIMITS):
        self.pipe = pipe
        self.max_waiting = max_waiting  # requests that may wait while one runs
        self.limits = limits
        self.current: Job | None = None
        self._waiting: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self._closed = False
        self._mean_seconds = 1.0  # running mean of job durations, for Retry-After
        self._thread = threading.Thread(target=self._work, name="ldm-generation-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Cancel everything and stop the worker."""
        with self._lock:
            self._closed = True
            for job in self._waiting:
                job.future.set_exception(Cancelled("the server is shutting down"))
            self._waiting.clear()
            if self.current is not None:
                self.current.stop = "cancel"
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, request: GenerationRequest) -> Job:
        """Validate (InvalidRequest) and enqueue (QueueFull when every place is taken)."""
        job = Job(self.prepare(request))
        with self._lock:
            if self._closed:
                raise QueueFull(self.retry_after())
            if len(self._waiting) + (self.current is not None) > self.max_waiting:
                raise QueueFull(self.retry_after())
            self._waiting.append(job)
            self._lock.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a waiting job now, or stop a running one at its next step."""
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                job.future.set_exception(Cancelled("cancelled while waiting"))
            elif not job.done:
                job.stop = "cancel"

    def interrupt(self) -> bool:
        """Stop the running job at its next step; it still answers with the images formed so far."""
        with self._lock:
            if self.current is None:
                return False
            self.current.stop = self.current.stop or "interrupt"
            return True

    def waiting(self) -> int:
        return len(self._waiting)

    def position(self, job: Job) -> int:
        """How many requests are ahead of a waiting job; 0 once it runs."""
        with self._lock:
            if job not in self._waiting:
                return 0
            return self._waiting.index(job) + (self.current is not None)

    def retry_after(self) -> int:
        # A place frees when the running job ends: about one job's time.
        return max(1, math.ceil(self._mean_seconds))

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Check everything the pipeline would, before the request takes a place in the queue."""
        pipe, r = self.pipe, request
        for name, value in (("batch size", r.batch_size), ("batch count", r.n_iter)):
            if not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"{name} must be a positive integer, got {value!r}")
        total = r.batch_size * r.n_iter  # check_inputs bounds the request's whole image count and seed range
        self.limits.check(r.prompt, r.negative_prompt, r.steps, total)
        for name, text in (("prompt", r.prompt), ("negative prompt", r.negative_prompt)):
            check_unicode(name, text)
        sampler = check_inputs(
            r.prompt, r.negative_prompt, r.steps, r.guidance, r.sampler, r.seed, total, r.init_image, r.strength
        )
        check_clip_skip(r.clip_skip, pipe.text_encoder)
        check_inpainting(r.mask_image, r.mask_blur, r.init_image)
        self.limits.check_input(r.init_image, "init image")
        self.limits.check_input(r.mask_image, "mask")
        width, height = pipe.resolve_size(r.width, r.height, r.init_image)
        self.limits.check_size(width, height)
        if r.hires is not None:
            if r.init_image is not None:
                raise InvalidRequest("hires fix is for text-to-image; with an init image, set the size directly")
            r.hires.check(r.steps, width, height)
            self.limits.check(r.prompt, r.negative_prompt, r.hires.steps or r.steps, total)
            self.limits.check_size(*r.hires.target_size(width, height))
        seed = random.randrange(MAX_SEED + 2 - total) if r.seed is None else r.seed
        return dataclasses.replace(r, sampler=sampler.name, width=width, height=height, seed=seed)

    # -- the worker -----------------------------------------------------------------------------

    def _work(self) -> None:
        latent_rgb_projection(self.pipe)  # fit (once) here, so preview threads never touch the VAE
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                job = self.current = self._waiting.popleft()
            job.started_at = time.monotonic()
            result, error = None, None
            try:
                result = self._generate(job)
            except (torch.OutOfMemoryError, MemoryError):
                error = OutOfMemory()
            except Exception as exc:  # noqa: BLE001 (the waiting handler turns it into an HTTP answer)
                error = exc
            if isinstance(error, OutOfMemory):
                self._free_memory()  # before answering, so the next request finds the memory free
            with self._lock:
                self.current = None
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.monotonic() - job.started_at)
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)
            del result, error  # a finished job's images and tensors go with its answer, not with the idle worker

    def _free_memory(self) -> None:
        """After an out-of-memory error: collect the failed job's tensors (its traceback held them), empty the allocator's cache."""
        logger.warning("generation ran out of memory; freeing the device cache")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _generate(self, job: Job) -> GenerationResult:
        r = job.request
        result = GenerationResult(images=[], seeds=[], infotexts=[])
        for batch in range(r.n_iter):
            if job.stop:
                break
            job.batch = batch
            seed = r.seed + batch * r.batch_size
            try:
                part = self.pipe.generate(
                    prompt=r.prompt,
                    negative_prompt=r.negative_prompt,
                    steps=r.steps,
                    guidance=r.guidance,
                    sampler=r.sampler,
                    seed=seed,
                    width=r.width,
                    height=r.height,
                    num_images=r.batch_size,
                    init_image=r.init_image,
                    strength=r.strength,
                    callback=partial(self._on_step, job),
                    mask_image=r.mask_image,
                    mask_blur=r.mask_blur,
                    hires=r.hires,
                    clip_skip=r.clip_skip,
                )
            except _Interrupted as stop:
                seeds = [seed + i for i in range(r.batch_size)]
                extra = {"Denoising strength": r.strength if r.init_image is not None else None}
                infotexts = [
                    self.pipe.infotext(
                        r.prompt, r.negative_prompt, r.steps, r.guidance, r.sampler, s, r.width, r.height, extra
                    )
                    for s in seeds
                ]
                part = GenerationResult(images=stop.images, seeds=seeds, infotexts=infotexts)
            result.images += part.images
            result.seeds += part.seeds
            result.infotexts += part.infotexts
        if job.stop == "cancel":
            raise Cancelled("cancelled")
        return result

    def _on_step(self, job: Job, step: StepInfo) -> None:
        job.step = step
        job.steps_taken += 1
        if job.stop == "cancel":
            raise Cancelled("cancelled")
        if job.stop == "interrupt":
            # Like AUTOMATIC1111's interrupt: the answer is what the image looks like now.
            raise _Interrupted(self.pipe.latents_to_images(step.denoised))


def check_unicode(name: str, text) -> None:
    """JSON's "\\ud800" escape decodes to a lone surrogate: a str that is no text, which the tokenizer refuses."""
    if isinstance(text, str) and not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest(f"{name} is not valid Unicode text ({exc.reason} at {exc.start})") from None


async def wait_for_result(
    queue: GenerationQueue, job: Job, client_gone: Callable[[], Awaitable[bool]], poll_seconds: float = 0.2
) -> GenerationResult:
    """Await a job's result; a client that disconnects first has its job cancelled, freeing its place."""
    result = as_asyncio(job)
    try:
        while True:
            done, _ = await asyncio.wait({result}, timeout=poll_seconds)
            if done:
                return result.result()
            if await client_gone():
                raise Cancelled("the client disconnected")
    except asyncio.CancelledError:
        # uvicorn cancels the requests still running when its shutdown grace period ends: answer
        # those 503 (Cancelled) rather than let the cancellation become a logged 500.
        asyncio.current_task().uncancel()
        raise Cancelled("the server is shutting down") from None
    finally:
        if not job.done:  # disconnected, or this handler itself was cancelled
            queue.cancel(job)


def as_asyncio(job: Job) -> asyncio.Future:
    """The job's result as an asyncio future; one nobody awaits (a cancelled job's) is not logged as an error."""
    result = asyncio.wrap_future(job.future)
    result.add_done_callback(lambda f: f.cancelled() or f.exception())
    return result
