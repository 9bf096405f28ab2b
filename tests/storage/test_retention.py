"""Retention (storage.retention): each kind goes once older than its setting, and nothing a
version, a replay buffer, a gate set, a personal model or feedback needs is ever touched. Both
artifact stores, on SQLite and PostgreSQL."""
import json
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from service.cli import main
from service.scheduler import LearnerService
from storage.artifacts import ArtifactError, LocalArtifactStore
from storage.db_artifacts import DatabaseArtifactStore
from storage.files import sha256_bytes
from storage.models import (Clip, Feedback, ModelVersion, Prediction, ReplayExemplar,
                            TrainingRun, utcnow)
from storage.registry import ModelRegistry
from storage.repositories import ClipRepository, FeedbackRepository, PredictionRepository
from storage.retention import prune
from storage.runs import TrainingRunRepository
from storage.settings import LearnerSettings, RetentionSettings, get_settings
from tests.storage.conftest import LABELS

RETENTION = RetentionSettings(predictions_days=30, clips_days=7, rejected_versions_days=30,
                              run_details_days=30)


@pytest.fixture(params=["local", "database"])
def store(request, session_factory, tmp_path):
    if request.param == "local":
        return LocalArtifactStore(tmp_path / "artifacts")
    return DatabaseArtifactStore(session_factory.kw["bind"])


class World:
    """A store with one of each case, each made `days` old."""

    def __init__(self, session_factory, store, app_key):
        self.db, self.store, self.app_key = session_factory, store, app_key
        with session_factory() as session:
            data = b"model v1"
            self.v1 = ModelRegistry(session, store).bootstrap_default(
                data, sha256_bytes(data), labels=LABELS).version
            session.commit()

    def predict(self, audio: bytes, days: float, feedback: bool = False) -> Prediction:
        with self.db() as session:
            sha256, path = self.store.put_clip(audio, ".wav", session)
            clip_id = ClipRepository(session).store(sha256=sha256, duration_s=1.0,
                                                    sample_rate=16000, artifact_path=path,
                                                    size_bytes=len(audio))
            prediction = PredictionRepository(session).create(
                api_key_id=self.app_key.id, clip_id=clip_id, model_version=self.v1,
                label="sad", confidence=0.6, probabilities={"sad": 0.6, "happy": 0.4},
                latency_ms=5.0, user_id="ana")
            then = utcnow() - timedelta(days=days)
            session.execute(update(Prediction).where(Prediction.id == prediction.id)
                            .values(created_at=then))
            session.execute(update(Clip).where(Clip.id == clip_id, Clip.created_at > then)
                            .values(created_at=then))
            if feedback:
                FeedbackRepository(session).add(session.get(Prediction, prediction.id), "happy")
            session.commit()
        return prediction

    def version(self, data: bytes, status: str, days: float) -> ModelVersion:
        with self.db() as session:
            registry = ModelRegistry(session, self.store)
            row = registry.register(data, labels=LABELS, parent_version=self.v1)
            row.state_sha256, row.state_path = self.store.put_state(row.version, data + b" ewc",
                                                                    session)
            row.status = status
            row.created_at = utcnow() - timedelta(days=days)
            session.commit()
        return row

    def readable(self, path: str, sha256: str) -> bool:
        try:
            self.store.read_checked(path, sha256)
            return True
        except ArtifactError:
            return False


@pytest.fixture
def world(session_factory, store, app_key) -> World:
    return World(session_factory, store, app_key)


def clip_of(db, prediction: Prediction) -> Clip | None:
    with db() as session:
        return session.get(Clip, prediction.clip_id)


def exists(db, model, key) -> bool:
    with db() as session:
        return session.get(model, key) is not None


def test_each_kind_goes_when_old_and_nothing_still_needed_is_touched(world, session_factory):
    db = session_factory
    old_unanswered = world.predict(b"old, no feedback", days=40)
    old_answered = world.predict(b"old, corrected", days=40, feedback=True)
    shared_old = world.predict(b"sent twice", days=40)
    shared_young = world.predict(b"sent twice", days=1)
    in_buffer = world.predict(b"a replay exemplar's clip", days=40)
    stale_clip = world.predict(b"ten days, no feedback", days=10)
    stale_answered = world.predict(b"ten days, corrected", days=10, feedback=True)
    young = world.predict(b"yesterday, no feedback", days=1)
    with db() as session:  # an exemplar of v1's buffer on the clip of an unanswered prediction
        feedback_id = session.scalar(select(Feedback.id).where(
            Feedback.prediction_id == old_answered.id))
        session.add(ReplayExemplar(model_version=world.v1, clip_id=in_buffer.clip_id,
                                   feedback_id=feedback_id, label="happy", source="feedback",
                                   weight=1.0))
        run = TrainingRunRepository(session).start("schedule")
        TrainingRunRepository(session).finish(run, "rejected", counts={"feedback": 3},
                                              gate_report={"decision": "rejected"})
        run.finished_at = utcnow() - timedelta(days=40)
        session.commit()
    rejected_old = world.version(b"rejected long ago", "rejected", days=40)
    rejected_new = world.version(b"rejected yesterday", "rejected", days=1)
    retired_old = world.version(b"a rollback target", "retired", days=40)
    with db() as session:  # the rejected version's buffer goes with it
        session.add(ReplayExemplar(model_version=rejected_old.version, base_index=0,
                                   label="sad", source="base", weight=1.0))
        session.commit()
    old_clip, stale = clip_of(db, old_unanswered), clip_of(db, stale_clip)

    dry = prune(db, world.store, RETENTION, dry_run=True)
    assert exists(db, Prediction, old_unanswered.id) and world.readable(old_clip.artifact_path,
                                                                        old_clip.sha256)
    report = prune(db, world.store, RETENTION)

    assert (report.predictions, report.clips, report.clip_bytes_removed) == (3, 1, 1)
    assert (report.rejected_versions, report.replay_exemplars, report.run_details) == (1, 1, 1)
    assert ({k: v for k, v in dry.as_dict().items() if k not in ("dry_run", "seconds")}
            == {k: v for k, v in report.as_dict().items() if k not in ("dry_run", "seconds")})
    assert report.freed_bytes == (len(b"old, no feedback") + len(b"ten days, no feedback")
                                  + len(b"rejected long ago") + len(b"rejected long ago ewc"))
    # Gone: old unanswered predictions, the clip only one of them used, its bytes.
    for gone in (old_unanswered, shared_old, in_buffer):
        assert not exists(db, Prediction, gone.id)
    assert not exists(db, Clip, old_clip.id)
    assert not world.readable(old_clip.artifact_path, old_clip.sha256)
    # Kept: answered predictions and their clips, a clip still used, a buffer's clip.
    for kept in (old_answered, shared_young, stale_clip, stale_answered, young):
        assert exists(db, Prediction, kept.id)
    for kept in (old_answered, shared_young, in_buffer, stale_answered, young):
        clip = clip_of(db, kept)
        assert clip.removed_at is None and world.readable(clip.artifact_path, clip.sha256)
    # The ten-day-old unanswered clip: bytes gone, row kept and marked, prediction kept.
    stale_after = clip_of(db, stale_clip)
    assert stale_after.removed_at is not None
    assert not world.readable(stale.artifact_path, stale.sha256)
    # Versions: only the old rejected one lost its files; every other one is whole.
    with db() as session:
        statuses = {v.version: v.status for v in session.scalars(select(ModelVersion))}
        assert statuses == {world.v1: "active", rejected_old.version: "deleted",
                            rejected_new.version: "rejected", retired_old.version: "retired"}
        assert session.scalars(select(ReplayExemplar.model_version)).all() == [world.v1]
        run_row = session.scalars(select(TrainingRun)).one()
        assert (run_row.status, run_row.counts, run_row.gate_report) == ("rejected", {}, None)
    assert not world.readable(rejected_old.artifact_path, rejected_old.sha256)
    assert not world.readable(rejected_old.state_path, rejected_old.state_sha256)
    for kept in (rejected_new, retired_old):
        assert world.readable(kept.artifact_path, kept.sha256)
        assert world.readable(kept.state_path, kept.state_sha256)

    again = prune(db, world.store, RETENTION)  # nothing left to do
    assert (again.predictions, again.clip_bytes_removed, again.rejected_versions,
            again.run_details, again.freed_bytes) == (0, 0, 0, 0, 0)


def test_a_removed_clip_sent_again_is_whole_again(world, session_factory):
    first = world.predict(b"sent, forgotten by retention, sent again", days=10)
    prune(session_factory, world.store, RetentionSettings(clips_days=7))
    assert clip_of(session_factory, first).removed_at is not None
    second = world.predict(b"sent, forgotten by retention, sent again", days=0)
    clip = clip_of(session_factory, second)
    assert clip.id == first.clip_id and clip.removed_at is None
    assert world.readable(clip.artifact_path, clip.sha256)


def test_nothing_is_pruned_without_settings(world, session_factory):
    world.predict(b"a year old", days=365)
    report = prune(session_factory, world.store, RetentionSettings())
    assert (report.predictions, report.clip_bytes_removed, report.freed_bytes) == (0, 0, 0)


def test_the_learners_check_applies_retention(world, session_factory):
    old = world.predict(b"old, no feedback", days=40)
    service = LearnerService(session_factory, world.store, LearnerSettings(enabled=False),
                             sweep_after_s=3600.0, retention=RETENTION)
    service.check()
    assert not exists(session_factory, Prediction, old.id)


def test_the_cli_prunes_and_shows_what_is_stored(database_url, session_factory, app_key,
                                                 tmp_path, monkeypatch, capsys):
    world = World(session_factory, LocalArtifactStore(tmp_path / "artifacts"), app_key)
    old = world.predict(b"old, no feedback", days=40)
    world.predict(b"yesterday", days=1)
    monkeypatch.setenv("EMOLOOP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("EMOLOOP_DATABASE_URL", database_url)
    monkeypatch.setenv("EMOLOOP_STORAGE__RETENTION__PREDICTIONS_DAYS", "30")
    get_settings.cache_clear()
    try:
        assert main(["storage", "stats", "--json"]) == 0
        before = json.loads(capsys.readouterr().out)
        assert main(["storage", "prune", "--dry-run", "--json"]) == 0
        dry = json.loads(capsys.readouterr().out)
        assert exists(session_factory, Prediction, old.id)
        assert main(["storage", "prune"]) == 0
        printed = capsys.readouterr().out
        assert main(["storage", "stats", "--json"]) == 0
        after = json.loads(capsys.readouterr().out)
    finally:
        get_settings.cache_clear()
    assert (before["predictions"], before["clips"], before["artifact_store"]["artifacts"]) == (
        2, 2, 3)  # two clips and the model file
    assert dry["predictions"] == 1 and dry["dry_run"] is True
    assert "1 prediction(s)" in printed
    assert (after["predictions"], after["clips"], after["artifact_store"]["artifacts"]) == (
        1, 1, 2)
    assert not exists(session_factory, Prediction, old.id)
