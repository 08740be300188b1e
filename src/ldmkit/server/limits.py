"""Request body size limit, as ASGI middleware: checked from Content-Length, and counted for chunked bodies.

Not FastAPI's own max_body_size: that answers an oversized declared body in plain text, and each
API's clients parse their own error shape (OpenAI's under /v1).
"""

from __future__ import annotations


class BodySizeLimit:
    def __init__(self, app, max_bytes: int, error):
        self.app = app
        self.max_bytes = max_bytes
        self.error = error  # error(path, status, message, kind) -> Response

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = self.error(scope["path"], 413, f"request body is over the {self.max_bytes} byte limit", "BodyTooLarge")
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
