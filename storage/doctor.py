"""What `emoloop doctor` checks, and `emoloop serve` at start: is the store sound?

- database integrity: SQLite's `PRAGMA quick_check` (every page and index readable and
  consistent); PostgreSQL keeps its own page checksums, so there it is a round trip;
- schema: the database is at the migrations' head;
- artifacts: the sha256 of every file something relies on: each active model version's model and
  state files, and every clip a replay buffer refers to;
- disk: the data dir's free space against `storage.min_free_bytes`;
- learner lock: a round whose process is provably gone (this host, pid not alive) is marked
  failed and its lock freed now, not when its lease runs out.

Each check gives Findings: a problem found is `ok=False` with a sentence saying what and where.
"""
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from storage.artifacts import ArtifactError, ArtifactStore
from storage.failures import free_space_problem
from storage.migrate import current_revision, head_revision
from storage.models import Clip, ModelVersion, ReplayExemplar
from storage.runs import LearnerLockRepository


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    detail: str


def database_integrity(engine: Engine) -> Finding:
    try:
        with engine.connect() as connection:
            if connection.dialect.name != "sqlite":
                connection.execute(text("SELECT 1"))
                return Finding("database", True, "PostgreSQL answers (it checks its own pages)")
            rows = [row[0] for row in connection.exec_driver_sql("PRAGMA quick_check")]
    except DBAPIError as err:
        return Finding("database", False, f"cannot be read: {err.orig}")
    if rows == ["ok"]:
        return Finding("database", True, "PRAGMA quick_check: ok")
    shown = "; ".join(rows[:5]) + (f" (and {len(rows) - 5} more)" if len(rows) > 5 else "")
    return Finding("database", False, f"PRAGMA quick_check found damage: {shown}")


def schema_at_head(database_url: str) -> Finding:
    current, head = current_revision(database_url), head_revision()
    if current == head:
        return Finding("schema", True, f"at revision {head}")
    return Finding("schema", False, f"at revision {current or 'none'}, not {head}: run "
                                    "`emoloop migrate`")


def artifact_checksums(session_factory: sessionmaker[Session],
                       artifacts: ArtifactStore) -> list[Finding]:
    """One finding per file that is missing or does not match its sha256, or one saying all
    were checked."""
    with session_factory() as session:
        files = _relied_on(session)
        session.commit()
    problems = []
    for what, relative, sha256 in files:
        try:
            artifacts.read_checked(relative, sha256)
        except ArtifactError as err:
            problems.append(Finding("artifacts", False, f"{what}: {err}"))
    return problems or [Finding("artifacts", True, f"{len(files)} file(s) match their sha256")]


def free_disk(data_dir: Path, min_free_bytes: int) -> Finding:
    problem = free_space_problem(data_dir, min_free_bytes)
    return Finding("disk", problem is None, problem or "free space above the floor")


def dead_round(session_factory: sessionmaker[Session]) -> Finding:
    with session_factory() as session:
        gone = LearnerLockRepository(session).free_if_holder_gone()
    if gone is None:
        return Finding("learner", True, "no round of a dead process holds the lock")
    # Found and repaired: not a problem any more, but worth saying.
    return Finding("learner", True, f"the round of {gone}, whose process is gone, was marked "
                                    "failed and its lock freed; its feedback stays for the next")


def _relied_on(session: Session) -> list[tuple[str, str, str]]:
    files = []
    for row in session.scalars(select(ModelVersion).where(ModelVersion.status == "active")
                               .order_by(ModelVersion.version)):
        files.append((f"active version {row.version}", row.artifact_path, row.sha256))
        if row.state_path:
            files.append((f"active version {row.version}'s state", row.state_path,
                          row.state_sha256))
    clips = session.execute(select(Clip.id, Clip.artifact_path, Clip.sha256).where(
        Clip.id.in_(select(ReplayExemplar.clip_id).where(ReplayExemplar.clip_id.is_not(None))))
        .order_by(Clip.id))
    files += [(f"replay clip {clip_id}", path, sha256) for clip_id, path, sha256 in clips]
    return files
