"""Retention: what `storage.retention` lets go once old enough, applied by the learner's scheduled
check and by `emoloop storage prune [--dry-run]`.

Each kind has its own age in days (None keeps it forever):
- `predictions_days`: predictions no feedback came for, with their clips unless another
  prediction or a replay exemplar still uses the clip;
- `clips_days`: sooner than that, the bytes of clips that only such predictions use (the clip row
  stays, marked `removed_at`, for the predictions that name it);
- `rejected_versions_days`: candidate versions the gate rejected: their model and state files
  and replay exemplars go, the row stays as `deleted` with its gate report;
- `run_details_days`: finished runs' counts, gate report and error text (the run row, its
  status, times and candidate stay; a registered candidate keeps its own gate report).

What is never touched: any prediction with feedback (pending, consumed, held out for the gate
set: the gate set, personal models and joint training are built from feedback), any clip a
replay exemplar uses, and every version that is active, retired (a rollback target) or a
candidate. Each batch locks the rows it deletes and checks them again in a fresh statement, so
feedback that committed meanwhile keeps its prediction. Rows go in batches of one transaction
each (other writers wait for one batch at most); the bytes go after each commit, so a crash
leaves unreferenced artifacts for the sweep, never a row without its bytes.
"""
import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from sqlalchemy import Select, Text, cast, delete, exists, func, null, select, update
from sqlalchemy.orm import Session, sessionmaker

from storage.artifacts import ArtifactRef, ArtifactStore
from storage.db import one_of
from storage.models import (Clip, Feedback, ModelVersion, Prediction, ReplayExemplar,
                            TrainingRun, utcnow)
from storage.settings import RetentionSettings

log = logging.getLogger("emoloop.storage")

BATCH = 5000
FINISHED = ("accepted", "rejected", "skipped", "failed")


@dataclass
class PruneReport:
    dry_run: bool
    predictions: int = 0
    clips: int = 0  # clip rows deleted with their predictions
    clip_bytes_removed: int = 0  # clips whose bytes went while their rows stay
    rejected_versions: int = 0
    replay_exemplars: int = 0
    run_details: int = 0
    freed_bytes: int = 0  # artifact bytes the store no longer holds (or would not)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def prune(session_factory: sessionmaker[Session], artifacts: ArtifactStore,
          retention: RetentionSettings, *, dry_run: bool = False,
          now: datetime | None = None) -> PruneReport:
    """Apply every retention setting that is set; returns what went (or would go)."""
    started = time.perf_counter()
    now = now or utcnow()
    report = PruneReport(dry_run)
    unanswered_old = None
    if retention.predictions_days is not None:
        unanswered_old = _unanswered_before(now - _days(retention.predictions_days))
        _prune_predictions(session_factory, artifacts, unanswered_old, report)
    if retention.clips_days is not None:
        _prune_clip_bytes(session_factory, artifacts, now - _days(retention.clips_days),
                          unanswered_old, report)
    if retention.rejected_versions_days is not None:
        _prune_rejected(session_factory, artifacts,
                        now - _days(retention.rejected_versions_days), report)
    if retention.run_details_days is not None:
        _prune_run_details(session_factory, now - _days(retention.run_details_days), report)
    report.seconds = round(time.perf_counter() - started, 3)
    if not dry_run and any((report.predictions, report.clip_bytes_removed,
                            report.rejected_versions, report.run_details)):
        log.info("retention: %s", report.as_dict())
    return report


def _days(days: float) -> timedelta:
    return timedelta(days=days)


def _has_feedback(prediction_id) -> object:
    return exists().where(Feedback.prediction_id == prediction_id)


def _unanswered_before(cutoff: datetime):
    return (Prediction.created_at < cutoff) & ~_has_feedback(Prediction.id)


# --- predictions without feedback, with their clips -------------------------------------------

def _prune_predictions(session_factory, artifacts, old, report: PruneReport) -> None:
    if report.dry_run:
        with session_factory() as session:
            report.predictions = session.scalar(select(func.count()).where(old))
            used_elsewhere = exists().where(Prediction.clip_id == Clip.id, ~old) | exists().where(
                ReplayExemplar.clip_id == Clip.id)
            count, size = session.execute(select(
                func.count(), func.coalesce(func.sum(Clip.size_bytes).filter(
                    Clip.removed_at.is_(None)), 0)).where(
                exists().where(Prediction.clip_id == Clip.id, old), ~used_elsewhere)).one()
            session.rollback()
        report.clips, report.freed_bytes = count, report.freed_bytes + int(size)
        return

    def recheck(session: Session, batch: list) -> Select:
        return select(Prediction.id).where(one_of(session, Prediction.id, batch),
                                           ~_has_feedback(Prediction.id))

    for ids in _batches(session_factory, select(Prediction.id).where(old), Prediction.id):
        with session_factory() as session:
            ids = _lock_and_recheck(session, ids, Prediction.id, recheck)
            clip_ids = list(session.scalars(select(Prediction.clip_id).distinct()
                                            .where(one_of(session, Prediction.id, ids))))
            session.execute(delete(Prediction).where(one_of(session, Prediction.id, ids))
                            .execution_options(synchronize_session=False))
            gone = list(session.execute(select(Clip.id, Clip.artifact_path, Clip.sha256,
                                               Clip.size_bytes, Clip.removed_at).where(
                one_of(session, Clip.id, clip_ids),
                ~exists().where(Prediction.clip_id == Clip.id),
                ~exists().where(ReplayExemplar.clip_id == Clip.id))))
            session.execute(delete(Clip).where(one_of(session, Clip.id, [c.id for c in gone]))
                            .execution_options(synchronize_session=False))
            session.commit()
        report.predictions += len(ids)
        report.clips += len(gone)
        live = [c for c in gone if c.removed_at is None]
        artifacts.remove([ArtifactRef(c.artifact_path, c.sha256) for c in live])
        report.freed_bytes += sum(c.size_bytes for c in live)


def _batches(session_factory, query: Select, key):
    """The ids `query` finds, BATCH at a time in key order (keyset: each batch reads only its own
    rows), read in a short transaction of their own."""
    last = None
    while True:
        page = query.order_by(key).limit(BATCH)
        if last is not None:
            page = page.where(key > last)
        with session_factory() as session:
            ids = list(session.scalars(page))
            session.rollback()
        if ids:
            yield ids
        if len(ids) < BATCH:
            return
        last = max(ids)


def _lock_and_recheck(session: Session, ids: list, key, recheck) -> list:
    """Lock the rows (PostgreSQL; on SQLite the writer holds the whole database), then check
    them again in a new statement, which sees whatever committed while we waited: feedback that
    arrived meanwhile keeps its prediction."""
    session.execute(select(key).where(one_of(session, key, ids)).with_for_update())
    return list(session.scalars(recheck(session, ids)))


# --- the bytes of clips only unanswered predictions use ---------------------------------------

def _removable_clips(cutoff: datetime, unanswered_old) -> tuple:
    answered_or_young = exists().where(
        Prediction.clip_id == Clip.id,
        (Prediction.created_at >= cutoff) | _has_feedback(Prediction.id))
    conditions = (Clip.removed_at.is_(None), Clip.created_at < cutoff, ~answered_or_young,
                  ~exists().where(ReplayExemplar.clip_id == Clip.id))
    if unanswered_old is not None:  # clips whose rows go with their predictions are not counted
        conditions += (exists().where(Prediction.clip_id == Clip.id, ~unanswered_old),)
    return conditions


def _prune_clip_bytes(session_factory, artifacts, cutoff: datetime, unanswered_old,
                      report: PruneReport) -> None:
    conditions = _removable_clips(cutoff, unanswered_old)
    if report.dry_run:
        with session_factory() as session:
            count, size = session.execute(select(func.count(), func.coalesce(
                func.sum(Clip.size_bytes), 0)).where(*conditions)).one()
            session.rollback()
        report.clip_bytes_removed, report.freed_bytes = count, report.freed_bytes + int(size)
        return

    def recheck(session: Session, batch: list) -> Select:
        return select(Clip.id).where(one_of(session, Clip.id, batch), *conditions)

    for ids in _batches(session_factory, select(Clip.id).where(*conditions), Clip.id):
        with session_factory() as session:
            ids = _lock_and_recheck(session, ids, Clip.id, recheck)
            clips = list(session.execute(select(Clip.artifact_path, Clip.sha256, Clip.size_bytes)
                                         .where(one_of(session, Clip.id, ids))))
            session.execute(update(Clip).where(one_of(session, Clip.id, ids))
                            .values(removed_at=utcnow())
                            .execution_options(synchronize_session=False))
            session.commit()
        artifacts.remove([ArtifactRef(c.artifact_path, c.sha256) for c in clips])
        report.clip_bytes_removed += len(ids)
        report.freed_bytes += sum(c.size_bytes for c in clips)


# --- rejected candidate versions ---------------------------------------------------------------

def _prune_rejected(session_factory, artifacts, cutoff: datetime, report: PruneReport) -> None:
    with session_factory() as session:
        rows = list(session.scalars(select(ModelVersion).where(
            ModelVersion.status == "rejected", ModelVersion.created_at < cutoff)
            .with_for_update()))
        versions = [v.version for v in rows]
        exemplars = session.scalar(select(func.count()).where(
            ReplayExemplar.model_version.in_(versions))) if versions else 0
        refs = [ArtifactRef(v.artifact_path, v.sha256) for v in rows]
        refs += [ArtifactRef(v.state_path, v.state_sha256) for v in rows if v.state_path]
        sizes = sum(artifacts.size_of(ref) or 0 for ref in refs)
        if not report.dry_run and rows:
            session.execute(delete(ReplayExemplar).where(
                ReplayExemplar.model_version.in_(versions)))
            for row in rows:
                row.status = "deleted"
                row.metrics = {**row.metrics, "pruned_at": utcnow().isoformat()}
            session.commit()
            artifacts.remove(refs)
        else:
            session.rollback()
    report.rejected_versions, report.replay_exemplars = len(versions), exemplars
    report.freed_bytes += sizes


# --- finished runs' details --------------------------------------------------------------------

def _prune_run_details(session_factory, cutoff: datetime, report: PruneReport) -> None:
    has_details = (func.length(cast(TrainingRun.counts, Text)) > 2) | TrainingRun.error.is_not(
        None) | (cast(TrainingRun.gate_report, Text) != "null")  # NULL or JSON null: none
    conditions = (TrainingRun.status.in_(FINISHED), TrainingRun.finished_at < cutoff, has_details)
    with session_factory() as session:
        if report.dry_run:
            report.run_details = session.scalar(select(func.count()).where(*conditions))
            session.rollback()
            return
        report.run_details = session.execute(
            update(TrainingRun).where(*conditions).values(counts={}, gate_report=null(),
                                                          error=None)
            .execution_options(synchronize_session=False)).rowcount
        session.commit()
