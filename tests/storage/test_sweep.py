"""Sweeping the artifact store: files a crash left without a row go once they are old; nothing a
row refers to, and nothing young, is ever touched. On SQLite and PostgreSQL."""
import os
import time

from service.cli import main
from service.scheduler import LearnerService
from storage.forget import forget_user
from storage.models import Clip
from storage.repositories import ClipRepository, PredictionRepository
from storage.settings import LearnerSettings, get_settings
from storage.sweep import sweep_unreferenced

HOUR = 3600.0


def _age(artifacts, *relative: str, seconds: float = 2 * HOUR) -> None:
    then = time.time() - seconds
    for path in relative:
        os.utime(artifacts.path(path), (then, then))


def _exists(artifacts, relative: str) -> bool:
    return artifacts.path(relative).is_file()


def _predict(session, app_key, model_v1, artifacts, audio: bytes, user_id: str) -> Clip:
    sha256, path = artifacts.put_clip(audio, ".wav")
    clip = ClipRepository(session).get_or_create(sha256=sha256, duration_s=3.0,
                                                 sample_rate=16000, artifact_path=path,
                                                 size_bytes=len(audio))
    PredictionRepository(session).create(
        api_key_id=app_key.id, clip_id=clip.id, model_version=model_v1.version, label="sad",
        confidence=0.6, probabilities={"sad": 0.6, "happy": 0.4}, latency_ms=5.0,
        user_id=user_id)
    session.commit()
    return clip


def test_old_files_without_a_row_go_and_everything_else_stays(session_factory, artifacts,
                                                              model_v1, clip):
    _, orphan = artifacts.put_clip(b"a clip whose row never committed", ".wav")
    temp = "clips/ab/.x.wav.1234.tmp"  # a write cut short before its rename
    artifacts.path(temp).parent.mkdir(parents=True, exist_ok=True)
    artifacts.path(temp).write_bytes(b"half a clip")
    _age(artifacts, orphan, temp, clip.artifact_path, model_v1.artifact_path)
    _, young = artifacts.put_clip(b"a clip whose row is about to commit", ".wav")

    removed = sweep_unreferenced(session_factory, artifacts, older_than_s=HOUR)

    assert sorted(removed) == sorted([orphan, temp])
    assert not _exists(artifacts, orphan) and not _exists(artifacts, temp)
    for kept in (clip.artifact_path, model_v1.artifact_path, young):
        assert _exists(artifacts, kept)
    assert sweep_unreferenced(session_factory, artifacts, older_than_s=HOUR) == []


def test_the_same_bytes_sent_again_keep_an_old_file_from_the_sweep(session_factory, artifacts,
                                                                   model_v1):
    audio = b"sent once, forgotten, and sent again"
    _, path = artifacts.put_clip(audio, ".wav")
    _age(artifacts, path)
    assert artifacts.put_clip(audio, ".wav")[1] == path  # its row commits after this
    assert sweep_unreferenced(session_factory, artifacts, older_than_s=HOUR) == []
    assert _exists(artifacts, path)


def test_a_forgotten_users_clips_left_by_a_crash_are_swept(session, session_factory, artifacts,
                                                           app_key, model_v1):
    ana = _predict(session, app_key, model_v1, artifacts, b"ana speaking", "ana")
    bo = _predict(session, app_key, model_v1, artifacts, b"bo speaking", "bo")
    report = forget_user(session, "ana")
    session.commit()  # ... and the process dies before deleting report.files
    assert [f.path for f in report.files] == [ana.artifact_path]
    assert _exists(artifacts, ana.artifact_path)
    _age(artifacts, ana.artifact_path, bo.artifact_path)

    assert sweep_unreferenced(session_factory, artifacts, older_than_s=HOUR) == [
        ana.artifact_path]
    assert _exists(artifacts, bo.artifact_path)


def test_the_cli_sweeps_the_configured_store(database_url, session_factory, artifacts, model_v1,
                                             monkeypatch, capsys, tmp_path):
    _, orphan = artifacts.put_clip(b"left by a crash", ".wav")
    _age(artifacts, orphan)
    monkeypatch.setenv("EMOLOOP_DATA_DIR", str(tmp_path))  # artifacts live in tmp_path/artifacts
    monkeypatch.setenv("EMOLOOP_DATABASE_URL", database_url)
    get_settings.cache_clear()
    try:
        assert main(["artifacts", "sweep"]) == 0
    finally:
        get_settings.cache_clear()
    out = capsys.readouterr().out.splitlines()
    assert out == [orphan, "removed 1 unreferenced file(s) older than 3600 s"]
    assert _exists(artifacts, model_v1.artifact_path)


def test_the_learners_check_sweeps_at_most_once_per_sweep_age(session_factory, artifacts,
                                                             model_v1):
    service = LearnerService(session_factory, artifacts, LearnerSettings(enabled=False),
                             sweep_after_s=HOUR)
    _, first = artifacts.put_clip(b"left by one crash", ".wav")
    _age(artifacts, first)
    service.check()  # no feedback waits, so no round: only the sweep
    assert not _exists(artifacts, first)

    _, second = artifacts.put_clip(b"left by another crash", ".wav")
    _age(artifacts, second)
    service.check()  # the next check, minutes later: the store was walked within the hour
    assert _exists(artifacts, second)
