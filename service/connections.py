"""Connection hygiene for `emoloop serve`: no client holds a connection, a descriptor or memory
for longer than the settings allow, whatever it sends or fails to send.

uvicorn's HTTP protocol (httptools) arms its idle timer only after a response, cancels it on
any byte, and reads request heads and bodies as slowly and as large as a client sends them. This
subclass, which `emoloop serve` gives uvicorn as its HTTP protocol, adds per connection:
- an idle deadline from the start (`api.keep_alive_timeout_s`), not only between requests;
- a deadline for each request head from its first byte (`api.header_timeout_s`) and a size
  limit on it (`api.max_header_bytes`: 431);
- a deadline for each body, extended by what arrives (`api.body_timeout_s` plus one second per
  `api.body_min_rate_bytes_s` bytes, at most `api.body_max_timeout_s`), counted whether or not
  the app reads that body;
- a cap on open connections per worker process (`api.max_connections`, lowered to fit the
  open-file limit): one more is answered 503 at once.
A cut-off client gets a JSON `{error, detail}` answer with `Connection: close` (408, 431, 503)
where a response can still be sent, before the connection is closed; an idle one is closed
without one, as HTTP/1.1 allows.
"""
import json
import resource
from functools import lru_cache
from http import HTTPStatus

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.fair_accept import worker_load
from service.metrics import CONNECTIONS_CUT, WORKER_CONNECTIONS
from storage.settings import ApiSettings, get_settings

# Descriptors kept free of connections: the database, model and clip files, logs, metrics.
RESERVED_DESCRIPTORS = 128
# After an error answer, how long the socket stays open before it is closed: a client that
# reads while it sends gets the answer instead of a reset.
LINGER_S = 0.5


def raise_open_file_limit() -> int:
    """The soft limit on open files raised to the hard one (worker processes inherit it):
    a 1,024 default would cap a worker at a few hundred connections. The new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # a container may refuse; the cap then fits the old limit
            pass
    return soft


def connection_cap(api: ApiSettings) -> int:
    """api.max_connections, lowered so that every connection can hold its socket and an upload's
    spool file without the process running out of descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return api.max_connections
    return max(1, min(api.max_connections, (soft - RESERVED_DESCRIPTORS) // 2))


@lru_cache(maxsize=1)
def _limits() -> tuple[ApiSettings, int]:
    api = get_settings().api
    return api, connection_cap(api)


def error_answer(status: int, error: str, detail: str, retry_after_s: int | None = None) -> bytes:
    """A complete HTTP/1.1 response in the API's error shape, ending the connection."""
    body = json.dumps({"error": error, "detail": detail}).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n")
    if retry_after_s is not None:
        head += f"retry-after: {retry_after_s}\r\n"
    return (head + "\r\n").encode() + body


class TimedFlowControl(FlowControl):
    """uvicorn's flow control, also counting how long it has kept reading paused (while the app
    had not taken what arrived): time a body's client could not send in."""

    def __init__(self, transport, loop):
        super().__init__(transport)
        self._loop = loop
        self._paused_s = 0.0
        self._paused_at = 0.0

    def pause_reading(self) -> None:
        if not self.read_paused:
            self._paused_at = self._loop.time()
        super().pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self._paused_s += self._loop.time() - self._paused_at
        super().resume_reading()

    def paused_seconds(self) -> float:
        ongoing = self._loop.time() - self._paused_at if self.read_paused else 0.0
        return self._paused_s + ongoing


class GuardedHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits, self.cap = _limits()
        # The current request head: bytes received since the read it began in (None between
        # heads), and the size of its URL and headers as parsed. Heads begun so far.
        self._head_bytes: int | None = None
        self._head_size = 0
        self._heads = 0
        self._head_timer = None
        # The current body: when it began, and how long reading had been paused by then.
        self._body_started = 0.0
        self._body_paused_before = 0.0
        self._body_received = 0
        self._body_timer = None
        self._ended = False  # an error answer was written; the rest of the input is ignored

    # The connection
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.flow = TimedFlowControl(transport, self.loop)
        self._count_connections()
        if len(self.connections) > self.cap:
            self._end(503, "over_capacity", "the server holds as many connections as it allows; "
                      "retry shortly", reason="over_capacity", retry_after_s=1)
            return
        # uvicorn arms this only after a response: a client that never sends would stay forever.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                            self.timeout_keep_alive_handler)

    def connection_lost(self, exc) -> None:
        self._stop_clock("_head_timer")
        self._stop_clock("_body_timer")
        super().connection_lost(exc)
        self._count_connections()

    def _count_connections(self) -> None:
        WORKER_CONNECTIONS.set(len(self.connections))
        load = worker_load()
        if load is not None:
            load.set_connections(len(self.connections))

    def data_received(self, data: bytes) -> None:
        if self._ended:
            return
        head_before = self._heads if self._head_bytes is not None else None
        super().data_received(data)
        # All of this read went to one head, begun before it and still unfinished. Counted
        # before httptools has a whole header to hand over: it buffers partial ones.
        same_head = self._head_bytes is not None and self._heads == head_before
        if same_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._end(431, "headers_too_large", f"the request headers are larger than "
                          f"{self.limits.max_header_bytes} bytes", reason="headers_too_large")

    # Parser callbacks: the head
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes, self._head_size = 0, 0
        self._heads += 1
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_too_slow)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._head_size += len(name) + len(value) + 4  # ": " and CRLF

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        self._stop_clock("_head_timer")
        if self._head_size > self.limits.max_header_bytes:  # it came whole, in one read
            self._end(431, "headers_too_large", f"the request headers are larger than "
                      f"{self.limits.max_header_bytes} bytes", reason="headers_too_large")
            return  # no app for it: the parser's later callbacks see `_ended` and do nothing
        super().on_headers_complete()
        if self._has_body():
            self._body_started, self._body_received = self.loop.time(), 0
            self._body_paused_before = self.flow.paused_seconds()
            self._body_timer = self.loop.call_at(self._body_deadline(), self._check_body_rate)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        self._end(408, "request_timeout", f"the request headers did not arrive within "
                  f"{self.limits.header_timeout_s:g} s", reason="header_timeout")

    # Parser callbacks: the body
    def on_body(self, body: bytes) -> None:
        if not self._ended:
            self._body_received += len(body)
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._stop_clock("_body_timer")
        if not self._ended:
            super().on_message_complete()

    def _has_body(self) -> bool:
        for name, value in self.headers:
            if name == b"content-length":
                return value.strip() not in (b"0", b"")
            if name == b"transfer-encoding":
                return True
        return False

    def _body_deadline(self) -> float:
        limits = self.limits
        allowed = limits.body_timeout_s + self._body_received / limits.body_min_rate_bytes_s
        # Time the server did not read (the app had not taken what arrived) is not counted.
        paused = self.flow.paused_seconds() - self._body_paused_before
        return self._body_started + paused + min(allowed, limits.body_max_timeout_s)

    def _check_body_rate(self) -> None:
        self._body_timer = None
        now = self.loop.time()
        deadline = self._body_deadline()
        if now < deadline:
            self._body_timer = self.loop.call_at(deadline, self._check_body_rate)
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started:  # too late for an answer: just close
            CONNECTIONS_CUT.labels("body_timeout").inc()
            self.transport.close()
            return
        if cycle is not None:
            cycle.disconnected = True  # the app's receive() now says the client is gone
            cycle.message_event.set()
        limits = self.limits
        self._end(408, "request_timeout", f"the request body arrived too slowly: a body has "
                  f"{limits.body_timeout_s:g} s plus 1 s per {limits.body_min_rate_bytes_s} "
                  f"bytes, at most {limits.body_max_timeout_s:g} s", reason="body_timeout")

    # Ending a connection
    def _end(self, status: int, error: str, detail: str, *, reason: str,
             retry_after_s: int | None = None) -> None:
        """Answer, stop reading, and close after LINGER_S (the answer goes out first)."""
        if self._ended or self.transport.is_closing():
            return
        self._ended = True
        CONNECTIONS_CUT.labels(reason).inc()
        self._unset_keepalive_if_required()
        self._stop_clock("_head_timer")
        self._stop_clock("_body_timer")
        self.transport.write(error_answer(status, error, detail, retry_after_s))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.pause_reading()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _stop_clock(self, name: str) -> None:
        timer = getattr(self, name)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)
