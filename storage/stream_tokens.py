"""Single-use, short-lived tickets for live streams. Browsers cannot set headers on a WebSocket
and keys never travel in URLs, so an app asks for a ticket with its key (POST /v1/streams) and
the socket presents the ticket in its first message. Only the ticket's sha256 is stored."""
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.api_keys import hash_key
from storage.models import StreamToken, utcnow

TOKEN_PREFIX = "emst_"


@dataclass(frozen=True)
class StreamTicket:
    api_key_id: int
    user_id: str | None
    sample_rate: int


class StreamTokenRepository:
    def __init__(self, session: Session):
        self.session = session

    def create(self, *, api_key_id: int, user_id: str | None, sample_rate: int,
               ttl_s: float) -> tuple[str, StreamToken]:
        """A new ticket; returns the plaintext (shown once) and the row."""
        plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = utcnow()
        row = StreamToken(token_hash=hash_key(plaintext), api_key_id=api_key_id,
                          user_id=user_id, sample_rate=sample_rate, created_at=now,
                          expires_at=now + timedelta(seconds=ttl_s))
        self.session.add(row)
        self.session.flush()
        return plaintext, row

    def redeem(self, plaintext: str) -> StreamTicket | None:
        """Use a ticket: its details the first time, before it expires; None when it is
        unknown, expired or used already. One conditional UPDATE, so two sockets racing with
        the same ticket cannot both get it."""
        digest, now = hash_key(plaintext), utcnow()
        used = self.session.execute(update(StreamToken).where(
            StreamToken.token_hash == digest, StreamToken.used_at.is_(None),
            StreamToken.expires_at > now).values(used_at=now)
            .execution_options(synchronize_session=False))
        if used.rowcount != 1:
            return None
        row = self.session.execute(select(StreamToken.api_key_id, StreamToken.user_id,
                                          StreamToken.sample_rate)
                                   .where(StreamToken.token_hash == digest)).one()
        return StreamTicket(row.api_key_id, row.user_id, row.sample_rate)
