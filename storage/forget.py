"""Forgetting a user (the right to be forgotten): every row that holds what they said or what was
learnt from it alone, in one transaction, then the files.

What goes:
- predictions made for the user (`predictions.user_id`), and all feedback on them;
- feedback given for the user (`feedback.user_id`), wherever it points;
- replay exemplars taken from that feedback or from the user's clips;
- the user's personal versions (rows and model files) and personal rounds;
- the user's long recordings (`recordings.user_id`), with their windows and segments;
- each clip those predictions and recordings used, unless a prediction or recording that stays
  still uses it: clips are stored once per content (sha256), so when someone else sent the very
  same bytes, the clip is theirs too and stays, with their prediction.

What stays: global model versions that learnt from the user's corrections before (a trained
network cannot unlearn single examples; no later round sees the data again), and an audit entry
that names the user by the sha256 of their id only.

Rows first, files after the commit: a crash in between leaves unreferenced files, never a row
pointing at a missing file. `forget_user` works in the caller's session and does not commit.
"""
from dataclasses import dataclass, field

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from storage.artifacts import ArtifactRef, ArtifactStore
from storage.files import sha256_bytes
from storage.models import (Clip, Feedback, ModelVersion, Prediction, Recording, ReplayExemplar,
                            TrainingRun)
from storage.repositories import AuditLog


@dataclass
class ForgetReport:
    counts: dict[str, int]
    files: list[ArtifactRef] = field(default_factory=list)  # to delete after the commit


def forget_user(session: Session, user_id: str, *, actor_key_id: int | None = None,
                reason: str | None = None) -> ForgetReport:
    user_predictions = select(Prediction.id).where(Prediction.user_id == user_id)
    user_feedback = select(Feedback.id).where(or_(Feedback.user_id == user_id,
                                                  Feedback.prediction_id.in_(user_predictions)))
    clip_ids = set(session.scalars(select(Prediction.clip_id)
                                   .where(Prediction.user_id == user_id)))
    clip_ids |= set(session.scalars(select(Recording.clip_id).where(
        Recording.user_id == user_id, Recording.clip_id.is_not(None))))
    counts = {
        "replay_exemplars": _delete(session, delete(ReplayExemplar).where(or_(
            ReplayExemplar.feedback_id.in_(user_feedback),
            ReplayExemplar.clip_id.in_(clip_ids)))),
        "feedback": _delete(session, delete(Feedback).where(Feedback.id.in_(user_feedback))),
        "predictions": _delete(session, delete(Prediction).where(Prediction.user_id == user_id)),
        "recordings": _delete(session, delete(Recording).where(Recording.user_id == user_id)),
    }
    # Read only now: on PostgreSQL, deleting the feedback waited for a personal round that was
    # committing a version for this user, so that version is seen here and goes too.
    versions = list(session.scalars(select(ModelVersion).where(
        ModelVersion.scope == "user", ModelVersion.user_id == user_id)))
    version_numbers = [v.version for v in versions]
    # Personal runs first: they point at the personal versions.
    counts["training_runs"] = _delete(session, delete(TrainingRun).where(
        TrainingRun.scope == "user", TrainingRun.user_id == user_id))
    counts["model_versions"] = _delete(session, delete(ModelVersion).where(
        ModelVersion.version.in_(version_numbers)))

    # Exemplars on these clips went above, so only another user's prediction or recording can
    # still use one.
    still_used = set(session.scalars(select(Prediction.clip_id)
                                     .where(Prediction.clip_id.in_(clip_ids))))
    still_used |= set(session.scalars(select(Recording.clip_id)
                                      .where(Recording.clip_id.in_(clip_ids))))
    gone = sorted(clip_ids - still_used)
    clips = list(session.scalars(select(Clip).where(Clip.id.in_(gone))))
    counts["clips"] = _delete(session, delete(Clip).where(Clip.id.in_(gone)))
    counts["clips_kept_shared"] = len(clip_ids) - len(gone)

    files = [ArtifactRef(c.artifact_path, c.sha256) for c in clips]
    files += [ArtifactRef(v.artifact_path, v.sha256) for v in versions]
    files += [ArtifactRef(v.state_path, v.state_sha256) for v in versions if v.state_path]
    AuditLog(session).record("user.forget", f"user:sha256:{user_hash(user_id)}",
                             actor_key_id=actor_key_id, details={**counts, "reason": reason})
    return ForgetReport(counts, files)


def delete_files(artifacts: ArtifactStore, refs: list[ArtifactRef]) -> None:
    """After the commit. A file already gone is not an error, so this may be run again."""
    artifacts.remove(refs)


def user_hash(user_id: str) -> str:
    """How the audit log names a forgotten user: whoever knows the id can find the entry; the
    log itself does not keep it."""
    return sha256_bytes(user_id.encode())[:16]


def _delete(session: Session, statement) -> int:
    return session.execute(statement.execution_options(synchronize_session=False)).rowcount
