"""The server: one FastAPI app holding the queue, both HTTP APIs, OpenAPI docs at /docs and the web UI at /."""

from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

import ldmkit
from ldmkit.errors import LdmError
from ldmkit.pipeline import Pipeline
from ldmkit.server import a1111, openai_api
from ldmkit.server.limits import DEFAULT_LIMITS, BodySizeLimit, ServerLimits
from ldmkit.server.origins import CrossOriginGuard
from ldmkit.server.queue import Cancelled, GenerationQueue, OutOfMemory, QueueFull


def create_app(
    pipe: Pipeline,
    queue_size: int = 8,
    ui: bool = True,
    limits: ServerLimits = DEFAULT_LIMITS,
    allowed_origins: tuple[str, ...] = (),
) -> FastAPI:
    """The app over an already loaded pipeline; its worker starts and stops with the app's lifespan.

    `limits` bounds what one request may ask for, the body size included. State-changing requests
    from web pages of other origins than this server's and `allowed_origins` are refused (403).
    """
    queue = GenerationQueue(pipe, max_waiting=queue_size, limits=limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start()
        try:
            yield
        finally:
            queue.close()

    app = FastAPI(title="ldmkit", version=ldmkit.__version__, lifespan=lifespan, description=_DESCRIPTION)
    app.state.queue = queue
    app.state.limits = limits
    app.add_middleware(
        BodySizeLimit, max_bytes=limits.max_body_bytes, error=error_response, in_flight=limits.max_body_bytes_in_flight
    )
    app.add_middleware(CrossOriginGuard, error=error_response, allowed_origins=allowed_origins)  # outermost
    _add_error_handlers(app)
    app.include_router(a1111.create_router(queue))
    app.include_router(openai_api.create_router(queue))
    if ui:
        import gradio as gr  # the heaviest import; API-only apps (and their tests) skip it

        from ldmkit.server.ui import CSS, build_ui

        gr.mount_gradio_app(
            app,
            build_ui(queue),
            path="/",
            max_file_size=limits.max_body_bytes,
            ssr_mode=False,
            footer_links=["api"],
            css=CSS,
        )
    return app


_DESCRIPTION = (
    "AUTOMATIC1111-compatible API under /sdapi/v1, OpenAI Images API under /v1, web UI at /. "
    "One worker runs the model; requests wait in a bounded queue (503 with Retry-After when full)."
)


def error_response(path: str, status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    """An error in the shape the path's clients parse: OpenAI's under /v1, AUTOMATIC1111's elsewhere."""
    if path.startswith("/v1/"):
        error_type = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": error_type, "param": None, "code": kind}}
    else:
        body = {"error": kind, "detail": message, "body": "", "errors": message}
    return JSONResponse(body, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LdmError)
    async def bad_request(request: Request, exc: LdmError):
        return error_response(request.url.path, 400, str(exc), type(exc).__name__)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull):
        return error_response(request.url.path, 503, str(exc), "QueueFull", {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(Cancelled)
    async def cancelled(request: Request, exc: Cancelled):
        return error_response(request.url.path, 503, f"request cancelled: {exc}", "Cancelled")

    @app.exception_handler(OutOfMemory)
    async def out_of_memory(request: Request, exc: OutOfMemory):
        # The worker has already freed the failed job's memory: the next request may well fit.
        return error_response(request.url.path, 503, str(exc), "OutOfMemory", {"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        if not request.url.path.startswith("/v1/"):
            return await request_validation_exception_handler(request, exc)  # what A1111 answers: FastAPI's 422
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in exc.errors())
        return error_response(request.url.path, 400, reasons, "invalid_value")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if not request.url.path.startswith("/v1/"):
            return await http_exception_handler(request, exc)
        return error_response(request.url.path, exc.status_code, str(exc.detail), "http_error", exc.headers)
