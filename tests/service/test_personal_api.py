"""Personal models over HTTP, on SQLite and PostgreSQL: routing by user, the user's model page,
admin rollback and deletion of personal versions, forgetting a user, a personal version outliving
its global version, and the bounded cache.

The toy world (tests/learner/toy_learning.py): the global toy model hears low clips as sad and
high ones as happy. Alice's happy voice is low (pitch 0.8): the global model hears her happy
clips as sad until her personal model learns them."""
import time

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from learner.checkpoint import model_bytes, model_from_bytes
from learner.personal.model import personal_head_bytes
from learner.personal.rounds import run_personal_rounds
from service.bench.clips import to_wav, voiced_clip
from service.personal_models import LRUCache
from storage.files import sha256_bytes
from storage.forget import user_hash
from storage.models import Clip, Feedback, ModelVersion, Prediction, TrainingRun
from storage.registry import ModelRegistry
from storage.repositories import AuditLog
from tests.learner.toy_learning import TOY_LABELS, toy_wave
from tests.service.conftest import bearer, files_under, predict, wait_ready

PERSONAL = {"min_feedback": 8, "folds": 2, "steps": 20, "lr": 0.05}


def alice_happy(seed: int) -> bytes:
    return to_wav(voiced_clip(0.8, 16_000 * 0.8, seed=seed)[:12_800], 16_000)


def toy_clip(label: str, seed: int) -> bytes:
    return to_wav(toy_wave(label, seed), 16_000)


def alice_items(n: int = 6, seed: int = 1) -> list[tuple[bytes, str]]:
    return ([(alice_happy(seed * 100 + i), "happy") for i in range(n)]
            + [(toy_clip("sad", seed * 100 + i), "sad") for i in range(n)])


@pytest.fixture
def client(learning_app):
    with TestClient(learning_app(personal=PERSONAL)) as client:
        wait_ready(client)
        yield client


def teach(client, key: str, user_id: str, items: list[tuple[bytes, str]]) -> list[dict]:
    """Each clip predicted for the user, then corrected to its label."""
    answers = []
    for audio, label in items:
        answer = predict(client, key, audio, user_id=user_id)
        response = client.post(f"/v1/predictions/{answer['prediction_id']}/feedback",
                               json={"label": label}, headers=bearer(key))
        assert response.status_code == 201, response.text
        answers.append(answer)
    return answers


def personal_round(client, keys, user_id: str) -> dict:
    started = client.post(f"/v1/admin/users/{user_id}/rounds", headers=bearer(keys.admin))
    assert started.status_code == 202, started.text
    deadline = time.monotonic() + 120
    while (run := client.get(f"/v1/admin/runs/{started.json()['run_id']}",
                             headers=bearer(keys.admin)).json())["status"] == "running":
        assert time.monotonic() < deadline, "the personal round did not finish"
        time.sleep(0.05)
    return run


def user_model(client, key: str, user_id: str):
    return client.get(f"/v1/users/{user_id}/model", headers=bearer(key))


def test_a_user_with_a_personal_version_gets_it_and_everyone_else_the_global_one(
        client, keys, db):
    teach(client, keys.app, "alice", alice_items())
    teach(client, keys.app, "bob", [(toy_clip("happy", 9), "happy")])
    page = user_model(client, keys.app, "alice").json()
    assert page == {"user_id": "alice", "personal": False, "version": None,
                    "built_on_version": None, "feedback_count": 12, "min_feedback": 8,
                    "status": "due"}
    assert client.post("/v1/admin/users/alice/rounds",
                       headers=bearer(keys.app)).status_code == 403

    run = personal_round(client, keys, "alice")
    assert (run["status"], run["scope"], run["user_id"]) == ("accepted", "user", "alice"), run
    mine = run["candidate_version"]
    low_happy = alice_happy(seed=4242)
    as_alice = predict(client, keys.app, low_happy, user_id="alice")
    as_bob = predict(client, keys.app, low_happy, user_id="bob")
    anonymous = predict(client, keys.app, low_happy)
    assert (as_alice["personal"], as_alice["model_version"], as_alice["emotion"]) == (
        True, mine, "happy")
    assert (as_bob["personal"], as_bob["model_version"], as_bob["emotion"]) == (False, 1, "sad")
    assert (anonymous["personal"], anonymous["model_version"]) == (False, 1)
    read_back = client.get(f"/v1/predictions/{as_alice['prediction_id']}",
                           headers=bearer(keys.app)).json()
    assert read_back["personal"] is True and read_back["model_version"] == mine
    with db() as session:
        stored = {str(p.id): p.personal for p in session.scalars(select(Prediction))}
    assert stored[as_alice["prediction_id"]] is True and stored[as_bob["prediction_id"]] is False

    assert user_model(client, keys.app, "alice").json() == {
        "user_id": "alice", "personal": True, "version": mine, "built_on_version": 1,
        "feedback_count": 12, "min_feedback": 8, "status": "active"}
    assert user_model(client, keys.app, "bob").json()["status"] == "collecting"
    # Another app has no predictions for alice: to it she does not exist. Admins see everyone.
    hidden = user_model(client, keys.other_app, "alice")
    assert hidden.status_code == 404 and hidden.json()["error"] == "not_found"
    assert user_model(client, keys.admin, "alice").json()["version"] == mine
    listed = client.get("/v1/admin/users/alice/models", headers=bearer(keys.admin)).json()
    assert [(v["version"], v["status"], v["parent_version"], v["user_id"]) for v in listed] == [
        (mine, "active", 1, "alice")]
    assert listed[0]["gate_report"]["scope"] == "user"
    assert client.get("/v1/admin/users/alice/models",
                      headers=bearer(keys.app)).status_code == 403


def test_the_schedule_builds_a_personal_model_once_a_user_has_enough_corrections(
        learning_app, keys):
    schedule = {"enabled": True, "interval_s": 0.2, "min_new_feedback": 1000}  # no global round
    with TestClient(learning_app(schedule, PERSONAL)) as client:
        wait_ready(client)
        teach(client, keys.app, "alice", alice_items())
        deadline = time.monotonic() + 120
        while (page := user_model(client, keys.app, "alice").json())["status"] != "active":
            assert time.monotonic() < deadline, page
            time.sleep(0.1)
        runs = client.get("/v1/admin/runs", headers=bearer(keys.admin)).json()["runs"]
        # One round, or more if a tick came while her corrections were still arriving.
        assert {(r["trigger"], r["scope"], r["user_id"]) for r in runs} == {
            ("schedule", "user", "alice")}
        answer = predict(client, keys.app, alice_happy(3), user_id="alice")
        assert (answer["personal"], answer["model_version"]) == (True, page["version"])


def test_an_admin_rolls_a_personal_version_back_and_deletes_one(client, keys, artifacts, db):
    teach(client, keys.app, "alice", alice_items())
    first = personal_round(client, keys, "alice")["candidate_version"]
    teach(client, keys.app, "alice", alice_items(n=2, seed=2))
    second = personal_round(client, keys, "alice")
    assert second["status"] == "accepted", second
    second = second["candidate_version"]
    listed = client.get("/v1/admin/users/alice/models", headers=bearer(keys.admin)).json()
    assert [(v["version"], v["status"]) for v in listed] == [(first, "retired"),
                                                            (second, "active")]

    back = client.post(f"/v1/admin/users/alice/models/{first}/activate",
                       json={"reason": "the newer one hears her worse"},
                       headers=bearer(keys.admin))
    assert back.status_code == 200 and back.json()["status"] == "active"
    assert predict(client, keys.app, alice_happy(7), user_id="alice")["model_version"] == first
    for wrong in (1, second + 100):  # the global version, an unknown one: not alice's
        response = client.post(f"/v1/admin/users/alice/models/{wrong}/activate",
                               headers=bearer(keys.admin))
        assert response.status_code == 404

    with db() as session:
        path = session.get(ModelVersion, first).artifact_path
    deleted = client.delete(f"/v1/admin/users/alice/models/{first}", headers=bearer(keys.admin))
    assert deleted.status_code == 200 and deleted.json()["status"] == "deleted"
    assert not artifacts.path(path).exists()
    answer = predict(client, keys.app, alice_happy(7), user_id="alice")
    assert (answer["personal"], answer["model_version"]) == (False, 1)  # back on the global one
    again = client.post(f"/v1/admin/users/alice/models/{first}/activate",
                        headers=bearer(keys.admin))
    assert again.status_code == 409 and again.json()["error"] == "cannot_activate"
    with db() as session:
        actions = [(e.action, e.target, e.details.get("user_id"))
                   for e in AuditLog(session).list_recent(limit=2)]
    assert actions == [("model.delete", f"model_version:{first}", "alice"),
                       ("model.activate", f"model_version:{first}", "alice")]


def test_forgetting_a_user_removes_their_data_and_files_and_no_round_sees_them_again(
        client, keys, db, artifacts, settings, toy_base_sets):
    shared = toy_clip("happy", 31)  # the same bytes from alice and from bob: one stored clip
    teach(client, keys.app, "alice", alice_items() + [(shared, "happy")])
    teach(client, keys.app, "bob", [(shared, "happy"), (toy_clip("sad", 32), "sad")])
    assert personal_round(client, keys, "alice")["status"] == "accepted"
    with db() as session:
        alice_clips = {c.artifact_path for c in session.scalars(
            select(Clip).join(Prediction).where(Prediction.user_id == "alice"))}
        shared_path = session.scalars(select(Clip.artifact_path)
                                      .where(Clip.sha256 == sha256_bytes(shared))).one()
        model_paths = {v.artifact_path for v in session.scalars(
            select(ModelVersion).where(ModelVersion.user_id == "alice"))}

    refused = client.delete("/v1/users/alice", headers=bearer(keys.other_app))
    assert refused.status_code == 404  # not that app's user
    forgotten = client.delete("/v1/users/alice", headers=bearer(keys.app))
    assert forgotten.status_code == 200, forgotten.text
    counts = forgotten.json()["deleted"]
    assert (counts["predictions"], counts["feedback"], counts["model_versions"],
            counts["clips"], counts["clips_kept_shared"]) == (13, 13, 1, 12, 1)

    with db() as session:
        def count(model, *where):
            return session.scalar(select(func.count()).select_from(model).where(*where))
        assert count(Prediction, Prediction.user_id == "alice") == 0
        assert count(Feedback, Feedback.user_id == "alice") == 0
        assert count(ModelVersion, ModelVersion.user_id == "alice") == 0
        assert count(TrainingRun, TrainingRun.user_id == "alice") == 0
        assert count(Prediction, Prediction.user_id == "bob") == 2
        entry = AuditLog(session).list_recent(limit=1)[0]
    remaining = {str(p.relative_to(artifacts.root)) for p in files_under(artifacts.root)}
    assert not (alice_clips - {shared_path}) & remaining
    assert not model_paths & remaining
    assert shared_path in remaining  # bob's prediction still uses it
    assert (entry.action, entry.target) == ("user.forget", f"user:sha256:{user_hash('alice')}")
    assert "alice" not in str(entry.details)

    assert user_model(client, keys.app, "alice").status_code == 404
    assert user_model(client, keys.admin, "alice").json()["feedback_count"] == 0
    assert predict(client, keys.app, alice_happy(5), user_id="alice")["personal"] is False
    # Later rounds never see her again: no personal round is due, a global round reads bob's only.
    app_settings = client.app.state.settings
    assert run_personal_rounds(db, artifacts, app_settings.learner, app_settings.personal) == []
    started = client.post("/v1/admin/learner/run", headers=bearer(keys.admin))
    deadline = time.monotonic() + 120
    while (run := client.get(f"/v1/admin/runs/{started.json()['run_id']}",
                             headers=bearer(keys.admin)).json())["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert run["counts"]["feedback"] == 2


def test_a_personal_version_keeps_serving_on_its_global_version_until_rebuilt(
        client, keys, db, artifacts, toy_model):
    teach(client, keys.app, "alice", alice_items())
    mine = personal_round(client, keys, "alice")["candidate_version"]
    moved_on = model_from_bytes(toy_model).net  # a new global version: the head nudged
    with torch.no_grad():
        moved_on.head.bias += 0.01
    newer = model_bytes(moved_on, TOY_LABELS)
    with db() as session:
        new_global = ModelRegistry(session, artifacts).register(
            newer, labels=list(TOY_LABELS), parent_version=1).version
        session.commit()
    assert client.post(f"/v1/admin/models/{new_global}/activate",
                       headers=bearer(keys.admin)).status_code == 200

    as_alice = predict(client, keys.app, alice_happy(77), user_id="alice")
    as_bob = predict(client, keys.app, alice_happy(77), user_id="bob")
    assert (as_alice["personal"], as_alice["model_version"], as_alice["emotion"]) == (
        True, mine, "happy")
    assert (as_bob["personal"], as_bob["model_version"]) == (False, new_global)
    page = user_model(client, keys.app, "alice").json()
    assert (page["version"], page["built_on_version"]) == (mine, 1)
    # Her next round rebuilds it on the new global version.
    rebuilt = personal_round(client, keys, "alice")
    assert rebuilt["status"] in ("accepted", "rejected"), rebuilt
    with db() as session:
        assert session.get(ModelVersion, rebuilt["candidate_version"]).parent_version == new_global


def test_personal_heads_are_cached_within_the_bound_and_loaded_on_demand(
        learning_app, keys, db, artifacts, toy_model):
    """Four users whose personal heads always say happy, a cache of two."""
    global_model = model_from_bytes(toy_model)
    head = torch.nn.Linear(global_model.net.head.in_features, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([5.0, -5.0]))  # happy, sad
    data = personal_head_bytes(head, global_model.labels, parent_version=1,
                               parent_sha256=global_model.sha256,
                               parent_kind=global_model.kind)
    assert len(data) <= 1_000_000
    users = [f"user-{i}" for i in range(4)]
    with db() as session:
        registry = ModelRegistry(session, artifacts)
        for user in users:
            registry.activate(registry.register(data, labels=list(global_model.labels),
                                                parent_version=1, scope="user",
                                                user_id=user).version)
        session.commit()
    with TestClient(learning_app(personal={**PERSONAL, "cache_size": 2})) as client:
        wait_ready(client)
        engine = client.app.state.engine
        low = toy_clip("sad", 5)
        for _ in range(2):
            for user in users:
                answer = predict(client, keys.app, low, user_id=user)
                assert (answer["personal"], answer["emotion"]) == (True, "happy")
                assert len(engine.personal.heads) <= 2
        assert predict(client, keys.app, low)["emotion"] == "sad"


def test_the_lru_cache_keeps_the_most_recently_used_within_its_bound():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (1, None, 3, 2)
