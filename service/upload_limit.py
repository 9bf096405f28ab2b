"""Refuse oversized request bodies while they arrive, not after.

The multipart parser would spool a whole upload to disk before any route code runs, so the
limit is enforced here, below the app: a body announced as too large by Content-Length is
refused before reading it, and a body without one stops being read as soon as it passes the
limit. Either way the answer is a 413 `{error, detail}` and the route never runs. (FastAPI's own
`max_body_size` answers a too-large Content-Length with plain text, not our JSON body.)

Long recordings (`streamed_paths`, POST /v1/recordings) have their own, larger limit and are not
read into memory here: the body passes through as it arrives (the multipart parser spools the
file to disk), counted; past the limit the app is told the client went away, its answer is
dropped and the 413 goes out instead.
"""
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response, too_large

# Multipart framing (boundaries, part headers, a user_id field) on top of the file itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


class UploadSizeLimit:
    def __init__(self, app: ASGIApp, max_file_bytes: int,
                 streamed_paths: dict[str, int] | None = None):
        self.app = app
        self.max_file_bytes = max_file_bytes
        self.max_body_bytes = max_file_bytes + MULTIPART_OVERHEAD_BYTES
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
        # Read the body up to the limit; the app then reads it from memory as usual. It would
        # hold the file in memory anyway to decode it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as a server would

        await self.app(scope, replay, send)

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


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
