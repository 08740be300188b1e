"""Cross-origin writes are refused: a web page elsewhere must not drive this server through a visitor's browser.

A browser lets any page send a form-encoded or plain-text POST to any address, with no CORS preflight
first, so a page on http://evil.example could interrupt or queue jobs on a server at 127.0.0.1. The
browser does say where the request comes from, in its Origin header: a request that changes state
(any method but GET, HEAD and OPTIONS), or opens a websocket, is answered 403 unless its Origin is
this server's own (same host and port as the Host header it was sent to) or one of the origins the
server was started with (`ldm serve --allowed-origin`, e.g. behind a reverse proxy that rewrites the
Host). Requests without an Origin (curl, the openai and requests packages) are not from a browser
page and pass.
"""

from __future__ import annotations

from urllib.parse import urlsplit

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalize_origin(origin: str) -> str | None:
    """'HTTP://Example.com' -> 'http://example.com:80'; None for what is no http(s) origin ('null', a path)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        return None
    return f"{parts.scheme}://{parts.hostname}:{port or DEFAULT_PORTS[parts.scheme]}"


def same_origin(origin: str, host: str) -> bool:
    """Is `origin` the one a page served from this Host header has? A missing port is the scheme's default."""
    normalized = normalize_origin(origin)
    if normalized is None:
        return False
    scheme = normalized.split(":", 1)[0]
    return normalize_origin(f"{scheme}://{host}") == normalized


class CrossOriginGuard:
    """ASGI middleware: 403 for state-changing requests and websockets from another origin."""

    def __init__(self, app, error, allowed_origins: tuple[str, ...] = ()):
        self.app = app
        self.error = error  # error(path, status, message, kind) -> Response
        self.allowed = {normalize_origin(origin) for origin in allowed_origins} - {None}

    async def __call__(self, scope, receive, send):
        guarded = scope["type"] == "websocket" or (scope["type"] == "http" and scope["method"] not in SAFE_METHODS)
        if guarded:
            headers = dict(scope["headers"])
            origin = headers.get(b"origin", b"").decode("latin-1")
            host = headers.get(b"host", b"").decode("latin-1")
            if origin and not (same_origin(origin, host) or normalize_origin(origin) in self.allowed):
                if scope["type"] == "websocket":
                    return await send({"type": "websocket.close", "code": 1008})  # the handshake gets a 403
                message = (
                    f"cross-origin request refused: Origin {origin[:100]!r} is not this server's; "
                    "a server started with --allowed-origin ORIGIN accepts that origin too"
                )
                return await self.error(scope["path"], 403, message, "CrossOriginRefused")(scope, receive, send)
        await self.app(scope, receive, send)
