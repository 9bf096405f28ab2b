"""Sweeping the artifact store of what no row refers to.

The local store writes a file first and its row after (a row never points at a missing file), and
forgetting a user deletes the rows first and the files after the commit. A crash in between
leaves a file nothing refers to: a clip of a user who asked to be forgotten, the model file of a
round that never committed, the temporary file of a write cut short. The database store writes
bytes in their row's transaction, so only a crash between a commit that deleted rows and the
removal of their bytes leaves blobs behind. The learner's scheduled job and `emoloop artifacts
sweep` delete such leftovers once older than `storage.sweep_after_s`; a younger one may belong to
a write whose row is about to commit. (Bytes stored again get a fresh time, so an old artifact
becoming referenced again is young.)
"""
import logging

from sqlalchemy.orm import Session, sessionmaker

from storage.artifacts import ArtifactStore

log = logging.getLogger("emoloop.storage")


def sweep_unreferenced(session_factory: sessionmaker[Session], artifacts: ArtifactStore, *,
                       older_than_s: float) -> list[str]:
    """Delete what no clip or model version row refers to and that was last written more than
    `older_than_s` ago; returns what went (relative paths, or sha256s in the database store)."""
    removed = artifacts.remove_unreferenced(session_factory, older_than_s)
    if removed:
        log.info("removed %d unreferenced artifact(s) from the %s store", len(removed),
                 artifacts.name)
    return removed
