"""uvicorn's HTTP/1.1 protocol with a read deadline: a client has `read_timeout_s` to send a whole request.

uvicorn times out idle keep-alive connections, but not a client that connects and then sends its request
line, headers or body slowly (or never): each such connection holds a socket and its buffers for as long as
the client likes. Here the clock starts when a connection opens, and again when the first byte of each
further request arrives; it stops when the request's last byte is in. A client past the deadline gets
408 (error type `request_timeout`) when no response has started, and its connection is closed; a handler
waiting for the rest of the body sees the client as gone.
"""

from __future__ import annotations

import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.teacher.app import error_body

log = logging.getLogger("tropd.teacher")


def _408(timeout_s: float) -> bytes:
    message = f"the request was not received in full within {timeout_s:g} s"
    body = json.dumps(error_body("request_timeout", message)).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class DeadlineH11Protocol(H11Protocol):
    """H11Protocol plus the read deadline; `with_read_timeout` makes a subclass with the value set."""

    read_timeout_s: float = 30.0
    on_timeout = None  # optional callable(), e.g. a metrics counter

    @classmethod
    def with_read_timeout(cls, seconds: float, on_timeout=None) -> type[DeadlineH11Protocol]:
        return type(cls.__name__, (cls,), {"read_timeout_s": seconds, "on_timeout": staticmethod(on_timeout)})

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._read_timer = None
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._read_timer is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first byte of a further request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()  # the request is in (or the connection is closing)

    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        log.warning(json.dumps({"event": "request_timeout", "client": client, "timeout_s": self.read_timeout_s}))
        if self.on_timeout is not None:
            self.on_timeout()
        reading_body = self.conn.their_state is h11.SEND_BODY  # else: the request line or headers
        if not reading_body or not self.cycle.response_started:
            self.transport.write(_408(self.read_timeout_s))
        if reading_body:
            self.cycle.disconnected = True  # the handler waiting in receive() gets http.disconnect
            self.cycle.message_event.set()
        self.transport.close()
