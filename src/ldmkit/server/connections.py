"""Connections: the listening socket, and deadlines for slow clients at the HTTP protocol itself.

uvicorn closes idle keep-alive connections, but a client that sends its request head or body a few
bytes at a time ("slowloris") holds its connection, and the memory of what it sent so far, for as
long as it keeps trickling. The app never sees such a request (its head is incomplete), so this is
done below it: uvicorn's h11 protocol with two deadlines, from ServerLimits.
"""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ldmkit.errors import InvalidRequest, LdmError
from ldmkit.server.limits import ServerLimits


class DeadlineH11Protocol(H11Protocol):
    """h11 with deadlines: a request's head must be complete `header_seconds` after the connection
    opened (or after the previous response, on a kept-alive connection), and its body `body_seconds`
    after the head. A client that misses one is disconnected; the app sees it as a client that left."""

    header_seconds: float = ServerLimits.max_header_seconds
    body_seconds: float = ServerLimits.max_body_seconds

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._reading_body = False
        self._timed_cycle = None  # the request whose body the deadline is for
        super().connection_made(transport)
        self._start_deadline(self.header_seconds)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._timed_cycle:  # a new request's head arrived
            self._timed_cycle, self._reading_body = self.cycle, True
            self._start_deadline(self.body_seconds)
        if self._reading_body and not self.cycle.more_body:  # and now all of its body
            self._reading_body = False
            self._stop_deadline()

    def on_response_complete(self) -> None:
        # Before uvicorn's own handler, which may go on to parse a pipelined request's head.
        self._reading_body = False
        self._start_deadline(self.header_seconds)
        super().on_response_complete()

    def handle_websocket_upgrade(self, event) -> None:
        self._stop_deadline()  # the connection now belongs to the websocket protocol
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def _start_deadline(self, seconds: float) -> None:
        self._stop_deadline()
        self._deadline = self.loop.call_later(seconds, self._too_slow)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            what = "body" if self._reading_body else "request head"
            self.logger.info("closing a connection that did not send its %s in time", what)
            self.transport.close()


def protocol_for(limits: ServerLimits) -> type[DeadlineH11Protocol]:
    """The protocol class with the deadlines of these limits (uvicorn takes a class, not an instance)."""
    return type(
        "DeadlineH11Protocol",
        (DeadlineH11Protocol,),
        {"header_seconds": limits.max_header_seconds, "body_seconds": limits.max_body_seconds},
    )


def uvicorn_config(app, limits: ServerLimits, **kwargs) -> uvicorn.Config:
    """uvicorn's configuration for ldmkit's app: h11 with the deadlines of `limits`."""
    return uvicorn.Config(app, http=protocol_for(limits), **kwargs)


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind host:port now, so that a bad port or one in use is a one-line error before the model loads."""
    if not 0 <= port <= 65535:
        raise InvalidRequest(f"--port must be from 0 to 65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as error:
        raise LdmError(f"cannot listen on {host}: {error.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise LdmError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock
