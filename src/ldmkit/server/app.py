"""The server: one FastAPI app holding the queue, both HTTP APIs, OpenAPI docs at /docs and the web UI at /."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware

import ldmkit
from ldmkit.errors import LdmError
from ldmkit.pipeline import Pipeline
from ldmkit.server import a1111, controlnet_api, openai_api
from ldmkit.server.limits import DEFAULT_LIMITS, BodySizeLimit, ServerLimits
from ldmkit.server.native_size import AS_IS, OversizePolicy
from ldmkit.server.origins import CrossOriginGuard
from ldmkit.server.queue import Cancelled, GenerationQueue, OutOfMemory, QueueFull
from ldmkit.styles import StyleLibrary


def create_app(
    pipe: Pipeline,
    queue_size: int = 8,
    ui: bool = True,
    limits: ServerLimits = DEFAULT_LIMITS,
    allowed_hosts: list[str] | None = None,
    allowed_origins: tuple[str, ...] = (),
    refiners: tuple[Pipeline, ...] = (),
    styles: StyleLibrary | None = None,
    oversize: OversizePolicy = AS_IS,
) -> FastAPI:
    """The app over an already loaded pipeline; its worker starts and stops with the app's lifespan.

    `limits` bounds what one request may ask for, the body size included. `allowed_hosts` are the Host
    headers answered (default: this machine's loopback names, so a web page cannot reach the server
    through a DNS name it rebinds to 127.0.0.1). `allowed_origins` are the web origins besides this
    server's own whose pages may call it: read its answers (CORS) and send requests that change state;
    state-changing requests from other origins' pages are refused (403). `refiners` are the models requests may
    name as their refiner besides the served one. `styles` are the prompt styles requests may name (default none).
    `oversize` says what becomes of requests far over the model's native size (ldmkit.server.native_size; default:
    run as asked).
    """
    queue = GenerationQueue(pipe, max_waiting=queue_size, limits=limits, refiners=refiners, oversize=oversize)
    ui_files = None
    if ui:
        from ldmkit.server.ui_files import UiFileCache

        ui_files = UiFileCache.create(limits.max_ui_cache_bytes, limits.max_ui_cache_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start()
        sweeper = asyncio.create_task(ui_files.sweep_forever()) if ui_files is not None else None
        try:
            yield
        finally:
            queue.close()
            if sweeper is not None:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
                ui_files.remove()

    app = FastAPI(title="ldmkit", version=ldmkit.__version__, lifespan=lifespan, description=_DESCRIPTION)
    app.state.queue = queue
    app.state.limits = limits
    app.state.styles = styles or StyleLibrary()
    app.state.options = a1111.server_options(pipe)  # A1111's settings, kept for the server's life
    app.add_middleware(
        BodySizeLimit, max_bytes=limits.max_body_bytes, error=error_response, in_flight=limits.max_body_bytes_in_flight
    )
    # Our own CORS policy also switches off Gradio's, which lets any localhost origin read with credentials.
    app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(CrossOriginGuard, error=error_response, allowed_origins=allowed_origins)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or LOOPBACK_HOSTS)  # outermost
    _add_error_handlers(app)
    app.include_router(a1111.create_router(queue, app.state.styles, app.state.options))
    app.include_router(controlnet_api.create_router(queue))
    app.include_router(openai_api.create_router(queue))
    if ui:
        from ldmkit.server.ui import mount_ui  # Gradio is the heaviest import; API-only apps skip it

        mount_ui(app, queue)
    return app


LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


def allowed_hosts_for(bind_host: str, extra: list[str] | None = None) -> list[str]:
    """The Host headers a server listening on `bind_host` answers: loopback names, the address itself, `extra`.

    On a wildcard address (0.0.0.0, ::) the names clients use cannot be known: every host is answered
    unless `extra` lists them.
    """
    if extra:
        return LOOPBACK_HOSTS + list(extra)
    try:
        if ipaddress.ip_address(bind_host).is_unspecified:
            return ["*"]
    except ValueError:
        pass  # a name such as "localhost" or "myhost.lan"
    return LOOPBACK_HOSTS + [bind_host]


_DESCRIPTION = (
    "AUTOMATIC1111-compatible API under /sdapi/v1, OpenAI Images API under /v1, web UI at /. "
    "One worker runs the model; requests wait in a bounded queue (503 with Retry-After when full)."
)


def error_response(
    path: str, status: int, message: str, kind: str, headers: dict | None = None, param: str | None = None
) -> JSONResponse:
    """An error in the shape the path's clients parse: OpenAI's under /v1, AUTOMATIC1111's elsewhere."""
    if path.startswith("/v1/"):
        error_type = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": error_type, "param": param, "code": kind}}
    else:
        body = {"error": kind, "detail": message, "body": "", "errors": message}
    return JSONResponse(body, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LdmError)
    async def bad_request(request: Request, exc: LdmError):
        # 400, or the status an error of the OpenAI routes carries (404 model/path, 405 with its Allow header)
        allowed = getattr(exc, "allowed", None)
        headers = {"Allow": ", ".join(allowed)} if allowed else None
        status, param = getattr(exc, "status", 400), getattr(exc, "param", None)
        return error_response(request.url.path, status, str(exc), type(exc).__name__, headers, param)

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
