"""The artifact store: audio clips and model files, behind one interface with two implementations,
chosen by `storage.artifacts`:

- `local` (the embedded default, `LocalArtifactStore`): files under one folder on this machine.
- `database` (`storage.db_artifacts.DatabaseArtifactStore`): rows in the SQL store itself, so
  that with PostgreSQL the database is the only state API nodes and the learner share.

Rows refer to an artifact by a relative path (`clips/ab/ab12....wav`, `models/3.safetensors`,
`models/3.ewc.safetensors`) and the sha256 of its bytes. Every read checks the bytes against that
sha256: a mismatch is an `ArtifactError` (logged and counted in /metrics), so a corrupt artifact
is never served or trained on; callers fall back as for a missing one.

Writes take the caller's Session: the database store writes in that transaction, so a row and
the bytes it refers to commit together; the local store writes its file at once, before the row
(a row never points at a missing file; a crash leaves only a file `storage.sweep` removes).
"""
import hashlib
import logging
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from prometheus_client import Counter
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage.files import sha256_bytes, write_atomic
from storage.models import Clip, ModelVersion

log = logging.getLogger("emoloop.storage")

_EXTENSION = re.compile(r"^\.[a-z0-9]{1,8}$")
_BATCH = 500  # paths looked up in the database at a time (bounded IN lists)
_PARALLEL_FROM, _UNLINK_THREADS = 64, 8

CORRUPT_ARTIFACTS = Counter("emoloop_artifacts_corrupt_total",
                            "Artifacts whose bytes did not match their recorded sha256 when read "
                            "(refused: never served or trained on)", ["store"])


class ArtifactError(RuntimeError):
    """A stored artifact that is missing, unreadable or does not match its recorded sha256."""


class ArtifactRef(NamedTuple):
    path: str
    sha256: str


@dataclass(frozen=True)
class StoreStats:
    artifacts: int
    bytes: int


class ArtifactStore(ABC):
    """What every artifact store does. Subclasses say how bytes are kept (`_write`, `_read`,
    `remove`, `remove_unreferenced`, `stats`); naming and checking live here, once."""

    name: str  # "local" or "database", for logs and metrics
    # Whether writes join the caller's transaction (database) or happen at once (local files,
    # written before the row that refers to them).
    transactional: bool

    def put_clip(self, data: bytes, extension: str = ".bin",
                 session: Session | None = None) -> tuple[str, str]:
        """Store a clip under its sha256; returns (sha256, relative path). The same bytes sent
        again reuse what is stored already."""
        digest = sha256_bytes(data)
        relative = clip_path(digest, extension)
        self._write(relative, data, digest, session, content_named=True)
        return digest, relative

    def incoming_file(self, suffix: str = ".upload") -> Path:
        """A new empty local file for an upload being received (long recordings are not held
        in memory); the caller deletes it unless `move_clip_in` takes it, and a crash's
        leftover goes with the sweep of the spool folder."""
        folder = self._spool_folder()
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, suffix=suffix)
        os.close(fd)
        return Path(name)

    def move_clip_in(self, source: Path, sha256: str, extension: str = ".bin",
                     session: Session | None = None) -> str:
        """`put_clip` for a file already written (an `incoming_file`, whose sha256 the caller
        computed while writing it); the source is gone afterwards. Returns the relative path.
        This default reads the file once into memory (the database store keeps bytes in rows);
        the local store renames it instead."""
        data = Path(source).read_bytes()
        if sha256_bytes(data) != sha256:
            raise ArtifactError(f"upload {source} changed while it was stored")
        _, relative = self.put_clip(data, extension, session)
        Path(source).unlink(missing_ok=True)
        return relative

    @contextmanager
    def local_file(self, ref: "ArtifactRef") -> Iterator[Path]:
        """A file on this machine holding the artifact's checked bytes, for readers that seek
        (a span of a long recording). This default writes a temporary copy; the local store
        gives its own file."""
        data = self.read_checked(ref.path, ref.sha256)
        fd, name = tempfile.mkstemp(dir=self._spool_folder(), suffix=PurePosixPath(ref.path).suffix)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            yield Path(name)
        finally:
            Path(name).unlink(missing_ok=True)

    def stamp(self, ref: "ArtifactRef") -> tuple | None:
        """Something that changes when the stored bytes change (None: not stored): the engine
        tries a version that failed to load again once it moves."""
        size = self.size_of(ref)
        return None if size is None else (size,)

    def _spool_folder(self) -> Path:
        folder = Path(tempfile.gettempdir()) / "emoloop-incoming"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def put_model(self, version: int, data: bytes,
                  session: Session | None = None) -> tuple[str, str]:
        """Store a version's model file; returns (sha256, relative path)."""
        return self._put_named(f"models/{int(version)}.safetensors", data, session)

    def put_state(self, version: int, data: bytes,
                  session: Session | None = None) -> tuple[str, str]:
        """Store what the learner carries from a version to the next round (EWC state)."""
        return self._put_named(f"models/{int(version)}.ewc.safetensors", data, session)

    def read_model(self, relative: str, expected_sha256: str,
                   session: Session | None = None) -> bytes:
        """The model file's bytes, checked against the sha256 recorded when it was written."""
        return self.read_checked(relative, expected_sha256, session)

    def read_checked(self, relative: str, expected_sha256: str,
                     session: Session | None = None) -> bytes:
        """The bytes, checked. `session`: read in that transaction (the database store then
        sees what it wrote before committing)."""
        data = self._read(relative, expected_sha256, session)
        digest = sha256_bytes(data)
        if digest != expected_sha256:
            CORRUPT_ARTIFACTS.labels(self.name).inc()
            log.error("artifact %s in the %s store is corrupt: sha256 %s, expected %s; refused",
                      relative, self.name, digest, expected_sha256)
            raise ArtifactError(f"artifact {relative} is corrupt: sha256 {digest}, "
                                f"expected {expected_sha256}")
        return data

    def delete(self, relative: str, sha256: str) -> None:
        """Remove one artifact (see `remove`)."""
        self.remove([ArtifactRef(relative, sha256)])

    @abstractmethod
    def remove(self, refs: Iterable[ArtifactRef]) -> int:
        """Remove artifacts after the rows that referred to them were deleted and committed;
        one already gone is not an error (deletion is retried after crashes). Returns how many
        went. The database store keeps bytes a clip or a live version still refers to (its
        content-addressed rows may be shared)."""

    @abstractmethod
    def remove_unreferenced(self, session_factory: sessionmaker[Session],
                            older_than_s: float) -> list[str]:
        """Remove what no row refers to (a crash's leftovers) and was last written more than
        `older_than_s` ago; returns what went (paths or sha256s)."""

    @abstractmethod
    def size_of(self, ref: ArtifactRef) -> int | None:
        """The stored size in bytes, or None when it is not stored."""

    @abstractmethod
    def stats(self) -> StoreStats:
        """How many artifacts the store holds and their size."""

    @abstractmethod
    def _write(self, relative: str, data: bytes, digest: str, session: Session | None, *,
               content_named: bool) -> None: ...

    @abstractmethod
    def _read(self, relative: str, expected_sha256: str, session: Session | None) -> bytes:
        """The stored bytes, unchecked; ArtifactError when there are none."""

    def _put_named(self, relative: str, data: bytes, session: Session | None) -> tuple[str, str]:
        digest = sha256_bytes(data)
        self._write(relative, data, digest, session, content_named=False)
        return digest, relative


class LocalArtifactStore(ArtifactStore):
    """Files under one root. Paths are relative to it, so the data directory can be moved. Every
    file goes through `storage.files.write_atomic`: a reader sees a whole file or none."""

    name = "local"
    transactional = False

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def _write(self, relative: str, data: bytes, digest: str, session: Session | None, *,
               content_named: bool) -> None:
        path = self.path(relative)
        if content_named:
            try:
                # The file may be an old one no row refers to any more (its user was forgotten):
                # a fresh time keeps the sweep off it until our row commits.
                os.utime(path)
                return
            except FileNotFoundError:
                pass
        # A model file's name is its version number: a crash may have left another version's
        # bytes there, before the number was handed out again. Overwrite them.
        write_atomic(path, data)

    def _read(self, relative: str, expected_sha256: str, session: Session | None) -> bytes:
        try:
            return self.path(relative).read_bytes()
        except OSError as err:
            raise ArtifactError(f"cannot read artifact {relative}: {err.strerror}") from err

    def remove(self, refs: Iterable[ArtifactRef]) -> int:
        paths = [self.path(ref.path) for ref in refs]
        if len(paths) < _PARALLEL_FROM:
            return sum(map(_unlink, paths))
        # Each unlink waits on the file system's journal, not on the CPU: several at once.
        with ThreadPoolExecutor(max_workers=_UNLINK_THREADS) as pool:
            return sum(pool.map(_unlink, paths, chunksize=64))

    def remove_unreferenced(self, session_factory: sessionmaker[Session],
                            older_than_s: float) -> list[str]:
        cutoff = time.time() - older_than_s
        removed: list[str] = []
        batch: list[Path] = []
        for path in self._old_files(cutoff):
            batch.append(path)
            if len(batch) == _BATCH:
                removed += self._remove_if_unreferenced(session_factory, batch, cutoff)
                batch = []
        return removed + self._remove_if_unreferenced(session_factory, batch, cutoff)

    def size_of(self, ref: ArtifactRef) -> int | None:
        try:
            return self.path(ref.path).stat().st_size
        except (FileNotFoundError, ArtifactError):
            return None

    def move_clip_in(self, source: Path, sha256: str, extension: str = ".bin",
                     session: Session | None = None) -> str:
        """One rename: the spool folder lies in the store's root (same file system). The file
        is fsynced and renamed into place, or dropped when the same bytes are stored already."""
        relative = clip_path(sha256, extension)
        path = self.path(relative)
        try:
            os.utime(path)  # stored before: keep that file, fresh for the sweep
            Path(source).unlink(missing_ok=True)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(source, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(source, path)
        return relative

    @contextmanager
    def local_file(self, ref: ArtifactRef) -> Iterator[Path]:
        """The stored file itself, checked against its sha256 block by block (never whole in
        memory)."""
        path = self.path(ref.path)
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
        except OSError as err:
            raise ArtifactError(f"cannot read artifact {ref.path}: {err.strerror}") from err
        if digest.hexdigest() != ref.sha256:
            CORRUPT_ARTIFACTS.labels(self.name).inc()
            raise ArtifactError(f"artifact {ref.path} is corrupt: sha256 {digest.hexdigest()}, "
                                f"expected {ref.sha256}")
        yield path

    def stamp(self, ref: ArtifactRef) -> tuple | None:
        try:
            stat = self.path(ref.path).stat()
        except (OSError, ArtifactError):
            return None
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def _spool_folder(self) -> Path:
        return self.root / "incoming"

    def stats(self) -> StoreStats:
        count = size = 0
        for path in self._files():
            try:
                size += path.stat().st_size
                count += 1
            except FileNotFoundError:
                continue
        return StoreStats(count, size)

    def path(self, relative: str) -> Path:
        """The absolute path of a stored file. Paths come from the database; one pointing outside
        the root is refused rather than followed. Checked on the string, without asking the
        file system (pruning calls this for every file it removes)."""
        parts = PurePosixPath(relative).parts
        if not parts or relative.startswith("/") or ".." in parts:
            raise ArtifactError(f"artifact path {relative!r} leaves the artifact store")
        return self.root.joinpath(*parts)

    def _files(self) -> Iterator[Path]:
        for folder, _, names in os.walk(self.root):
            for name in names:
                path = Path(folder) / name
                if not path.is_symlink():
                    yield path

    def _old_files(self, cutoff: float) -> Iterator[Path]:
        for path in sorted(self._files()):
            try:
                if path.stat().st_mtime < cutoff:
                    yield path
            except FileNotFoundError:  # removed while we looked
                continue

    def _remove_if_unreferenced(self, session_factory: sessionmaker[Session], paths: list[Path],
                                cutoff: float) -> list[str]:
        if not paths:
            return []
        relative = {p.relative_to(self.root).as_posix(): p for p in paths}
        names = list(relative)
        with session_factory() as session:
            # A clip whose bytes retention removed no longer needs its file (should one be left
            # by a crash after the commit); the same bytes sent again make the file young.
            referenced = set(session.scalars(select(Clip.artifact_path).where(
                Clip.artifact_path.in_(names), Clip.removed_at.is_(None))))
            referenced |= set(session.scalars(select(ModelVersion.artifact_path)
                                              .where(ModelVersion.artifact_path.in_(names))))
            referenced |= set(session.scalars(select(ModelVersion.state_path)
                                              .where(ModelVersion.state_path.in_(names))))
        removed = []
        for name, path in relative.items():
            if name in referenced:
                continue
            try:
                if path.stat().st_mtime >= cutoff:  # written again since we listed it
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(name)
        return removed


def _unlink(path: Path) -> int:
    try:
        path.unlink()
        return 1
    except FileNotFoundError:
        return 0


def clip_path(digest: str, extension: str) -> str:
    """Where a clip with this sha256 is kept: its name says its content."""
    extension = extension.lower() if _EXTENSION.match(extension.lower()) else ".bin"
    return f"clips/{digest[:2]}/{digest}{extension}"


def open_artifact_store(settings, engine) -> ArtifactStore:
    """The store `storage.artifacts` names: `local` (files under storage.artifacts_dir) or
    `database` (rows in the database `engine` connects to)."""
    if settings.storage.artifacts == "database":
        from storage.db_artifacts import DatabaseArtifactStore

        return DatabaseArtifactStore(engine)
    return LocalArtifactStore(settings.storage.artifacts_dir)
