"""Which model answers a user: their active personal version, on the global version it was built
on, or None (then the active global one answers).

Three bounded caches, all least-recently-used:
- user -> their active personal version (or none), trusted for `ttl_s`, so an activation or a
  deletion made by another process is served within that time (one indexed read a user per TTL);
- personal version -> its head (a few KB), at most `cache_size` of them: what bounds memory
  however many users exist. A head is loaded on demand: one small file, checked against its
  sha256;
- global version -> loaded network, for personal versions built on a global version that no
  longer serves (at most `global_cache_size`; the serving one is never duplicated here). When the
  global model moves on, each personal version keeps answering on the network it was trained on
  until the next personal round rebuilds it on the new one.

A personal version that cannot be loaded (file missing or corrupt, its global version
unloadable) is logged once and its user is answered by the global model: a broken personal file
never fails a request.
"""
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from learner.inference import EmotionPredictor
from learner.personal.model import PersonalHead, PersonalPredictor, personal_head_from_bytes
from storage.artifacts import ArtifactStore
from storage.models import ModelVersion

log = logging.getLogger("emoloop.engine")
K = TypeVar("K")
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """A dict bounded to `max_items`, dropping the least recently used; thread-safe."""

    def __init__(self, max_items: int):
        self.max_items = max(1, int(max_items))
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def pop(self, key: K) -> None:
        with self._lock:
            self._items.pop(key, None)

    def values(self) -> list[V]:
        with self._lock:
            return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class ActivePersonal:
    """A user's active personal version as the registry has it."""
    version: int
    artifact_path: str
    sha256: str


@dataclass(frozen=True)
class _Resolution:
    active: ActivePersonal | None
    expires_at: float


class PersonalModels:
    def __init__(self, session_factory: sessionmaker[Session], artifacts: ArtifactStore, *,
                 load_global: Callable[[int], EmotionPredictor], cache_size: int,
                 global_cache_size: int, ttl_s: float):
        self.session_factory = session_factory
        self.artifacts = artifacts
        self.load_global = load_global
        self.ttl_s = ttl_s
        self.heads: LRUCache[int, PersonalHead] = LRUCache(cache_size)
        # Entries are a few dozen bytes; many more users than heads fit in the same memory.
        self.users: LRUCache[str, _Resolution] = LRUCache(8 * cache_size)
        self.globals: LRUCache[int, EmotionPredictor] = LRUCache(global_cache_size)
        self._broken: set[int] = set()  # personal versions that failed to load; logged once

    def model_for(self, user_id: str, serving_version: int,
                  serving: EmotionPredictor) -> tuple[int, PersonalPredictor] | None:
        """(personal version, its predictor) for this user, or None: then the global version
        serving now answers."""
        active = self._active(user_id)
        if active is None or active.version in self._broken:
            return None
        try:
            head = self._head(active)
            base = serving if head.parent_version == serving_version else \
                self._global(head.parent_version)
            return active.version, PersonalPredictor(base, head)
        except RuntimeError as err:  # ArtifactError, ModelFileError, the engine's ModelLoadError
            self._broken.add(active.version)
            log.error("personal model version %s cannot be served (%s); its user gets the "
                      "global model", active.version, err)
            return None

    def forget(self, user_id: str) -> None:
        """Drop what this process remembers of a user (after an activation, a deletion)."""
        self.users.pop(user_id)

    def cached_head_bytes(self) -> int:
        return sum(head.nbytes for head in self.heads.values())

    def _active(self, user_id: str) -> ActivePersonal | None:
        now = time.monotonic()
        resolved = self.users.get(user_id)
        if resolved is None or resolved.expires_at <= now:
            resolved = _Resolution(self._read_active(user_id), now + self.ttl_s)
            self.users.put(user_id, resolved)
        return resolved.active

    def _read_active(self, user_id: str) -> ActivePersonal | None:
        with self.session_factory() as session:
            row = session.execute(
                select(ModelVersion.version, ModelVersion.artifact_path, ModelVersion.sha256)
                .where(ModelVersion.scope == "user", ModelVersion.user_id == user_id,
                       ModelVersion.status == "active")).one_or_none()
            session.commit()
        return ActivePersonal(*row) if row is not None else None

    def _head(self, active: ActivePersonal) -> PersonalHead:
        head = self.heads.get(active.version)
        if head is None:
            data = self.artifacts.read_checked(active.artifact_path, active.sha256)
            head = personal_head_from_bytes(data, expected_sha256=active.sha256)
            self.heads.put(active.version, head)
        return head

    def _global(self, version: int) -> EmotionPredictor:
        model = self.globals.get(version)
        if model is None:
            model = self.load_global(version)
            self.globals.put(version, model)
        return model
