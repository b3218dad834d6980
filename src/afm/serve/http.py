"""The HTTP/1.1 connection handler under `afm serve`: uvicorn's h11 protocol with two changes for a
server on an open port.

- A request that is not valid HTTP gets the same JSON error envelope as every other error, instead of
  uvicorn's plain-text "Invalid HTTP request received.".
- A client must finish sending a request's headers within `header_timeout` seconds of starting them
  (a slow-header, "slowloris", client otherwise holds its connection open forever); it then gets a 408
  and the connection closes. Idle keep-alive connections are closed by uvicorn's own keep-alive timeout.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

from uvicorn.protocols.http.h11_impl import H11Protocol

from afm.errors import ConfigError
from afm.serve.limits import HEADER_TIMEOUT_S


def error_response(status: int, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 response carrying OpenAI's error envelope, closing the connection."""
    kind = "timeout_error" if status == 408 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


class AFMHttpProtocol(H11Protocol):
    header_timeout: float = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers():  # the first bytes of a request (or of the next one on a kept-alive connection)
            self._arm_header_timer()
        super().data_received(data)
        if not self._awaiting_headers():  # the headers are in: the request is the application's now
            self._disarm_header_timer()

    def send_400_response(self, msg: str) -> None:
        self._disarm_header_timer()
        self.transport.write(error_response(
            400, "malformed HTTP request: its request line or headers could not be parsed as HTTP/1.1, or "
            "the headers are over 16 KiB", "malformed_http_request"))
        self.transport.close()

    # ---- the header timer -----------------------------------------------------------------------

    def _awaiting_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._awaiting_headers():
            return
        self.transport.write(error_response(
            408, f"the request's headers did not arrive within {self.header_timeout:g} seconds", "request_timeout"))
        self.transport.close()


def protocol_class(header_timeout: float = HEADER_TIMEOUT_S) -> type[AFMHttpProtocol]:
    """The protocol class for `uvicorn.Config(http=...)`, with this header timeout."""
    if not header_timeout > 0:
        raise ConfigError(f"header_timeout must be > 0 seconds, got {header_timeout}")
    return type("AFMHttpProtocol", (AFMHttpProtocol,), {"header_timeout": float(header_timeout)})
