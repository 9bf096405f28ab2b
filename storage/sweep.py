"""Sweeping the artifact store of files no row refers to.

Every writer puts its file first and its row after (a row never points at a missing file), and
forgetting a user deletes the rows first and the files after the commit. A crash in between
leaves a file nothing refers to: a clip of a user who asked to be forgotten, the model file of a
round that never committed, the temporary file of a write cut short. The learner's scheduled job
and `emoloop artifacts sweep` delete such files once they are older than `storage.sweep_after_s`;
a younger one may belong to a write whose row is about to commit. (A clip stored again with the
same bytes gets its file's time refreshed, so an old file becoming referenced again is young.)
"""
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage.artifacts import ArtifactStore
from storage.models import Clip, ModelVersion

log = logging.getLogger("emoloop.storage")

_BATCH = 500  # files looked up in the database at a time (bounded IN lists)


def sweep_unreferenced(session_factory: sessionmaker[Session], artifacts: ArtifactStore, *,
                       older_than_s: float) -> list[str]:
    """Delete the store's files that no clip or model version row refers to and that were last
    written more than `older_than_s` ago; returns their relative paths."""
    cutoff = time.time() - older_than_s
    removed: list[str] = []
    batch: list[Path] = []
    for path in _old_files(artifacts.root, cutoff):
        batch.append(path)
        if len(batch) == _BATCH:
            removed += _remove_unreferenced(session_factory, artifacts.root, batch, cutoff)
            batch = []
    removed += _remove_unreferenced(session_factory, artifacts.root, batch, cutoff)
    if removed:
        log.info("removed %d unreferenced file(s) from the artifact store", len(removed))
    return removed


def _old_files(root: Path, cutoff: float) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_mtime < cutoff:
                yield path
        except FileNotFoundError:  # removed while we looked
            continue


def _remove_unreferenced(session_factory: sessionmaker[Session], root: Path, paths: list[Path],
                         cutoff: float) -> list[str]:
    if not paths:
        return []
    relative = {p.relative_to(root).as_posix(): p for p in paths}
    with session_factory() as session:
        names = list(relative)
        referenced = set(session.scalars(select(Clip.artifact_path)
                                         .where(Clip.artifact_path.in_(names))))
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
