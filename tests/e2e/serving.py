"""Test support: a real uvicorn server on a free 127.0.0.1 port, serving the tiny random model."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import torch
import uvicorn
from conftest import make_tiny_components

from ldmkit.pipeline import Pipeline
from ldmkit.server.app import create_app


class GatedPipeline(Pipeline):
    """The tiny model, which a test can slow down or hold mid-generation (as a big model would be)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()  # cleared: every step waits until the test sets it
        self.gate.set()
        self.step_seconds = 0.0
        self.hold_at_step: int | None = None  # this step closes the gate: the job waits there for the test
        self.held = threading.Event()  # set when a job is held at hold_at_step

    def hold(self, at_step: int) -> None:
        self.held.clear()
        self.hold_at_step = at_step

    def release(self) -> None:
        self.hold_at_step = None
        self.gate.set()

    def run(self, params, callback=None, should_stop=None):
        def slowed(step):
            if step.step == self.hold_at_step:
                self.gate.clear()
                self.held.set()
            self.gate.wait(timeout=30)
            time.sleep(self.step_seconds)
            if callback is not None:
                callback(step)

        return super().run(params, slowed, should_stop)


def tiny_pipeline(**kwargs) -> GatedPipeline:
    return GatedPipeline(make_tiny_components(), torch.device("cpu"), torch.float32, **kwargs)


@contextlib.contextmanager
def serve(app, **config):
    """Run `app` under uvicorn in a thread (uvicorn.Config takes `config`); yield its base URL; stop it on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, **config)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextlib.contextmanager
def serve_tiny(pipe_kwargs: dict | None = None, **app_kwargs):
    """(base URL, pipeline, app) of a server over a fresh tiny pipeline (Pipeline takes `pipe_kwargs`)."""
    pipe = tiny_pipeline(**(pipe_kwargs or {}))
    app = create_app(pipe, **app_kwargs)
    with serve(app) as url:
        yield url, pipe, app
