"""API keys: `Authorization: Bearer KEY`. Any valid key may predict and read and correct its own
predictions; admin endpoints need a key with the admin role.

A verified key is remembered for `KEY_CACHE_SECONDS`, so the hot paths (predict, feedback) do
not pay a database read and a thread hop for every request; a revoked key therefore stops
working within that time. Keys that fail are never remembered: each try is checked.
"""
import threading
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.errors import ApiError, unauthorized
from storage.api_keys import ApiKeyRepository, hash_key

KEY_CACHE_SECONDS = 5.0

# auto_error=False: a missing header gets our 401 body, not FastAPI's 403.
bearer = HTTPBearer(auto_error=False, description="An emoloop API key")


@dataclass(frozen=True)
class Caller:
    """Who sent the request: the key's id (the app), name and role."""

    key_id: int
    name: str
    role: str


class KeyVerifier:
    def __init__(self, read_session_factory: sessionmaker[Session]):
        self.read_session_factory = read_session_factory
        self._verified: dict[str, tuple[Caller, float]] = {}  # key hash -> caller, expiry
        self._lock = threading.Lock()

    async def verify(self, plaintext: str) -> Caller | None:
        digest = hash_key(plaintext)
        cached = self._verified.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        caller = await run_in_threadpool(self._lookup, plaintext)
        if caller is not None:
            with self._lock:
                self._verified[digest] = (caller, time.monotonic() + KEY_CACHE_SECONDS)
        return caller

    def _lookup(self, plaintext: str) -> Caller | None:
        with self.read_session_factory() as session:
            key = ApiKeyRepository(session).verify(plaintext)
            return Caller(key.id, key.name, key.role) if key is not None else None


async def current_caller(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
    if credentials is None:
        raise unauthorized("missing API key: send `Authorization: Bearer KEY`")
    caller = await request.app.state.key_verifier.verify(credentials.credentials)
    if caller is None:
        raise unauthorized("the API key is not valid or was revoked")
    return caller


async def admin_caller(caller: Annotated[Caller, Depends(current_caller)]) -> Caller:
    if caller.role != "admin":
        raise ApiError(403, "forbidden", "this endpoint needs an admin key")
    return caller


CurrentKey = Annotated[Caller, Depends(current_caller)]
AdminKey = Annotated[Caller, Depends(admin_caller)]
