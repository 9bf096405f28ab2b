import threading

import pytest
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from storage.artifacts import ArtifactError
from storage.files import sha256_bytes
from storage.models import AuditEntry, ModelVersion
from storage.registry import CannotActivate, ModelRegistry, RegistryError, VersionNotFound
from tests.storage.conftest import LABELS, fake_model


def register(session, artifacts, tag: str, **kwargs) -> ModelVersion:
    version = ModelRegistry(session, artifacts).register(
        fake_model(tag), labels=LABELS, parent_version=kwargs.pop("parent_version", 1), **kwargs)
    session.commit()
    return version


def active_globals(session) -> list[int]:
    return list(session.scalars(select(ModelVersion.version).where(
        ModelVersion.status == "active", ModelVersion.scope == "global")))


def test_bootstrap_registers_the_bundled_model_as_active_version_1(session, artifacts, model_v1):
    assert (model_v1.version, model_v1.status, model_v1.labels) == (1, "active", LABELS)
    assert model_v1.activated_at is not None
    assert artifacts.read_model(model_v1.artifact_path, model_v1.sha256) == fake_model("default")
    registry = ModelRegistry(session, artifacts)
    assert registry.active_global().version == 1
    data = fake_model("another default")
    assert registry.bootstrap_default(data, sha256_bytes(data), labels=LABELS) is None
    assert [a.action for a in session.scalars(select(AuditEntry))] == ["model.bootstrap"]


def test_bootstrap_refuses_a_damaged_bundled_model(session, artifacts):
    with pytest.raises(ArtifactError):
        ModelRegistry(session, artifacts).bootstrap_default(
            b"damaged", sha256_bytes(b"original"), labels=LABELS)
    session.rollback()
    assert session.scalar(select(func.count()).select_from(ModelVersion)) == 0
    assert not artifacts.root.exists() or not any(artifacts.root.rglob("*.safetensors"))


def test_a_new_bundled_model_joins_an_existing_store_as_a_candidate(session, artifacts,
                                                                      model_v1):
    registry = ModelRegistry(session, artifacts)
    register(session, artifacts, "two")
    registry.activate(2)
    session.commit()
    data = fake_model("new release's default")
    bundled = registry.register_bundled(data, sha256_bytes(data), labels=LABELS,
                                        metrics={"test": {"macro_f1": 0.7}})
    session.commit()

    assert (bundled.version, bundled.status, bundled.parent_version, bundled.scope) == (
        3, "candidate", None, "global")
    assert bundled.metrics == {"test": {"macro_f1": 0.7}} and bundled.activated_at is None
    assert artifacts.read_model(bundled.artifact_path, bundled.sha256) == data
    assert registry.active_global().version == 2  # the active version keeps serving
    audit = session.scalars(select(AuditEntry)
                            .where(AuditEntry.action == "model.register_bundled")).one()
    assert (audit.target, audit.actor_key_id) == ("model_version:3", None)
    assert audit.details["sha256"] == sha256_bytes(data) and audit.details["active_version"] == 2
    assert "activates" in audit.details["note"]
    # Once there, or on an empty registry (bootstrap_default's case), nothing is registered.
    assert registry.register_bundled(data, sha256_bytes(data), labels=LABELS) is None
    default = fake_model("default")  # version 1's file
    assert registry.register_bundled(default, sha256_bytes(default), labels=LABELS) is None
    assert [v.version for v in registry.list_versions()] == [1, 2, 3]
    assert registry.activate(3).status == "active"  # an admin can activate it


def test_a_bundled_model_is_registered_beside_others_only_when_intact(session, artifacts,
                                                                     model_v1):
    registry = ModelRegistry(session, artifacts)
    with pytest.raises(ArtifactError):
        registry.register_bundled(b"damaged", sha256_bytes(b"original"), labels=LABELS)
    session.rollback()
    assert [v.version for v in registry.list_versions()] == [1]


def test_no_bundled_candidate_on_an_empty_registry(session, artifacts):
    data = fake_model("default")
    assert ModelRegistry(session, artifacts).register_bundled(data, sha256_bytes(data),
                                                              labels=LABELS) is None
    assert session.scalar(select(func.count()).select_from(ModelVersion)) == 0


def test_a_registered_version_is_a_candidate_with_a_checked_file(session, artifacts, model_v1):
    v2 = register(session, artifacts, "two", metrics={"macro_f1": 0.6})
    assert (v2.version, v2.status, v2.parent_version, v2.metrics) == (2, "candidate", 1,
                                                                     {"macro_f1": 0.6})
    assert artifacts.read_model(v2.artifact_path, v2.sha256) == fake_model("two")
    assert ModelRegistry(session, artifacts).active_global().version == 1  # nothing swapped


def test_concurrent_registrations_get_distinct_increasing_numbers(session_factory, artifacts,
                                                                  model_v1):
    barrier = threading.Barrier(4)
    numbers, errors = [], []

    def worker(n: int) -> None:
        try:
            barrier.wait()
            for i in range(3):
                with session_factory() as session:
                    numbers.append(register(session, artifacts, f"{n}-{i}").version)
        except Exception as err:  # collected: an exception in a thread would otherwise vanish
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(numbers) == list(range(2, 14))
    with session_factory() as session:  # each number's file holds that registration's model
        for v in ModelRegistry(session, artifacts).list_versions():
            artifacts.read_model(v.artifact_path, v.sha256)


def test_a_deleted_versions_number_is_never_reused(session, artifacts, model_v1):
    v2 = register(session, artifacts, "two")
    session.execute(delete(ModelVersion).where(ModelVersion.version == v2.version))
    session.commit()
    assert register(session, artifacts, "three").version == 3


def test_activation_retires_the_old_version_and_audits_in_one_transaction(
        session_factory, artifacts, model_v1, app_key):
    with session_factory() as session:
        register(session, artifacts, "two")
        ModelRegistry(session, artifacts).activate(2, actor_key_id=app_key.id, reason="better")
        session.rollback()  # the caller changes its mind: nothing of it may remain
    with session_factory() as session:
        assert active_globals(session) == [1]
        assert session.scalar(select(func.count()).select_from(AuditEntry).where(
            AuditEntry.action == "model.activate")) == 0

        activated = ModelRegistry(session, artifacts).activate(2, actor_key_id=app_key.id,
                                                               reason="better")
        session.commit()
    with session_factory() as session:
        registry = ModelRegistry(session, artifacts)
        assert activated.status == "active" and activated.activated_at is not None
        assert registry.get(1).status == "retired"
        assert active_globals(session) == [2]
        audit = session.scalars(select(AuditEntry)
                                .where(AuditEntry.action == "model.activate")).one()
        assert (audit.actor_key_id, audit.target) == (app_key.id, "model_version:2")
        assert audit.details["previous_version"] == 1 and audit.details["reason"] == "better"


def test_rollback_to_an_earlier_version(session, artifacts, model_v1):
    registry = ModelRegistry(session, artifacts)
    register(session, artifacts, "two")
    registry.activate(2)
    session.commit()
    registry.activate(1)  # the older version has the lower number: the order of updates matters
    session.commit()
    assert active_globals(session) == [1]
    assert registry.get(2).status == "retired"
    assert registry.activate(1).status == "active"  # activating the active one changes nothing
    session.commit()
    assert session.scalar(select(func.count()).select_from(AuditEntry).where(
        AuditEntry.action == "model.activate")) == 2


def test_concurrent_activations_leave_exactly_one_active_version(session_factory, artifacts,
                                                                 model_v1):
    with session_factory() as session:
        for tag in ("two", "three", "four"):
            register(session, artifacts, tag)
    barrier = threading.Barrier(4)
    errors = []

    def worker(version: int) -> None:
        try:
            with session_factory() as session:
                barrier.wait()
                ModelRegistry(session, artifacts).activate(version)
                session.commit()
        except Exception as err:  # collected: an exception in a thread would otherwise vanish
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(v,)) for v in (1, 2, 3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with session_factory() as session:
        assert len(active_globals(session)) == 1
        statuses = sorted(v.status for v in ModelRegistry(session, artifacts).list_versions())
        assert statuses == ["active", "retired", "retired", "retired"]


def test_the_database_itself_refuses_a_second_active_global_version(session, artifacts,
                                                                    model_v1):
    register(session, artifacts, "two")
    with pytest.raises(IntegrityError):
        session.execute(update(ModelVersion).where(ModelVersion.version == 2)
                        .values(status="active"))


def test_rejected_and_unknown_versions_cannot_be_activated(session, artifacts, model_v1):
    registry = ModelRegistry(session, artifacts)
    register(session, artifacts, "two")
    rejected = registry.reject(2, {"passed": False, "recall_drop": {"sad": 0.2}})
    session.commit()
    assert rejected.status == "rejected" and rejected.gate_report["passed"] is False
    with pytest.raises(CannotActivate):
        registry.activate(2)
    with pytest.raises(VersionNotFound):
        registry.activate(99)
    with pytest.raises(RegistryError):
        registry.reject(1, {})  # the active version is not a candidate
    session.rollback()
    assert active_globals(session) == [1]


def test_personal_versions_are_active_per_user_beside_the_global_one(session, artifacts,
                                                                      model_v1):
    registry = ModelRegistry(session, artifacts)
    mine = register(session, artifacts, "u1 a", scope="user", user_id="u1")
    theirs = register(session, artifacts, "u2", scope="user", user_id="u2")
    registry.activate(mine.version)
    registry.activate(theirs.version)
    session.commit()
    newer = register(session, artifacts, "u1 b", scope="user", user_id="u1",
                     parent_version=mine.version)
    registry.activate(newer.version)
    session.commit()
    assert registry.active_global().version == 1
    assert registry.active_for_user("u1").version == newer.version
    assert registry.get(mine.version).status == "retired"
    assert registry.active_for_user("u2").version == theirs.version
    assert registry.active_for_user("nobody") is None
    assert [v.version for v in registry.list_versions(user_id="u1")] == [mine.version,
                                                                         newer.version]
    assert [v.version for v in registry.list_versions(scope="global")] == [1]


def test_scope_and_user_must_agree(session, artifacts, model_v1):
    registry = ModelRegistry(session, artifacts)
    with pytest.raises(RegistryError):
        registry.register(b"x", labels=LABELS, parent_version=1, scope="user")
    with pytest.raises(RegistryError):
        registry.register(b"x", labels=LABELS, parent_version=1, user_id="u1")
