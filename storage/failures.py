"""Telling an infrastructure failure of the store from a bug.

A database locked past its busy timeout, a database server that is away, a full or read-only
disk: none is the request's fault or the code's, and each passes once the operator (or time)
fixes it. `classify` names them, so the API can answer 503/507 with Retry-After instead of a 500,
and the group-commit writer can fail a whole batch at once instead of retrying each write into
the same wall.
"""
import errno
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import DBAPIError, OperationalError

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
UNWRITABLE_ERRNOS = {errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}
_FULL_MESSAGES = ("database or disk is full", "no space left on device", "disk full")


@dataclass(frozen=True)
class StoreFailure:
    full: bool  # out of disk space (507) rather than unavailable (503)
    reason: str  # a sentence for the operator and the client


def classify(err: BaseException) -> StoreFailure | None:
    """The store failure behind this exception, or None when it is not one (a bug)."""
    if isinstance(err, OSError) and err.errno is not None:
        if err.errno in FULL_ERRNOS:
            return StoreFailure(True, f"the disk is full: {err.strerror}")
        if err.errno in UNWRITABLE_ERRNOS:
            return StoreFailure(False, f"the artifact store cannot be written: {err.strerror}")
        return None
    if isinstance(err, OperationalError) or (isinstance(err, DBAPIError)
                                             and err.connection_invalidated):
        message = str(getattr(err, "orig", err)).strip().splitlines()[0]
        if any(text in message.lower() for text in _FULL_MESSAGES):
            return StoreFailure(True, f"the disk is full: {message}")
        if any(text in message.lower() for text in ("locked", "busy", "lock timeout")):
            return StoreFailure(False, "the database is locked by another writer for longer "
                                       f"than the busy timeout ({message})")
        return StoreFailure(False, f"the database cannot be written: {message}")
    return None


def free_space_problem(path: Path, min_free_bytes: int) -> str | None:
    """Why new data should not be written under `path` (its disk has less free space than the
    floor), or None. The floor leaves room for what must stay writable: corrections, the
    database's own growth, the learner's model files."""
    if min_free_bytes <= 0:
        return None
    free = shutil.disk_usage(_existing(path)).free
    if free >= min_free_bytes:
        return None
    return (f"the disk is nearly full: {free // 2**20} MiB free, below the floor of "
            f"{min_free_bytes // 2**20} MiB (storage.min_free_bytes)")


def _existing(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path.parent != path:
        path = path.parent
    return path
