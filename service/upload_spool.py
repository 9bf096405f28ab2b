"""Request bodies: refused while they arrive when too large, and kept out of memory.

The body is read here, below the app, before any route code runs: a body announced as too large
by Content-Length is refused before reading it, and one without stops being read as soon as it
passes the limit; either way the answer is a 413 `{error, detail}` and the route never runs.
(FastAPI's own `max_body_size` answers a too-large Content-Length with plain text, not our JSON.)

What arrives goes to a temporary file once it passes `spool_threshold_bytes`, so a slow or
stalled upload holds that much memory at most, not the megabytes it has sent: memory per
connection stays bounded whatever the client does, and how long it may take is the connection
guard's business (service/connections.py). The file is in the system's temporary directory
(TMPDIR; on a tmpfs that is memory again). Once the body is complete, the app reads it back from
there in chunks, as it would from the network.

Long recordings (`streamed_paths`, POST /v1/recordings) have their own, larger limit and are not
spooled here: the body passes through as it arrives (the route's multipart parser spools the
file to disk itself), counted; past the limit the app is told the client went away, its answer
is dropped and the 413 goes out instead.
"""
import tempfile

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response, too_large

# Multipart framing (boundaries, part headers, a user_id field) on top of the file itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
REPLAY_CHUNK_BYTES = 64 * 1024


class UploadSpool:
    def __init__(self, app: ASGIApp, max_file_bytes: int, spool_threshold_bytes: int,
                 streamed_paths: dict[str, int] | None = None):
        self.app = app
        self.max_file_bytes = max_file_bytes
        self.max_body_bytes = max_file_bytes + MULTIPART_OVERHEAD_BYTES
        self.spool_threshold_bytes = spool_threshold_bytes
        self.streamed_paths = streamed_paths or {}  # path -> its own file size limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        streamed_limit = self.streamed_paths.get(scope["path"].rstrip("/"))
        if streamed_limit is not None:
            await self._stream(scope, receive, send, streamed_limit)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(scope, receive, send)
            return
        # Written synchronously: appending a chunk of at most 64 KiB (uvicorn's read buffer) to
        # a file in the page cache takes microseconds, less than a hop to a worker thread.
        with tempfile.SpooledTemporaryFile(max_size=self.spool_threshold_bytes) as spool:
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    await self._refuse(scope, receive, send)
                    return
                spool.write(chunk)
                if not message.get("more_body", False):
                    break
            spool.seek(0)
            await self.app(scope, _replay(spool, receive), send)

    async def _stream(self, scope: Scope, receive: Receive, send: Send,
                      max_file_bytes: int) -> None:
        max_body = max_file_bytes + MULTIPART_OVERHEAD_BYTES
        declared = _content_length(scope)
        if declared is not None and declared > max_body:
            await self._refuse(scope, receive, send, max_file_bytes)
            return
        size, exceeded = 0, False

        async def counted() -> Message:
            nonlocal size, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            size += len(message.get("body", b""))
            if size > max_body:
                exceeded = True
                return {"type": "http.disconnect"}
            return message

        async def unless_exceeded(message: Message) -> None:
            if not exceeded:
                await send(message)

        await self.app(scope, counted, unless_exceeded)
        if exceeded:
            await self._refuse(scope, receive, send, max_file_bytes)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send,
                      max_file_bytes: int | None = None) -> None:
        err = too_large(max_file_bytes or self.max_file_bytes)
        # Connection: close, because the rest of the body is left unread on the socket.
        response = error_response(err.status_code, err.error, err.detail,
                                  headers={"Connection": "close"})
        await response(scope, receive, send)


def _replay(spool, receive: Receive) -> Receive:
    done = False

    async def replay() -> Message:
        nonlocal done
        if done:
            return await receive()  # after the body: wait for the disconnect, as a server would
        chunk = spool.read(REPLAY_CHUNK_BYTES)
        done = len(chunk) < REPLAY_CHUNK_BYTES
        return {"type": "http.request", "body": chunk, "more_body": not done}

    return replay


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
