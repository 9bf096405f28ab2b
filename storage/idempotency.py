"""What makes POSTs idempotent: the first answer to a request sent with an `Idempotency-Key`,
kept per caller for a window, so that a repeat is answered the same without doing the work twice.

The request with a new key claims it (a row without an answer yet); when it is answered, its
answer is stored in the row. A repeat finds the answer and gets it back; a repeat while the first
one runs is told so. A claim left without an answer (its process died, or it failed with a
server error and gave the claim back) does not block the key: after `stale_after_s` a repeat
takes it over and runs.

Works in the caller's Session and never commits, like the other repositories.
"""
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.models import IdempotentRequest, utcnow

_CLAIM = {dialect.__name__.rsplit(".", 1)[-1]: dialect.insert(IdempotentRequest)
          .on_conflict_do_nothing(index_elements=[IdempotentRequest.caller_hash,
                                                  IdempotentRequest.key])
          .returning(IdempotentRequest.id)
          for dialect in (sqlite, postgresql)}


@dataclass(frozen=True)
class Claim:
    """What a request with a key may do: `run` (claim_id is ours to complete or release),
    `replay` (the stored answer), or `busy` (the first request is still running)."""
    outcome: str
    claim_id: int | None = None
    stored: IdempotentRequest | None = None


class IdempotentRequestRepository:
    def __init__(self, session: Session):
        self.session = session

    def claim(self, caller_hash: str, key: str, method: str, path: str, *, window_s: float,
              stale_after_s: float) -> Claim:
        now = utcnow()
        # Answers older than the window are forgotten (the index on created_at keeps this cheap).
        expired = IdempotentRequest.created_at < now - timedelta(seconds=window_s)
        self.session.execute(delete(IdempotentRequest).where(expired)
                             .execution_options(synchronize_session=False))
        connection = self.session.connection()
        # On PostgreSQL a concurrent first request's uncommitted claim makes this wait for it.
        claim_id = connection.execute(_CLAIM[connection.dialect.name], {
            "caller_hash": caller_hash, "key": key, "method": method, "path": path,
            "created_at": now}).scalar_one_or_none()
        if claim_id is not None:
            return Claim("run", claim_id)
        stored = self.session.scalars(
            select(IdempotentRequest).where(IdempotentRequest.caller_hash == caller_hash,
                                            IdempotentRequest.key == key)
            .execution_options(populate_existing=True)).one()
        if stored.status_code is not None:
            return Claim("replay", stored=stored)
        stale = now - timedelta(seconds=stale_after_s)
        if stored.created_at >= stale:
            return Claim("busy")
        # Nobody answered it in time: take it over, unless another repeat just did.
        taken = self.session.execute(
            update(IdempotentRequest)
            .where(IdempotentRequest.id == stored.id, IdempotentRequest.created_at < stale,
                   IdempotentRequest.status_code.is_(None))
            .values(created_at=now, method=method, path=path)
            .execution_options(synchronize_session=False))
        return Claim("run", stored.id) if taken.rowcount == 1 else Claim("busy")

    def complete(self, claim_id: int, *, status_code: int, content_type: str | None,
                 body: str, body_sha256: str | None) -> None:
        """Store the answer a claimed request gave."""
        self.session.execute(
            update(IdempotentRequest).where(IdempotentRequest.id == claim_id)
            .values(status_code=status_code, content_type=content_type, response_body=body,
                    body_sha256=body_sha256)
            .execution_options(synchronize_session=False))

    def release(self, claim_id: int) -> None:
        """Give a claim back unanswered (the request failed in a way a retry may not): the next
        request with the key runs."""
        self.session.execute(
            delete(IdempotentRequest).where(IdempotentRequest.id == claim_id,
                                            IdempotentRequest.status_code.is_(None))
            .execution_options(synchronize_session=False))
