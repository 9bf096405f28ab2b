"""The artifact store, both implementations (local files, database rows) through the same tests,
each on SQLite and on PostgreSQL; then what only one of them does."""
import os
import time
from datetime import timedelta

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select, update

from storage.artifacts import ArtifactError, ArtifactRef, LocalArtifactStore
from storage.db_artifacts import CHUNK_BYTES, DatabaseArtifactStore
from storage.files import sha256_bytes
from storage.models import ArtifactBlob, ArtifactChunk, utcnow
from storage.registry import ModelRegistry
from storage.repositories import ClipRepository
from tests.storage.conftest import LABELS

HOUR = 3600.0


@pytest.fixture(params=["local", "database"])
def store(request, session_factory, tmp_path):
    if request.param == "local":
        return LocalArtifactStore(tmp_path / "artifacts")
    return DatabaseArtifactStore(session_factory.kw["bind"])


def corrupt(store, path: str, sha256: str) -> None:
    """Change stored bytes behind the store's back (a bad disk, a hand edit)."""
    if isinstance(store, LocalArtifactStore):
        store.path(path).write_bytes(b"tampered weights")
        return
    with store.session_factory() as session:
        session.execute(update(ArtifactChunk).where(ArtifactChunk.sha256 == sha256)
                        .values(data=b"tampered weights"))
        session.commit()


def age(store, ref: ArtifactRef, seconds: float = 2 * HOUR) -> None:
    if isinstance(store, LocalArtifactStore):
        then = time.time() - seconds
        os.utime(store.path(ref.path), (then, then))
        return
    with store.session_factory() as session:
        session.execute(update(ArtifactBlob).where(ArtifactBlob.sha256 == ref.sha256)
                        .values(touched_at=utcnow() - timedelta(seconds=seconds)))
        session.commit()


def corrupt_count(store) -> float:
    return REGISTRY.get_sample_value("emoloop_artifacts_corrupt_total", {"store": store.name}) or 0


def test_model_file_is_stored_whole_with_its_sha256_and_read_back_checked(store):
    data = b"weights" * 200_000  # 1.4 MB: more than one chunk in the database
    sha256, path = store.put_model(7, data)
    assert (sha256, path) == (sha256_bytes(data), "models/7.safetensors")
    assert store.read_model(path, sha256) == data
    assert store.stats().artifacts == 1 and store.stats().bytes == len(data)


def test_a_corrupt_or_missing_artifact_is_refused_logged_and_counted(store, caplog):
    sha256, path = store.put_model(1, b"good weights")
    before = corrupt_count(store)
    corrupt(store, path, sha256)
    with pytest.raises(ArtifactError, match="corrupt"):
        store.read_model(path, sha256)
    assert corrupt_count(store) == before + 1
    assert "corrupt" in caplog.text
    with pytest.raises(ArtifactError, match="cannot read"):
        store.read_model("models/99.safetensors", sha256_bytes(b"never stored"))


def test_clips_are_content_addressed_and_stored_once(store):
    first = store.put_clip(b"audio bytes", ".WAV")
    again = store.put_clip(b"audio bytes", ".wav")
    other = store.put_clip(b"other audio", ".ogg")
    digest = sha256_bytes(b"audio bytes")
    assert first == again == (digest, f"clips/{digest[:2]}/{digest}.wav")
    assert other[1].endswith(".ogg")
    assert store.stats().artifacts == 2
    assert store.read_checked(*reversed(first)) == b"audio bytes"


def test_an_upload_moves_in_as_a_clip_and_reads_back_from_a_local_file(store, session_factory):
    """Long recordings arrive as spooled files and are read back by seeking: both stores."""
    data = b"RIFF" + bytes(range(256)) * 40
    digest = sha256_bytes(data)
    upload = store.incoming_file()
    upload.write_bytes(data)
    with session_factory() as session:
        relative = store.move_clip_in(upload, digest, ".wav", session)
        session.commit()
    assert relative.endswith(".wav") and not upload.exists()
    with store.local_file(ArtifactRef(relative, digest)) as path:
        assert path.read_bytes() == data
    with pytest.raises(ArtifactError):
        with store.local_file(ArtifactRef(relative, "0" * 64)):
            pass


def test_odd_extensions_become_bin(store):
    _, path = store.put_clip(b"x", "../../etc")
    assert path.endswith(".bin")


def test_delete_removes_the_artifact_and_tolerates_it_being_gone(store):
    sha256, path = store.put_clip(b"audio", ".wav")
    store.delete(path, sha256)
    store.delete(path, sha256)
    assert store.stats().artifacts == 0
    with pytest.raises(ArtifactError, match="cannot read"):
        store.read_checked(path, sha256)


def test_the_sweep_removes_old_unreferenced_artifacts_only(store, session_factory, model_v1):
    # model_v1 lives in the local store fixture; this store holds its own copy of its bytes.
    kept_model = ArtifactRef(*reversed(store.put_model(1, b"model default")))
    orphan = ArtifactRef(*reversed(store.put_clip(b"a clip whose row never committed", ".wav")))
    referenced = ArtifactRef(*reversed(store.put_clip(b"a clip with a row", ".wav")))
    with session_factory() as session:
        ClipRepository(session).store(sha256=referenced.sha256, duration_s=1.0,
                                      sample_rate=16000, artifact_path=referenced.path,
                                      size_bytes=17)
        session.commit()
    for ref in (kept_model, orphan, referenced):
        age(store, ref)
    young = ArtifactRef(*reversed(store.put_clip(b"a clip whose row is about to commit", ".wav")))

    removed = store.remove_unreferenced(session_factory, HOUR)

    assert removed == [orphan.path if store.name == "local" else orphan.sha256]
    for ref in (kept_model, referenced, young):
        store.read_checked(ref.path, ref.sha256)
    assert store.remove_unreferenced(session_factory, HOUR) == []


# --- the local folder only -------------------------------------------------------------------

def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(artifacts, monkeypatch):
    _, path = artifacts.put_model(1, b"old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        artifacts.put_model(1, b"new")
    assert artifacts.path(path).read_bytes() == b"old"
    assert sorted(p.name for p in artifacts.root.rglob("*") if p.is_file()) == ["1.safetensors"]


def test_paths_outside_the_store_are_refused(artifacts):
    with pytest.raises(ArtifactError, match="leaves the artifact store"):
        artifacts.path("../../etc/passwd")


def test_the_store_root_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = LocalArtifactStore("relative")
    monkeypatch.chdir("/")
    _, path = store.put_clip(b"a", ".wav")
    assert (tmp_path / "relative" / path).is_file()


# --- the database only -------------------------------------------------------------------------

@pytest.fixture
def db_store(session_factory) -> DatabaseArtifactStore:
    return DatabaseArtifactStore(session_factory.kw["bind"])


def test_bytes_commit_with_the_row_that_refers_to_them_or_not_at_all(db_store, session_factory):
    data = b"w" * (2 * CHUNK_BYTES + 10)
    with session_factory() as session:
        ModelRegistry(session, db_store).bootstrap_default(data, sha256_bytes(data),
                                                           labels=LABELS)
        session.rollback()  # a crash before the commit
    assert db_store.stats().artifacts == 0
    with session_factory() as session:
        row = ModelRegistry(session, db_store).bootstrap_default(data, sha256_bytes(data),
                                                                 labels=LABELS)
        session.commit()
        chunks = session.scalars(select(ArtifactChunk.seq)
                                 .where(ArtifactChunk.sha256 == row.sha256)).all()
    assert sorted(chunks) == [0, 1, 2]
    assert db_store.read_model(row.artifact_path, row.sha256) == data


def test_bytes_a_clip_row_still_refers_to_are_never_removed(db_store, session_factory):
    sha256, path = db_store.put_clip(b"sent by two users", ".wav")
    with session_factory() as session:
        ClipRepository(session).store(sha256=sha256, duration_s=1.0, sample_rate=16000,
                                      artifact_path=path, size_bytes=17)
        session.commit()
    assert db_store.remove([ArtifactRef(path, sha256)]) == 0
    assert db_store.read_checked(path, sha256) == b"sent by two users"
