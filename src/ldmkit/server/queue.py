"""One worker thread owns the model; requests wait their turn in a bounded FIFO.

Web UI and both HTTP APIs submit here, so the model runs one request at a time whoever asks, a
full queue is refused up front (503), and a request that is cancelled or whose client leaves gives
its place back at once (waiting) or at the pipeline's next check (running: between LoRA files, phases, steps
and decoded images).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from functools import partial

import torch

from ldmkit.params import GenerationParams
from ldmkit.pipeline import SKIP, GenerationResult, Pipeline, StepInfo
from ldmkit.server.limits import DEFAULT_LIMITS, ServerLimits
from ldmkit.server.native_size import AS_IS, OversizePolicy
from ldmkit.xyz import PlotResult, XYZPlot, prepare_cells, run_plot

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


class Job:
    """A submitted request: its future result, and its progress for previews and progress bars."""

    def __init__(
        self,
        request: GenerationParams,
        plot: XYZPlot | None = None,
        cells: tuple = (),
        output_size: tuple[int, int] | None = None,
    ):
        self.request = request  # prepared by the pipeline: seed, size and sampler name are concrete
        self.plot = plot  # an X/Y/Z plot (its seeds fixed): the job runs its `cells` (prepared), request = the first
        self.cells = cells
        self.cell = 0  # the plot's cell being generated
        self.output_size = output_size  # the images are upscaled to this size (an oversize request run natively)
        self.future: Future[GenerationResult] = Future()
        self.created = time.time()
        self.started_at: float | None = None
        self.step: StepInfo | None = None  # the latest denoising step
        self.steps_taken = 0  # over all batches; lets a watcher tell a new step from the last one
        self.stop: str | None = None  # "cancel", "interrupt" or "skip", read by the worker at each check (should_stop)

    @property
    def batch(self) -> int:
        """Index of the batch (of batch_count) being generated."""
        return self.step.batch if self.step is not None else 0

    @property
    def delivered_size(self) -> tuple[int, int]:
        """The size of the images the job answers with."""
        return self.output_size or self.request.final_size

    @property
    def done(self) -> bool:
        return self.future.done()

    def progress(self) -> float:
        """Fraction of the job's denoising steps done, over all its batches (and a plot's cells)."""
        cells = max(1, len(self.cells))
        if self.step is None:
            return self.cell / cells
        within = (self.batch + (self.step.step + 1) / self.step.total) / self.request.batch_count
        return (self.cell + within) / cells

    def eta(self) -> float:
        """Seconds left, extrapolated from the time the steps so far took."""
        progress = self.progress()
        if self.started_at is None or progress == 0:
            return 0.0
        elapsed = time.monotonic() - self.started_at
        return elapsed / progress - elapsed


class GenerationQueue:
    def __init__(
        self,
        pipe: Pipeline,
        max_waiting: int = 8,
        limits: ServerLimits = DEFAULT_LIMITS,
        refiners: tuple = (),
        oversize: OversizePolicy = AS_IS,
    ):
        self.pipe = pipe
        self.oversize = oversize  # what becomes of requests far over the model's native size
        self.models = [pipe, *refiners]  # what requests may name: the served model, then `ldm serve --refiner`s
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

    def submit(self, request: GenerationParams) -> Job:
        """Validate (InvalidRequest) and enqueue (QueueFull when every place is taken).

        The request is checked as asked (the size delivered is within the limits), then as the oversize policy
        runs it, with the upscaling to the size asked."""
        run, output_size = self.oversize.fit(self.pipe.prepare(request, self.limits), self.pipe.default_size)
        if output_size is not None:
            run = self.pipe.prepare(run, self.limits)
            self.pipe.upscalers.check(self.oversize.upscaler, run.final_size, output_size, "--oversize-upscaler")
        return self._enqueue(Job(run, output_size=output_size))

    def submit_plot(self, plot: XYZPlot) -> Job:
        """An X/Y/Z plot as one job: every cell validated (InvalidRequest) before it is enqueued (run as asked)."""
        plot, cells = prepare_cells(self.pipe, plot, self.limits)
        return self._enqueue(Job(cells[0], plot, tuple(cells)))

    def _enqueue(self, job: Job) -> Job:
        with self._lock:
            if self._closed:
                raise QueueFull(self.retry_after())
            if len(self._waiting) + (self.current is not None) > self.max_waiting:
                raise QueueFull(self.retry_after())
            self._waiting.append(job)
            self._lock.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a waiting job now, or stop a running one at the pipeline's next check."""
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                job.future.set_exception(Cancelled("cancelled while waiting"))
            elif not job.done:
                job.stop = "cancel"

    def interrupt(self) -> bool:
        """Stop the running job at the pipeline's next check; it still answers with the images formed so far."""
        with self._lock:
            if self.current is None:
                return False
            if self.current.stop in (None, SKIP):
                self.current.stop = "interrupt"
            return True

    def skip(self) -> bool:
        """End the batch the running job is forming at the pipeline's next check (its images as they are then); the
        job goes on with its next batch (AUTOMATIC1111's skip)."""
        with self._lock:
            if self.current is None:
                return False
            self.current.stop = self.current.stop or SKIP
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

    # -- the worker -----------------------------------------------------------------------------

    def _work(self) -> None:
        self.pipe.latent_rgb_projection()  # fit (once) here, so preview threads never touch the VAE
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
        """After an out-of-memory error: collect the failed job's tensors (its traceback held them), empty the cache."""
        logger.warning("generation ran out of memory; freeing the device cache")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _generate(self, job: Job) -> GenerationResult | PlotResult:
        on_step, should_stop = partial(self._on_step, job), partial(self._should_stop, job)
        if job.plot is not None:
            result = run_plot(
                self.pipe, job.plot, on_step, should_stop, on_cell=partial(self._on_cell, job), prepared=list(job.cells)
            )
        else:
            result = self.pipe.run(job.request, on_step, should_stop)
        if job.stop == "cancel":
            raise Cancelled("cancelled")
        if job.output_size is not None:
            result = self.oversize.deliver(result, job.output_size, self.pipe.upscalers)
        return result

    @staticmethod
    def _on_cell(job: Job, index: int, count: int) -> None:
        job.cell, job.step = index, None

    def _on_step(self, job: Job, step: StepInfo) -> None:
        job.step = step
        job.steps_taken += 1

    def _should_stop(self, job: Job) -> bool | str:
        """The pipeline asks between its phases and at every step: a cancelled job (its client left, or the server
        is closing) ends there; an interrupted one answers with what its images look like now (AUTOMATIC1111's
        interrupt); a skip is answered once, for the batch being formed."""
        with self._lock:
            if job.stop == "cancel":
                raise Cancelled("cancelled")
            if job.stop == SKIP:
                job.stop = None
                return SKIP
            return job.stop == "interrupt"


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
