"""What learning rounds persist: the lock that lets one round run at a time, the runs and their
gate reports, the feedback a round takes, and each model version's replay exemplars.

Like the other repositories these work in the caller's Session and never commit, except where a
method says so: taking the lock must be visible to other processes at once. Giving it back
happens in the caller's transaction, so that a round's final status and the free lock are seen
together (a client that sees the round end can start the next one at once).
"""
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from storage.models import (Clip, Feedback, LearnerLock, Prediction, ReplayExemplar, TrainingRun,
                            utcnow)

RUN_STATUSES = ("running", "accepted", "rejected", "skipped", "failed")


def holder_is_gone(holder: str | None) -> bool:
    """Whether this process can prove a lock holder (`host:pid:attempt`,
    learner.continual.rounds) dead: it ran on this host and its pid is no longer alive. Another
    host's holder, or a live pid, cannot be proven gone (a pid reused since only delays the
    proof until the lease ends)."""
    host, _, rest = (holder or "").partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


class LearnerLockRepository:
    """The single `learner_lock` row. Taking it is one conditional UPDATE (free, or expired), so
    across any number of processes and either database exactly one caller gets it; a holder that
    died stops blocking others once its lease expires, or at once where a process on its host
    sees its pid gone."""

    def __init__(self, session: Session):
        self.session = session

    def acquire(self, holder: str, ttl_s: float) -> bool:
        """Take the lock for `ttl_s` seconds; False if someone else holds an unexpired lease of
        a holder not provably gone. Commits, so the other processes see it at once."""
        now = utcnow()
        result = self.session.execute(
            update(LearnerLock)
            .where(LearnerLock.id == 1,
                   or_(LearnerLock.holder.is_(None), LearnerLock.expires_at < now))
            .values(holder=holder, acquired_at=now, expires_at=now + timedelta(seconds=ttl_s))
            .execution_options(synchronize_session=False))
        self.session.commit()
        if result.rowcount == 1:
            return True
        current, _ = self.holder()
        self.session.commit()
        return holder_is_gone(current) and self._take_from(current, holder, ttl_s)

    def free_if_holder_gone(self) -> str | None:
        """Free the lock of a holder provably gone (storage.runs.holder_is_gone) and mark its
        runs failed; returns that holder, or None. Commits."""
        current, _ = self.holder()
        self.session.commit()
        if not holder_is_gone(current):
            return None
        mine = f"{socket.gethostname()}:{os.getpid()}:reaper"
        if not self._take_from(current, mine, ttl_s=60.0):
            return None
        TrainingRunRepository(self.session).fail_interrupted()
        self.release(mine)
        self.session.commit()
        return current

    def _take_from(self, dead: str, holder: str, ttl_s: float) -> bool:
        # Conditional on the dead holder still being there: of several processes that saw it
        # gone, one takes the lock.
        now = utcnow()
        result = self.session.execute(
            update(LearnerLock).where(LearnerLock.id == 1, LearnerLock.holder == dead)
            .values(holder=holder, acquired_at=now, expires_at=now + timedelta(seconds=ttl_s))
            .execution_options(synchronize_session=False))
        self.session.commit()
        return result.rowcount == 1

    def renew(self, holder: str, ttl_s: float) -> bool:
        """Extend our lease, in the caller's transaction; False if we no longer hold the lock (it
        expired and another process took it): then the caller must not write its results."""
        result = self.session.execute(
            update(LearnerLock)
            .where(LearnerLock.id == 1, LearnerLock.holder == holder)
            .values(expires_at=utcnow() + timedelta(seconds=ttl_s))
            .execution_options(synchronize_session=False))
        return result.rowcount == 1

    def release(self, holder: str) -> None:
        """Give the lock back if we still hold it, in the caller's transaction."""
        self.session.execute(
            update(LearnerLock).where(LearnerLock.id == 1, LearnerLock.holder == holder)
            .values(holder=None, acquired_at=None, expires_at=None)
            .execution_options(synchronize_session=False))

    def holder(self) -> tuple[str | None, datetime | None]:
        """(holder, expiry) as stored; an expired lease still shows its last holder."""
        row = self.session.execute(select(LearnerLock.holder, LearnerLock.expires_at)
                                   .where(LearnerLock.id == 1)).one()
        return row.holder, row.expires_at


class TrainingRunRepository:
    def __init__(self, session: Session):
        self.session = session

    def start(self, trigger: str, scope: str = "global",
              user_id: str | None = None) -> TrainingRun:
        run = TrainingRun(trigger=trigger, scope=scope, user_id=user_id, status="running",
                          counts={})
        self.session.add(run)
        self.session.flush()
        return run

    def get(self, run_id: int) -> TrainingRun | None:
        return self.session.get(TrainingRun, run_id, populate_existing=True)

    def list_recent(self, limit: int = 50, offset: int = 0, scope: str | None = None,
                    user_id: str | None = None) -> list[TrainingRun]:
        """Runs, newest first."""
        query = select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit).offset(offset)
        if scope is not None:
            query = query.where(TrainingRun.scope == scope)
        if user_id is not None:
            query = query.where(TrainingRun.user_id == user_id)
        return list(self.session.scalars(query))

    def finish(self, run: TrainingRun, status: str, *, counts: dict[str, Any] | None = None,
               gate_report: dict[str, Any] | None = None, error: str | None = None,
               candidate_version: int | None = None) -> TrainingRun:
        if status not in RUN_STATUSES[1:]:
            raise ValueError(f"a run cannot finish as {status!r}")
        run.status, run.finished_at = status, utcnow()
        run.counts = {**(run.counts or {}), **(counts or {})}
        run.gate_report, run.error, run.candidate_version = gate_report, error, candidate_version
        self.session.flush()
        return run

    def fail_interrupted(self) -> int:
        """Mark as failed every run still 'running'. Only the lock holder calls this, right after
        taking the lock: a run can only be running while its process holds the lock, so any left
        over belong to a process that died mid-round."""
        result = self.session.execute(
            update(TrainingRun).where(TrainingRun.status == "running")
            .values(status="failed", finished_at=utcnow(),
                    error="interrupted: the learner stopped before the round finished; its "
                          "feedback stays for the next round")
            .execution_options(synchronize_session=False))
        return result.rowcount


@dataclass(frozen=True)
class FeedbackItem:
    """One piece of feedback with what a round needs to learn from it."""
    feedback_id: int
    label: str
    user_id: str | None
    clip_id: int
    clip_path: str  # relative to the artifact root
    clip_sha256: str


class RoundFeedbackRepository:
    """The feedback side of a round: what is new, what judged earlier rounds, and marking what a
    round took. Every read sees only counting corrections (storage.repositories.FeedbackRepository):
    a superseded one is history."""

    def __init__(self, session: Session):
        self.session = session

    def items_where(self, *conditions) -> list[FeedbackItem]:
        """Feedback (with its clip) matching the conditions on Feedback's columns, oldest first."""
        return self._rows(self._items().where(*conditions).order_by(Feedback.id))

    def unconsumed(self, limit: int | None = None,
                   user_id: str | None = None) -> list[FeedbackItem]:
        """Feedback no round has taken yet, oldest first."""
        query = self._items().where(Feedback.consumed_by_run_id.is_(None)).order_by(Feedback.id)
        if user_id is not None:
            query = query.where(Feedback.user_id == user_id)
        return self._rows(query.limit(limit))

    def accepted_holdout(self, scope: str = "global",
                         user_id: str | None = None) -> list[FeedbackItem]:
        """Feedback that accepted rounds held out to judge their candidates: part of every later
        gate set. Rejected rounds' feedback is left out: it may be exactly what the gate refused."""
        query = (self._items().join(TrainingRun, TrainingRun.id == Feedback.consumed_by_run_id)
                 .where(Feedback.held_out.is_(True), TrainingRun.status == "accepted",
                        TrainingRun.scope == scope)
                 .order_by(Feedback.id))
        if user_id is not None:
            query = query.where(TrainingRun.user_id == user_id)
        return self._rows(query)

    def consumed_for_training(self, scope: str = "global") -> list[FeedbackItem]:
        """Every piece of feedback rounds of this scope trained on so far (for joint training)."""
        query = (self._items().join(TrainingRun, TrainingRun.id == Feedback.consumed_by_run_id)
                 .where(Feedback.held_out.is_(False), TrainingRun.scope == scope)
                 .order_by(Feedback.id))
        return self._rows(query)

    def mark_consumed(self, run_id: int, trained: Sequence[int], held_out: Sequence[int]) -> int:
        """Record that the run took this feedback (and which share it held out); returns how many
        rows were still unconsumed. Rows another round took already are left alone."""
        taken = 0
        for ids, flag in ((list(trained), False), (list(held_out), True)):
            for start in range(0, len(ids), 500):  # bounded IN lists
                result = self.session.execute(
                    update(Feedback)
                    .where(Feedback.id.in_(ids[start:start + 500]),
                           Feedback.consumed_by_run_id.is_(None))
                    .values(consumed_by_run_id=run_id, held_out=flag)
                    .execution_options(synchronize_session=False))
                taken += result.rowcount
        return taken

    def give_back(self, ids: Sequence[int], max_attempts: int) -> list[int]:
        """After a round the gate refused: of this feedback, what has been through fewer than
        `max_attempts` rounds stays unconsumed for the next one, its rejections counted. Returns
        those ids; the caller marks the rest consumed."""
        returned: list[int] = []
        for start in range(0, len(ids), 500):  # bounded IN lists
            chunk = list(ids[start:start + 500])
            returned += self.session.scalars(
                select(Feedback.id).where(Feedback.id.in_(chunk),
                                          Feedback.consumed_by_run_id.is_(None),
                                          Feedback.rejections + 1 < max_attempts)).all()
        for start in range(0, len(returned), 500):
            self.session.execute(
                update(Feedback).where(Feedback.id.in_(returned[start:start + 500]))
                .values(rejections=Feedback.rejections + 1)
                .execution_options(synchronize_session=False))
        return returned

    @staticmethod
    def _items():
        # Only the counting correction of each prediction: a round trains on one label per clip
        # and prediction, however often (and however differently) an app sent it.
        return (select(Feedback.id, Feedback.label, Feedback.user_id, Clip.id.label("clip_id"),
                       Clip.artifact_path, Clip.sha256)
                .join(Prediction, Prediction.id == Feedback.prediction_id)
                .join(Clip, Clip.id == Prediction.clip_id)
                .where(Feedback.superseded_at.is_(None)))

    def _rows(self, query) -> list[FeedbackItem]:
        return [FeedbackItem(r.id, r.label, r.user_id, r.clip_id, r.artifact_path, r.sha256)
                for r in self.session.execute(query)]


@dataclass(frozen=True)
class ExemplarRow:
    """A replay exemplar as the learner sees it: where its features come from, its label, and its
    reservoir weight."""
    source: str  # "base" or "feedback"
    label: str
    weight: float
    base_index: int | None = None
    feedback_id: int | None = None
    clip_id: int | None = None


class ReplayExemplarRepository:
    def __init__(self, session: Session):
        self.session = session

    def for_version(self, version: int) -> list[ExemplarRow]:
        rows = self.session.scalars(select(ReplayExemplar)
                                    .where(ReplayExemplar.model_version == version)
                                    .order_by(ReplayExemplar.id))
        return [ExemplarRow(r.source, r.label, r.weight, r.base_index, r.feedback_id, r.clip_id)
                for r in rows]

    def save(self, version: int, exemplars: Iterable[ExemplarRow]) -> int:
        """Store a version's buffer (replacing any it had); returns the number of rows."""
        self.session.execute(delete(ReplayExemplar).where(ReplayExemplar.model_version == version))
        rows = [ReplayExemplar(model_version=version, source=e.source, label=e.label,
                               weight=float(e.weight), base_index=e.base_index,
                               feedback_id=e.feedback_id, clip_id=e.clip_id) for e in exemplars]
        self.session.add_all(rows)
        self.session.flush()
        return len(rows)

    def feedback_items(self, exemplars: Sequence[ExemplarRow]) -> dict[int, FeedbackItem]:
        """The clips behind feedback exemplars, by feedback id (missing ones are not returned)."""
        ids = [e.feedback_id for e in exemplars if e.feedback_id is not None]
        found: dict[int, FeedbackItem] = {}
        for start in range(0, len(ids), 500):
            for item in RoundFeedbackRepository(self.session).items_where(
                    Feedback.id.in_(ids[start:start + 500])):
                found[item.feedback_id] = item
        return found
