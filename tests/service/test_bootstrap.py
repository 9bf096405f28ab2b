"""The bundled default model into the registry: version 1 of a fresh install, and on a store that
already has versions, a candidate beside them that serves only once an admin activates it."""
import json
import logging
import time

import pytest

import service.bootstrap as bootstrap
from learner.checkpoint import DEFAULT_MODEL_INFO
from service.bootstrap import BundledModelMissing, register_bundled_model
from storage.registry import ModelRegistry
from tests.service.conftest import bearer, predict

BUNDLED = json.loads(DEFAULT_MODEL_INFO.read_text())


def versions(db, artifacts) -> list[tuple[int, str]]:
    with db() as session:
        return [(v.version, v.status) for v in ModelRegistry(session, artifacts).list_versions()]


def test_an_empty_registry_gets_the_bundled_model_as_active_version_1(db, artifacts):
    assert register_bundled_model(db, artifacts) == 1
    with db() as session:
        row = ModelRegistry(session, artifacts).get(1)
    assert (row.status, row.sha256, row.parent_version) == ("active", BUNDLED["sha256"], None)
    assert row.metrics["test"] == BUNDLED["test"]
    assert register_bundled_model(db, artifacts) is None  # once
    assert versions(db, artifacts) == [(1, "active")]


def test_an_existing_store_keeps_serving_and_gets_the_new_default_beside_it(
        client, keys, db, artifacts, wav_clip, caplog):
    # The store's active version 1 is another model (the random one): an upgrade's first start.
    with caplog.at_level(logging.INFO, logger="emoloop.bootstrap"):
        assert register_bundled_model(db, artifacts) == 2
    notes = [r.getMessage() for r in caplog.records if r.name == "emoloop.bootstrap"]
    assert len(notes) == 1 and "emoloop models activate 2" in notes[0]
    assert register_bundled_model(db, artifacts) is None  # the next start registers nothing
    assert versions(db, artifacts) == [(1, "active"), (2, "candidate")]

    listed = client.get("/v1/models/2", headers=bearer(keys.app)).json()
    assert (listed["status"], listed["parent_version"]) == ("candidate", None)
    assert (listed["sha256"], listed["metrics"]["test"]) == (BUNDLED["sha256"], BUNDLED["test"])
    audit = client.get("/v1/admin/audit", headers=bearer(keys.admin)).json()
    assert [(e["action"], e["target"]) for e in audit][:1] == [("model.register_bundled",
                                                                "model_version:2")]
    time.sleep(0.5)  # a few polls of the registry: nothing switches by itself
    assert predict(client, keys.app, wav_clip)["model_version"] == 1

    activated = client.post("/v1/admin/models/2/activate", json={"reason": "new default"},
                            headers=bearer(keys.admin))
    assert activated.status_code == 200, activated.text
    assert predict(client, keys.app, wav_clip)["model_version"] == 2
    assert register_bundled_model(db, artifacts) is None
    assert versions(db, artifacts) == [(1, "retired"), (2, "active")]


def test_workers_register_it_on_an_empty_registry_only(db, artifacts, seeded):
    assert register_bundled_model(db, artifacts, beside_existing=False) is None
    assert versions(db, artifacts) == [(1, "active")]


def test_missing_bundled_files_matter_only_to_an_empty_registry(db, artifacts, tmp_path,
                                                                monkeypatch):
    monkeypatch.setattr(bootstrap, "DEFAULT_MODEL_FILE", tmp_path / "missing.safetensors")
    with pytest.raises(BundledModelMissing, match="registry is empty"):
        register_bundled_model(db, artifacts)
    assert versions(db, artifacts) == []


def test_missing_bundled_files_leave_an_existing_store_as_it_is(db, artifacts, seeded, tmp_path,
                                                                monkeypatch):
    monkeypatch.setattr(bootstrap, "DEFAULT_MODEL_FILE", tmp_path / "missing.safetensors")
    assert register_bundled_model(db, artifacts) is None
    assert versions(db, artifacts) == [(1, "active")]
