"""The model registry: every model version, which one serves, and how it got there.

Like the other repositories it works in the caller's Session and never commits; whatever one call
changes (a new row, a retired and an activated version plus the audit entry) lands in the
caller's one transaction, and so does the notice of an activation to other processes
(storage.version_events). Registry writes first lock the `model_version_counter` row, so on
PostgreSQL concurrent registrations and activations queue up instead of colliding (SQLite
transactions already take the write lock at BEGIN, see storage.db).
"""
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.artifacts import ArtifactError, ArtifactStore
from storage.files import sha256_bytes
from storage.models import ModelVersion, ModelVersionCounter, utcnow
from storage.repositories import AuditLog
from storage.version_events import announce


class RegistryError(RuntimeError):
    pass


class VersionNotFound(RegistryError, LookupError):
    pass


class CannotActivate(RegistryError):
    pass


class ModelRegistry:
    def __init__(self, session: Session, artifacts: ArtifactStore):
        self.session = session
        self.artifacts = artifacts

    def register(self, model_data: bytes, *, labels: list[str], parent_version: int | None,
                 scope: str = "global", user_id: str | None = None,
                 metrics: dict[str, Any] | None = None,
                 gate_report: dict[str, Any] | None = None) -> ModelVersion:
        """Store a model file and record it as a new candidate version with the next number.
        Numbers only go up: concurrent registrations get distinct numbers, deleted ones are never
        reused. Nothing serves it until `activate`."""
        return self._register(model_data, labels=labels, parent_version=parent_version,
                              scope=scope, user_id=user_id, metrics=metrics,
                              gate_report=gate_report, status="candidate")

    def get(self, version: int) -> ModelVersion | None:
        """The version, or None."""
        return self.session.get(ModelVersion, version)

    def list_versions(self, scope: str | None = None,
                      user_id: str | None = None) -> list[ModelVersion]:
        """Versions, oldest first; only one scope or one user's when given."""
        query = select(ModelVersion).order_by(ModelVersion.version)
        if scope is not None:
            query = query.where(ModelVersion.scope == scope)
        if user_id is not None:
            query = query.where(ModelVersion.user_id == user_id)
        return list(self.session.scalars(query))

    def active_global(self) -> ModelVersion | None:
        """The global version that serves, or None before bootstrap."""
        return self._active("global", None)

    def active_for_user(self, user_id: str) -> ModelVersion | None:
        """The user's active personal version, or None."""
        return self._active("user", user_id)

    def activate(self, version: int, *, actor_key_id: int | None = None,
                 reason: str | None = None) -> ModelVersion:
        """Make a version the one that serves its scope (this is also rollback): the previously
        active version of the same scope is retired and an audit entry written, all in the
        caller's transaction. Activating the active version changes nothing. Raises
        VersionNotFound, or CannotActivate for a version the gate rejected."""
        self._lock()
        target = self.session.get(ModelVersion, version, populate_existing=True)
        if target is None:
            raise VersionNotFound(f"no model version {version}")
        if target.status == "rejected":
            raise CannotActivate(f"model version {version} was rejected by the regression gate")
        if target.status == "deleted":
            raise CannotActivate(f"model version {version} was deleted")
        if target.status == "active":
            return target
        previous = self._active(target.scope, target.user_id)
        if previous is not None:
            previous.status = "retired"
            # Flushed before the target turns active: the unique index on the active version
            # must never see two at once, and the ORM would order both UPDATEs by version.
            self.session.flush()
        target.status = "active"
        target.activated_at = utcnow()
        self.session.flush()
        announce(self.session, version=version, scope=target.scope, user_id=target.user_id)
        AuditLog(self.session).record(
            "model.activate", f"model_version:{version}", actor_key_id=actor_key_id,
            details={"previous_version": previous.version if previous else None,
                     "scope": target.scope, "user_id": target.user_id, "reason": reason})
        return target

    def reject(self, version: int, gate_report: dict[str, Any]) -> ModelVersion:
        """Mark a candidate the gate turned down, keeping the gate's numbers."""
        self._lock()
        target = self.session.get(ModelVersion, version, populate_existing=True)
        if target is None:
            raise VersionNotFound(f"no model version {version}")
        if target.status != "candidate":
            raise RegistryError(f"model version {version} is {target.status}, not a candidate")
        target.status = "rejected"
        target.gate_report = gate_report
        self.session.flush()
        return target

    def delete_personal(self, version: int, *, actor_key_id: int | None = None,
                        reason: str | None = None) -> ModelVersion:
        """Mark a personal version deleted (its user falls back to the global model if it was
        active) and write the audit entry; the caller removes its file after committing. The
        row stays: the user's earlier predictions name it. Global versions are never deleted."""
        self._lock()
        target = self.session.get(ModelVersion, version, populate_existing=True)
        if target is None or target.scope != "user":
            raise VersionNotFound(f"no personal model version {version}")
        previous = target.status
        target.status = "deleted"
        self.session.flush()
        announce(self.session, version=version, scope=target.scope, user_id=target.user_id)
        AuditLog(self.session).record(
            "model.delete", f"model_version:{version}", actor_key_id=actor_key_id,
            details={"previous_status": previous, "scope": target.scope,
                     "user_id": target.user_id, "reason": reason})
        return target

    def bootstrap_default(self, model_data: bytes, sha256: str, *, labels: list[str],
                          metrics: dict[str, Any] | None = None) -> ModelVersion | None:
        """On an empty registry, register the bundled default model as the active version 1;
        returns None when versions exist already. The bytes are checked against `sha256` first,
        so a damaged bundled file is never registered."""
        self._lock()
        if self.session.scalar(select(ModelVersion.version).limit(1)) is not None:
            return None
        if sha256_bytes(model_data) != sha256:
            raise ArtifactError(f"bundled model does not match its recorded sha256 {sha256}")
        version = self._register(model_data, labels=labels, parent_version=None, scope="global",
                                 user_id=None, metrics=metrics, gate_report=None,
                                 status="active", activated_at=utcnow())
        AuditLog(self.session).record("model.bootstrap", f"model_version:{version.version}",
                                      details={"sha256": sha256})
        return version

    def register_bundled(self, model_data: bytes, sha256: str, *, labels: list[str],
                         metrics: dict[str, Any] | None = None) -> ModelVersion | None:
        """On a registry that has versions but none of this file (a release brought a new default
        model), register the bundled default as a global candidate without a parent, with an
        audit entry: the active version keeps serving until an admin activates the new one.
        Returns None when a version has this sha256 already, or when the registry is empty
        (that is `bootstrap_default`'s case). Checked against `sha256` like bootstrap_default."""
        self._lock()
        if self.session.scalar(select(ModelVersion.version).limit(1)) is None:
            return None
        if self.session.scalar(select(ModelVersion.version)
                               .where(ModelVersion.sha256 == sha256).limit(1)) is not None:
            return None
        if sha256_bytes(model_data) != sha256:
            raise ArtifactError(f"bundled model does not match its recorded sha256 {sha256}")
        active = self.active_global()
        version = self._register(model_data, labels=labels, parent_version=None, scope="global",
                                 user_id=None, metrics=metrics, gate_report=None,
                                 status="candidate")
        AuditLog(self.session).record(
            "model.register_bundled", f"model_version:{version.version}",
            details={"sha256": sha256, "status": "candidate",
                     "active_version": active.version if active else None,
                     "note": "the bundled default model of this release, registered beside the "
                             "existing versions; it serves once an admin activates it"})
        return version

    def _register(self, model_data: bytes, *, labels, parent_version, scope, user_id, metrics,
                  gate_report, status, activated_at=None) -> ModelVersion:
        if (scope == "user") != (user_id is not None):
            raise RegistryError("a user-scope version needs a user_id, a global one must not "
                                "have one")
        number = self._next_version()
        # Written before the row exists: a crash in between leaves only an unreferenced file,
        # which the next registration of this number (the counter rolled back too) overwrites.
        sha256, path = self.artifacts.put_model(number, model_data, self.session)
        version = ModelVersion(version=number, parent_version=parent_version, scope=scope,
                               user_id=user_id, labels=list(labels), artifact_path=path,
                               sha256=sha256, metrics=metrics or {}, gate_report=gate_report,
                               status=status, activated_at=activated_at)
        self.session.add(version)
        self.session.flush()
        return version

    def _next_version(self) -> int:
        # The UPDATE row-locks the counter until our commit; a concurrent registration waits, then
        # increments the value we committed.
        self.session.execute(update(ModelVersionCounter).where(ModelVersionCounter.id == 1)
                             .values(last_version=ModelVersionCounter.last_version + 1)
                             .execution_options(synchronize_session=False))
        return self.session.scalar(select(ModelVersionCounter.last_version)
                                   .where(ModelVersionCounter.id == 1))

    def _lock(self) -> None:
        self.session.execute(select(ModelVersionCounter.id).where(ModelVersionCounter.id == 1)
                             .with_for_update())

    def _active(self, scope: str, user_id: str | None) -> ModelVersion | None:
        query = select(ModelVersion).where(ModelVersion.status == "active",
                                           ModelVersion.scope == scope)
        if user_id is not None:
            query = query.where(ModelVersion.user_id == user_id)
        return self.session.scalars(query.execution_options(populate_existing=True)).one_or_none()
