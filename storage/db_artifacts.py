"""The database artifact store (`storage.artifacts: database`): clips and model files as rows of
the SQL store itself, so that on PostgreSQL the database is the only state API nodes and the
learner share.

Content-addressed: one `artifact_blobs` row per distinct content, named by its sha256, with the
bytes in `artifact_chunks` of CHUNK_BYTES each (no single value is large, and reads stream them).
Rows elsewhere refer to a blob by the sha256 they record (`clips.sha256`, `model_versions.sha256`,
`model_versions.state_sha256`); the path they record names it for people and for the local store.

Writes join the caller's transaction: the clip row and the clip's bytes, the version row and its
model file commit together or not at all, so a crash leaves nothing half-stored. Storing bytes
that exist already only refreshes `touched_at`, which also row-locks the blob: removing a blob
locks it first and only then checks (in a fresh statement, so it sees every commit up to then)
that no clip and no live version refers to it. A writer storing the same bytes again therefore
either waits for the removal and stores them anew, or makes the removal see its row.
"""
from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import Engine, Select, delete, exists, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.artifacts import ArtifactError, ArtifactRef, ArtifactStore, StoreStats
from storage.db import make_read_session_factory, make_session_factory, one_of
from storage.models import ArtifactBlob, ArtifactChunk, Clip, ModelVersion, utcnow

CHUNK_BYTES = 512 * 1024
_BATCH = 5000  # blobs removed per statement

_INSERT_BLOB = {dialect.__name__.rsplit(".", 1)[-1]: dialect.insert(ArtifactBlob)
                .on_conflict_do_nothing(index_elements=[ArtifactBlob.sha256])
                .returning(ArtifactBlob.sha256)
                for dialect in (sqlite, postgresql)}
_INSERT_CHUNKS = insert(ArtifactChunk)


def referenced(sha256_column) -> object:
    """True where a clip whose bytes retention did not remove, or a version not deleted, still
    refers to these bytes."""
    live = ModelVersion.status != "deleted"
    return or_(exists().where(Clip.sha256 == sha256_column, Clip.removed_at.is_(None)),
               exists().where(ModelVersion.sha256 == sha256_column, live),
               exists().where(ModelVersion.state_sha256 == sha256_column, live))


class DatabaseArtifactStore(ArtifactStore):
    name = "database"
    transactional = True

    def __init__(self, engine: Engine):
        self.session_factory = make_session_factory(engine)
        # On SQLite a read never waits for the writer (storage.db).
        self.read_session_factory = make_read_session_factory(engine)

    def _write(self, relative: str, data: bytes, digest: str, session: Session | None, *,
               content_named: bool) -> None:
        if session is None:
            with self.session_factory() as own:
                self._store(own, data, digest)
                own.commit()
        else:
            self._store(session, data, digest)

    def _store(self, session: Session, data: bytes, digest: str) -> None:
        connection = session.connection()
        now = utcnow()
        for _ in range(3):
            # Waits for a transaction storing the same bytes; inserts when it rolled back.
            inserted = connection.execute(_INSERT_BLOB[connection.dialect.name], {
                "sha256": digest, "size_bytes": len(data), "created_at": now,
                "touched_at": now}).scalar_one_or_none()
            if inserted is not None:
                chunks = [{"sha256": digest, "seq": seq, "data": data[start:start + CHUNK_BYTES]}
                          for seq, start in enumerate(range(0, len(data), CHUNK_BYTES))]
                if chunks:
                    connection.execute(_INSERT_CHUNKS, chunks)
                return
            touched = connection.execute(update(ArtifactBlob)
                                         .where(ArtifactBlob.sha256 == digest)
                                         .values(touched_at=now)).rowcount
            if touched:  # stored already: only locked and made young again
                return
            # Removed between our INSERT and UPDATE: insert again.
        raise ArtifactError(f"could not store artifact {digest}: removed concurrently each time")

    def _read(self, relative: str, expected_sha256: str, session: Session | None) -> bytes:
        if session is not None:  # the caller's transaction: it may have written these bytes
            return self._read_in(session, relative, expected_sha256)
        with self.read_session_factory() as own:
            data = self._read_in(own, relative, expected_sha256)
            own.commit()
        return data

    def _read_in(self, session: Session, relative: str, expected_sha256: str) -> bytes:
        # One round trip for the size and the first chunk: all of a clip.
        first_chunk = (select(ArtifactChunk.data)
                       .where(ArtifactChunk.sha256 == ArtifactBlob.sha256, ArtifactChunk.seq == 0)
                       .scalar_subquery())
        row = session.execute(select(ArtifactBlob.size_bytes, first_chunk)
                              .where(ArtifactBlob.sha256 == expected_sha256)).one_or_none()
        if row is None:
            raise ArtifactError(f"cannot read artifact {relative}: not in the database")
        size, first = row
        if size <= CHUNK_BYTES:
            return first or b""
        # The rest chunk by chunk from the server (a server-side cursor on PostgreSQL), not one
        # result holding them all.
        rest = session.scalars(select(ArtifactChunk.data)
                               .where(ArtifactChunk.sha256 == expected_sha256,
                                      ArtifactChunk.seq > 0)
                               .order_by(ArtifactChunk.seq).execution_options(yield_per=4))
        return b"".join([first or b"", *rest])

    def remove(self, refs: Iterable[ArtifactRef]) -> int:
        digests = sorted({ref.sha256 for ref in refs})
        removed = 0
        with self.session_factory() as session:
            for start in range(0, len(digests), _BATCH):
                batch = digests[start:start + _BATCH]
                removed += len(self._remove_locked(session, select(ArtifactBlob.sha256).where(
                    one_of(session, ArtifactBlob.sha256, batch))))
            session.commit()
        return removed

    def remove_unreferenced(self, session_factory, older_than_s: float) -> list[str]:
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        with self.session_factory() as session:
            old = select(ArtifactBlob.sha256).where(ArtifactBlob.touched_at < cutoff,
                                                    ~referenced(ArtifactBlob.sha256))
            gone = self._remove_locked(session, old)
            session.commit()
        return gone

    def size_of(self, ref: ArtifactRef) -> int | None:
        with self.read_session_factory() as session:
            size = session.scalar(select(ArtifactBlob.size_bytes)
                                  .where(ArtifactBlob.sha256 == ref.sha256))
            session.commit()
        return size

    def stats(self) -> StoreStats:
        with self.read_session_factory() as session:
            count, size = session.execute(select(func.count(), func.coalesce(
                func.sum(ArtifactBlob.size_bytes), 0))).one()
            session.commit()
        return StoreStats(int(count), int(size))

    def _remove_locked(self, session: Session, candidates: Select) -> list[str]:
        # Lock first, then check references in a new statement: it sees every transaction that
        # stored the same bytes again and committed while we waited for the lock.
        locked = list(session.scalars(candidates.order_by(ArtifactBlob.sha256)
                                      .with_for_update()))
        dead: list[str] = []
        for start in range(0, len(locked), _BATCH):
            batch = locked[start:start + _BATCH]
            dead += session.scalars(select(ArtifactBlob.sha256).where(
                one_of(session, ArtifactBlob.sha256, batch), ~referenced(ArtifactBlob.sha256)))
        for start in range(0, len(dead), _BATCH):
            batch = dead[start:start + _BATCH]
            session.execute(delete(ArtifactChunk).where(one_of(session, ArtifactChunk.sha256,
                                                               batch)))
            session.execute(delete(ArtifactBlob).where(one_of(session, ArtifactBlob.sha256,
                                                              batch)))
        return dead
