"""`Idempotency-Key` on POSTs: a repeat within `api.idempotency_window_s` gets the first answer.

A client that retries after a dropped connection cannot know whether its first request was done;
with the same key on both, the work is done once and both get the same answer (the repeat marked
`Idempotent-Replayed: true`). Keys are per caller (the hash of its Authorization header), so one
app's keys never meet another's.

- A repeat while the first request still runs: 409 `idempotency_key_in_use`, with Retry-After.
- The same key on another method or path, or with another JSON body: 422
  `idempotency_key_reused`. Multipart bodies are not compared: clients build a new random
  boundary for every try, so the same upload never has the same bytes twice.
- Answers are kept for 2xx and 4xx; a 5xx (or 408, 409, 429) gives the key back, so the retry
  runs again, which is what a retry after a server-side failure wants.

A server killed between committing the work and storing its answer leaves a claim without one;
after `STALE_AFTER_S` a repeat runs again. For corrections that is harmless (the same correction
again stores nothing, see storage.repositories.FeedbackRepository).
"""
import hashlib
import logging

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response, storage_failure
from service.group_commit import GroupCommitWriter
from storage.idempotency import Claim, IdempotentRequestRepository

log = logging.getLogger("emoloop.service")

HEADER = b"idempotency-key"
MAX_KEY_LENGTH = 255
# A claim unanswered this long belongs to a request that died with its process: a repeat may run.
STALE_AFTER_S = 120.0
MAX_STORED_BODY_BYTES = 1024 * 1024  # answers are small JSON; a bigger one is not kept
_NOT_KEPT = {408, 409, 429}


class IdempotencyKeys:
    def __init__(self, app: ASGIApp, writer: GroupCommitWriter, window_s: float):
        self.app, self.writer, self.window_s = app, writer, window_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"]) if scope["type"] == "http" else {}
        key = headers.get(HEADER)
        if scope["type"] != "http" or scope["method"] != "POST" or key is None \
                or b"authorization" not in headers:
            await self.app(scope, receive, send)  # no key, or no caller to keep it for
            return
        key_text = key.decode("latin-1").strip()
        if not 0 < len(key_text) <= MAX_KEY_LENGTH or not key_text.isprintable():
            await _drain(receive)
            await error_response(400, "invalid_idempotency_key",
                                 f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable "
                                 "characters")(scope, receive, send)
            return
        caller = hashlib.sha256(headers[b"authorization"]).hexdigest()
        method, path = scope["method"], scope["path"]
        try:
            claim = await self.writer.write(lambda session: IdempotentRequestRepository(
                session).claim(caller, key_text, method, path, window_s=self.window_s,
                               stale_after_s=STALE_AFTER_S))
        except Exception as err:
            failure = storage_failure(err)
            if failure is None:
                raise
            await _drain(receive)
            await error_response(failure.status_code, failure.error, failure.detail,
                                 failure.headers)(scope, receive, send)
            return
        if claim.outcome == "run":
            await self._run(claim.claim_id, _is_json(headers), scope, receive, send)
        else:
            digest = hashlib.sha256() if _is_json(headers) else None
            await _drain(receive, digest)
            await _answer_repeat(claim, method, path,
                                 digest.hexdigest() if digest else None)(scope, receive, send)

    async def _run(self, claim_id: int, json_body: bool, scope: Scope, receive: Receive,
                   send: Send) -> None:
        digest = hashlib.sha256() if json_body else None
        start: Message | None = None
        body = bytearray()
        body_read = False

        async def hashing_receive() -> Message:
            nonlocal body_read
            message = await receive()
            if message["type"] == "http.request":
                if digest is not None:
                    digest.update(message.get("body", b""))
                body_read = not message.get("more_body", False)
            return message

        async def capturing_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body" and len(body) <= MAX_STORED_BODY_BYTES:
                body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, hashing_receive, capturing_send)
        except BaseException:
            await self._give_back(claim_id)
            raise
        if not body_read:  # answered before reading it all (a 401): the rest counts too
            await _drain(receive, digest)
        status = start["status"] if start is not None else 500
        content_type = dict(start["headers"]).get(b"content-type", b"").decode("latin-1") \
            if start is not None else None
        if status >= 500 or status in _NOT_KEPT or len(body) > MAX_STORED_BODY_BYTES:
            await self._give_back(claim_id)
            return
        try:
            text = bytes(body).decode("utf-8")
            await self.writer.write(lambda session: IdempotentRequestRepository(
                session).complete(claim_id, status_code=status, content_type=content_type,
                                  body=text, body_sha256=digest.hexdigest() if digest else None))
        except Exception:
            # The client has its answer; without the stored copy a repeat runs again later.
            log.exception("could not store the answer for an Idempotency-Key")

    async def _give_back(self, claim_id: int) -> None:
        try:
            await self.writer.write(lambda session: IdempotentRequestRepository(
                session).release(claim_id))
        except Exception:
            log.exception("could not release an Idempotency-Key; a repeat runs after %ss",
                          STALE_AFTER_S)


def _answer_repeat(claim: Claim, method: str, path: str, body_sha256: str | None):
    if claim.outcome == "busy":
        return error_response(409, "idempotency_key_in_use",
                              "a request with this Idempotency-Key is still being answered; "
                              "retry shortly", headers={"Retry-After": "1"})
    stored = claim.stored
    if (stored.method, stored.path, stored.body_sha256) != (method, path, body_sha256):
        return error_response(422, "idempotency_key_reused",
                              "this Idempotency-Key was used for a different request")
    return Response(stored.response_body, status_code=stored.status_code,
                    media_type=stored.content_type or None,
                    headers={"Idempotent-Replayed": "true"})


def _is_json(headers: dict[bytes, bytes]) -> bool:
    return headers.get(b"content-type", b"").split(b";")[0].strip().lower() \
        == b"application/json"


async def _drain(receive: Receive, digest=None) -> None:
    """Read the request body to its end (so the connection stays usable), adding it to `digest`
    when one is given and keeping nothing else."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        if digest is not None:
            digest.update(message.get("body", b""))
        if not message.get("more_body", False):
            return
