"""Load test of `ldm serve` over loopback: both HTTP APIs at once, clients that leave, memory before and after.

    python tests/support/loadtest.py --requests 300 --concurrency 32            # starts a tiny-model server
    python tests/support/loadtest.py --url http://127.0.0.1:7860 --pid 12345    # an `ldm serve` already running

Checks, each a hard failure (exit status 1): every answer is 200 or 503 (queue full); every 200 carries
valid PNGs whose parameters name its own request's prompt and seed, so no request is lost or
answered with another's images; clients that disconnect mid-generation free the worker (a long
request abandoned while it runs is followed by a quick one that succeeds promptly); the server's
resident memory grows by less than --max-rss-growth-mb. Only 127.0.0.1 is ever a target.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psutil
from PIL import Image

LONG = {"width": 64, "height": 64, "steps": 250, "batch_size": 2}  # ~10 s of the tiny model's time, on a CPU core
QUICK = {"width": 16, "height": 16, "steps": 4}


@dataclasses.dataclass
class Outcome:
    index: int
    api: str  # "a1111", "openai"
    kind: str  # "200", "503", "disconnected" (on purpose), or what went wrong: "status 500", "bad png", ...
    seconds: float


@dataclasses.dataclass
class LoadResult:
    outcomes: list[Outcome]
    concurrency: int
    wall_seconds: float
    rss_before: int | None = None
    rss_peak: int | None = None
    rss_after: int | None = None
    freed_worker_seconds: float | None = None  # a quick request's time after a running one was abandoned
    abandoned_eta_seconds: float | None = None  # what the abandoned one still needed then, by the server's progress

    def counts(self) -> dict[str, int]:
        return dict(collections.Counter(o.kind for o in self.outcomes).most_common())

    def errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind not in ("200", "503", "disconnected")]

    def latency(self, kind: str = "200") -> str:
        """p50 / p99 seconds of the outcomes of this kind."""
        times = sorted(o.seconds for o in self.outcomes if o.kind == kind)
        if not times:
            return "n/a"
        p99 = times[round(0.99 * (len(times) - 1))]
        return f"{statistics.median(times):.3f} s / {p99:.3f} s"


# -- the requests ---------------------------------------------------------------------------------


def a1111_body(index: int, long: bool = False) -> dict:
    size = LONG if long else {**QUICK, "batch_size": 1 + index // 2 % 2}
    return {"prompt": f"load test {index}", "seed": 1000 + index, **size}


def openai_body(index: int, long: bool = False) -> dict:
    size = {"size": "64x64", "n": 10} if long else {"size": "16x16", "n": 1 + index // 2 % 2}
    return {"prompt": f"load test {index}", **size}


async def one_request(client: httpx.AsyncClient, url: str, index: int, disconnect_after: float | None) -> Outcome:
    """Request `index` (even: AUTOMATIC1111's API, odd: OpenAI's); with `disconnect_after`, a long one its client
    leaves."""
    long = disconnect_after is not None
    api, path, body = (
        ("a1111", "/sdapi/v1/txt2img", a1111_body(index, long))
        if index % 2 == 0
        else ("openai", "/v1/images/generations", openai_body(index, long))
    )
    started = time.monotonic()
    try:
        if long:
            # Its own connection, dropped while the request waits or runs: the server must cancel it.
            async with httpx.AsyncClient(timeout=60) as leaving:
                response = await asyncio.wait_for(leaving.post(url + path, json=body), disconnect_after)
        else:
            response = await client.post(url + path, json=body)
    except TimeoutError:
        return Outcome(index, api, "disconnected", time.monotonic() - started)
    except httpx.HTTPError as exc:
        return Outcome(index, api, f"no answer ({type(exc).__name__})", time.monotonic() - started)
    seconds = time.monotonic() - started
    if response.status_code == 503:
        ok = "Retry-After" in response.headers
        return Outcome(index, api, "503" if ok else "503 without Retry-After", seconds)
    if response.status_code != 200:
        return Outcome(index, api, f"status {response.status_code}", seconds)
    return Outcome(index, api, check_images(api, body, response.json()), seconds)


def check_images(api: str, body: dict, answer: dict) -> str:
    """ "200" when the answer holds the request's images, each a PNG naming its prompt (and seed); else why not."""
    encoded = answer["images"] if api == "a1111" else [item["b64_json"] for item in answer["data"]]
    expected = body["batch_size"] if api == "a1111" else body["n"]
    if len(encoded) != expected:
        return f"{len(encoded)} images, not {expected}"
    for i, text in enumerate(encoded):
        try:
            image = Image.open(io.BytesIO(base64.b64decode(text)), formats=["PNG"])
            image.load()
        except Exception:  # noqa: BLE001 (any failure is the verdict)
            return "not a PNG"
        parameters = image.info.get("parameters", "")
        if not parameters.startswith(body["prompt"] + "\n"):
            return "another request's image"
        if "seed" in body and f"Seed: {body['seed'] + i}," not in parameters:
            return "wrong seed"
    return "200"


async def run_load(
    url: str, total: int, concurrency: int, disconnect_every: int = 15, time_limit: float = 600
) -> LoadResult:
    """`total` requests, alternating the two APIs, at most `concurrency` in flight; every k-th one leaves early."""
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def bounded(index: int) -> Outcome:
            async with slots:
                leaves = disconnect_every and index % disconnect_every == disconnect_every - 1
                return await one_request(client, url, index, disconnect_after=0.3 + index % 7 / 10 if leaves else None)

        started = time.monotonic()
        tasks = [asyncio.create_task(bounded(i)) for i in range(total)]
        done, pending = await asyncio.wait(tasks, timeout=time_limit)
        for task in pending:
            task.cancel()
        outcomes = [t.result() for t in done]
        outcomes += [Outcome(-1, "?", "over the time limit", time_limit) for _ in pending]
        return LoadResult(sorted(outcomes, key=lambda o: o.index), concurrency, time.monotonic() - started)


def check_worker_freed(url: str, timeout: float = 60) -> tuple[float, float]:
    """Abandon a long request once it runs; then a quick one must succeed. Returns the quick one's seconds and
    the seconds the server's progress said the long one still needed when its client left."""
    with httpx.Client(timeout=timeout) as client:
        idle(client, url, timeout)
        with post_raw(url, "/sdapi/v1/txt2img", a1111_body(-1, long=True)):
            progress = progress_after_two_steps(client, url, timeout)
        # Its client has left while it ran; the quick request waits for the worker to notice.
        started = time.monotonic()
        response = client.post(f"{url}/sdapi/v1/txt2img", json=a1111_body(-2))
        seconds = time.monotonic() - started
        if response.status_code != 200 or check_images("a1111", a1111_body(-2), response.json()) != "200":
            raise RuntimeError(f"the request after a disconnect failed: {response.status_code} {response.text[:200]}")
        return seconds, progress["eta_relative"]


def progress_after_two_steps(client: httpx.Client, url: str, timeout: float) -> dict:
    """The running request's /sdapi/v1/progress once it has taken two steps."""
    deadline = time.monotonic() + timeout
    while True:
        progress = client.get(f"{url}/sdapi/v1/progress?skip_current_image=true").json()
        if progress["state"]["sampling_step"] >= 2:
            return progress
        if time.monotonic() > deadline:
            raise RuntimeError("the long request never started")
        time.sleep(0.05)


@contextlib.contextmanager
def post_raw(url: str, path: str, body: dict):
    """Send a POST on a socket of its own, and close the socket (the client leaves) on exit, unanswered."""
    address = urlparse(url)
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    with socket.create_connection((address.hostname, address.port)) as sock:
        sock.sendall(head.encode() + data)
        yield


def idle(client: httpx.Client, url: str, timeout: float) -> None:
    """Wait until nothing runs (abandoned requests of the load stop at their next step)."""
    deadline = time.monotonic() + timeout
    while client.get(f"{url}/sdapi/v1/progress?skip_current_image=true").json()["state"]["job_count"]:
        if time.monotonic() > deadline:
            raise RuntimeError("the server is still busy")
        time.sleep(0.05)


# -- memory ---------------------------------------------------------------------------------------


class RssSampler:
    """The resident set of a process, sampled in a thread: the value now and the peak."""

    def __init__(self, pid: int, every: float = 0.1):
        self.process = psutil.Process(pid)
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every,), daemon=True)

    def now(self) -> int:
        return self.process.memory_info().rss

    def _sample(self, every: float) -> None:
        while not self._stop.wait(every):
            self.peak = max(self.peak, self.now())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# -- a tiny-model server, in its own process ------------------------------------------------------


@contextlib.contextmanager
def tiny_server(queue_size: int):
    """(base URL, pid) of `ldm serve` over the tests' tiny random model, on a free 127.0.0.1 port."""
    with server_process([sys.executable, __file__, "--serve-tiny", "{port}", "--queue-size", str(queue_size)]) as s:
        yield s


@contextlib.contextmanager
def server_process(command: list[str]):
    """(base URL, pid) of a server started by `command` ("{port}" in it becomes a free 127.0.0.1 port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([part.replace("{port}", str(port)) for part in command])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/sdapi/v1/options", timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the tiny-model server did not start")
            time.sleep(0.2)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(30)


def serve_tiny(port: int, queue_size: int) -> None:
    import torch
    import uvicorn

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for e2e and support
    from e2e.serving import tiny_pipeline

    from ldmkit.server.app import create_app
    from ldmkit.server.connections import uvicorn_config
    from ldmkit.server.limits import DEFAULT_LIMITS

    torch.set_num_threads(1)  # a tiny model gains nothing from threads, and they spin when cores are shared
    app = create_app(tiny_pipeline(), queue_size=queue_size, ui=False)
    # Configured as `ldm serve` configures uvicorn (h11 with read deadlines).
    config = uvicorn_config(
        app, DEFAULT_LIMITS, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2
    )
    uvicorn.Server(config).run()


# -- a real CUDA out-of-memory error ----------------------------------------------------------------


def cuda_oom_check() -> None:
    """On a CUDA device: a job too big for it fails alone, its memory comes back, and the next job runs."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for e2e and support
    import ldmkit.pipeline
    from ldmkit.params import GenerationParams
    from ldmkit.pipeline import Pipeline
    from ldmkit.server.limits import ServerLimits
    from ldmkit.server.queue import GenerationQueue, OutOfMemory
    from support.tiny import make_tiny_components

    ldmkit.pipeline.check_memory = lambda *args: None  # skip the estimate that would refuse the job up front
    pipe = Pipeline(make_tiny_components(), torch.device("cuda"), torch.float16)
    queue = GenerationQueue(pipe, limits=ServerLimits(max_pixels=8192 * 8192, max_images=64))
    queue.start()
    quick = GenerationParams("a quick one", steps=2, width=64, height=64, seed=1)
    try:
        queue.submit(quick).future.result(timeout=120)
        allocated = torch.cuda.memory_allocated()
        huge = GenerationParams("too big", steps=1, width=8192, height=8192, num_images=64, seed=1)
        started = time.monotonic()
        try:
            queue.submit(huge).future.result(timeout=300)
            print("the huge job fit: no out-of-memory error to check")
        except OutOfMemory as exc:
            print(f"huge job: OutOfMemory after {time.monotonic() - started:.1f} s: {exc}")
        gib = 2**30
        print(
            f"allocated before / after: {allocated / gib:.3f} / {torch.cuda.memory_allocated() / gib:.3f} GiB; "
            f"reserved after: {torch.cuda.memory_reserved() / gib:.3f} GiB; "
            f"peak: {torch.cuda.max_memory_allocated() / gib:.1f} GiB"
        )
        started = time.monotonic()
        result = queue.submit(quick).future.result(timeout=120)
        print(f"next job: {len(result.images)} image(s) in {time.monotonic() - started:.2f} s")
    finally:
        queue.close()


# -- the report -----------------------------------------------------------------------------------


def summary(result: LoadResult) -> str:
    def mib(b):
        return "n/a" if b is None else f"{b / 2**20:.0f} MiB"

    rows = [
        ("requests", len(result.outcomes)),
        ("concurrency", result.concurrency),
        ("wall time", f"{result.wall_seconds:.1f} s"),
        ("answers by kind", ", ".join(f"{k}: {n}" for k, n in result.counts().items())),
        ("latency of 200s, p50 / p99", result.latency("200")),
        ("latency of 503s, p50 / p99", result.latency("503")),
        ("errors", len(result.errors())),
        (
            "server RSS before / peak / after",
            f"{mib(result.rss_before)} / {mib(result.rss_peak)} / {mib(result.rss_after)}",
        ),
        (
            "quick request after abandoning a running one",
            f"{result.freed_worker_seconds:.2f} s" if result.freed_worker_seconds else "n/a",
        ),
    ]
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


def failures(result: LoadResult, max_rss_growth: int | None) -> list[str]:
    problems = [f"request {o.index} ({o.api}): {o.kind}" for o in result.errors()]
    if len({o.index for o in result.outcomes if o.index >= 0}) != len(result.outcomes):
        problems.append("some request has no outcome, or two")
    if not any(o.kind == "200" for o in result.outcomes):
        problems.append("no request succeeded")
    if (
        max_rss_growth is not None
        and result.rss_after is not None
        and result.rss_after - result.rss_before > max_rss_growth
    ):
        problems.append(f"server RSS grew by {(result.rss_after - result.rss_before) / 2**20:.0f} MiB")
    return problems


def measure(
    url: str, pid: int | None, total: int, concurrency: int, disconnect_every: int, time_limit: float
) -> LoadResult:
    """Warm up, then the load with memory sampled, then the disconnect check."""
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"load tests target this machine only (127.0.0.1), not {host}")
    with httpx.Client(timeout=60) as client:
        for body in (a1111_body(-3), a1111_body(-4)):
            client.post(f"{url}/sdapi/v1/txt2img", json=body).raise_for_status()
    sampler = RssSampler(pid) if pid else contextlib.nullcontext()
    with sampler:
        rss_before = sampler.now() if pid else None
        result = asyncio.run(run_load(url, total, concurrency, disconnect_every, time_limit))
        result.freed_worker_seconds, result.abandoned_eta_seconds = check_worker_freed(url)
        with httpx.Client(timeout=60) as client:
            idle(client, url, 60)
    if pid:
        result.rss_before, result.rss_peak, result.rss_after = rss_before, sampler.peak, sampler.now()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (127.0.0.1 only); default: start one over the tiny model")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, for its memory")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--queue-size", type=int, default=8, help="of the started server (ldm serve's default: 8)")
    parser.add_argument(
        "--disconnect-every", type=int, default=15, help="every k-th client leaves mid-request (0: none)"
    )
    parser.add_argument(
        "--time-limit", type=float, default=600, help="seconds; requests still open then count as errors"
    )
    parser.add_argument("--max-rss-growth-mb", type=float, default=200)
    parser.add_argument("--json", type=Path, help="also write the outcomes here")
    parser.add_argument(
        "--cuda-oom-check", action="store_true", help="instead: a real CUDA out-of-memory error in the queue"
    )
    parser.add_argument("--serve-tiny", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cuda_oom_check:
        cuda_oom_check()
        return 0
    if args.serve_tiny:
        serve_tiny(args.serve_tiny, args.queue_size)
        return 0

    server = contextlib.nullcontext((args.url, args.pid)) if args.url else tiny_server(args.queue_size)
    with server as (url, pid):
        result = measure(url, pid, args.requests, args.concurrency, args.disconnect_every, args.time_limit)
    print(
        f"load test: {url}, queue size {args.queue_size if not args.url else '(the server s)'}, "
        f"{os.cpu_count()} CPU cores"
    )
    print(summary(result))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(o) for o in result.outcomes], indent=1))
    problems = failures(result, int(args.max_rss_growth_mb * 2**20))
    for problem in problems:
        print("FAIL:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
