"""The learning loop over HTTP, on SQLite and PostgreSQL: predictions and corrections in, a round
started by an admin (or by the schedule), the gate's decision, the new version served, rollback;
and a poisoned round the gate refuses."""
import subprocess
import sys
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from storage.repositories import AuditLog
from storage.runs import LearnerLockRepository
from tests.learner.toy_learning import toy_wav
from tests.service.conftest import bearer, predict, wait_ready


@pytest.fixture
def client(learning_app):
    with TestClient(learning_app()) as client:
        wait_ready(client)
        yield client


def _teach(client, key: str, labels: list[str], truth: list[str] | None = None,
           seed: int = 0) -> list[dict]:
    """Predict a toy clip per label (true label from `truth`) and correct it to the label."""
    answers = []
    for i, (label, true) in enumerate(zip(labels, truth or labels)):
        answer = predict(client, key, toy_wav(true, seed * 1000 + i))
        response = client.post(f"/v1/predictions/{answer['prediction_id']}/feedback",
                               json={"label": label}, headers=bearer(key))
        assert response.status_code == 201, response.text
        answers.append(answer)
    return answers


def _wait_for_run(client, key: str, run_id: int, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        run = client.get(f"/v1/admin/runs/{run_id}", headers=bearer(key)).json()
        if run["status"] != "running":
            return run
        assert time.monotonic() < deadline, "the round did not finish"
        time.sleep(0.1)


def _start_round(client, key: str) -> int:
    """Start a round; right after another's outcome shows, the lock is already free (the run's
    end and the lock's release are one transaction)."""
    started = client.post("/v1/admin/learner/run", headers=bearer(key))
    assert started.status_code == 202, started.text
    return started.json()["run_id"]


def _served_version(client, key: str) -> int:
    return predict(client, key, toy_wav("happy", 99))["model_version"]


def test_a_round_started_over_http_is_gated_served_and_rolled_back(client, keys, db):
    _teach(client, keys.app, ["happy", "sad"] * 6)
    for key, status in ((None, 401), (keys.app, 403)):
        headers = bearer(key) if key else {}
        assert client.post("/v1/admin/learner/run", headers=headers).status_code == status
        assert client.get("/v1/admin/runs", headers=headers).status_code == status

    started = client.post("/v1/admin/learner/run", headers=bearer(keys.admin))
    assert started.status_code == 202, started.text
    run = _wait_for_run(client, keys.admin, started.json()["run_id"])
    assert (run["status"], run["trigger"], run["scope"]) == ("accepted", "manual", "global")
    assert run["candidate_version"] == 2 and run["gate_report"]["decision"] == "accepted"
    assert run["counts"]["feedback"] == 12
    listed = client.get("/v1/admin/runs", headers=bearer(keys.admin)).json()["runs"]
    assert [r["id"] for r in listed] == [run["id"]]
    # The run is recorded first, then this process loads the version and swaps it in: it must
    # serve it well within the 2 s every process is allowed.
    deadline = time.monotonic() + 2.0
    while _served_version(client, keys.app) != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _served_version(client, keys.app) == 2
    model = client.get("/v1/models/2", headers=bearer(keys.app)).json()
    assert model["gate_report"] == run["gate_report"] and model["parent_version"] == 1

    rollback = client.post("/v1/admin/models/1/activate", headers=bearer(keys.admin),
                           json={"reason": "back to the bundled model"})
    assert rollback.status_code == 200, rollback.text
    assert _served_version(client, keys.app) == 1
    with db() as session:
        actions = [(e.action, e.target) for e in AuditLog(session).list_recent(limit=3)]
    assert actions == [("model.activate", "model_version:1"), ("model.activate", "model_version:2"),
                       ("learner.run", f"training_run:{run['id']}")]

    missing = client.get("/v1/admin/runs/999", headers=bearer(keys.admin))
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


def test_a_poisoned_round_is_rejected_and_the_active_model_stays(learning_app, keys):
    # Plain fine-tuning, trained hard, so the poison does get into the candidate (ewc+replay
    # mostly shrugs it off on this toy data): the gate must stop it there.
    with TestClient(learning_app({"strategy": "naive", "steps": 30, "lr": 2e-2})) as client:
        wait_ready(client)
        truth = ["happy", "sad"] * 8
        _teach(client, keys.app, ["sad"] * len(truth), truth=truth)  # every correction: 'sad'
        runs = []
        for _ in range(3):  # refused, refused again (the poison was given back once), nothing left
            runs.append(_wait_for_run(client, keys.admin, _start_round(client, keys.admin)))
        served = _served_version(client, keys.app)
        versions = {m["version"]: m["status"]
                    for m in client.get("/v1/models", headers=bearer(keys.app)).json()}

    run = runs[0]
    assert run["status"] == "rejected", run["gate_report"]
    report = run["gate_report"]
    assert report["decision"] == "rejected"
    assert report["recall_after"]["happy"] < report["recall_before"]["happy"] - 0.02
    # Refused on evidence: the paired test of 'happy' on the gate set, Holm-adjusted.
    happy = report["paired"]["happy"]
    assert happy["refused"] and happy["adjusted_p_value"] <= report["alpha"] == 0.05
    assert happy["lost"] >= happy["detectable_loss_clips"]
    assert "old class 'happy' lost more than" in report["reason"]
    assert [r["status"] for r in runs] == ["rejected", "rejected", "skipped"]
    assert [r["counts"].get("given_back") for r in runs[:2]] == [16, 0]
    assert served == 1 and versions == {1: "active", 2: "rejected", 3: "rejected"}


def test_a_round_on_shuffled_labels_is_rejected_and_the_active_model_stays(learning_app, keys):
    # Every correction names a label drawn at random (seeded), whatever the clip says: a
    # candidate trained hard on them unlearns what the gate set shows it knew.
    rng = np.random.default_rng(7)
    truth = ["happy", "sad"] * 12
    shuffled = [str(label) for label in rng.permutation(truth)]
    assert 8 <= sum(a != b for a, b in zip(truth, shuffled)) <= 16
    with TestClient(learning_app({"strategy": "naive", "steps": 30, "lr": 2e-2})) as client:
        wait_ready(client)
        _teach(client, keys.app, shuffled, truth=truth, seed=3)
        run = _wait_for_run(client, keys.admin, _start_round(client, keys.admin))
        served = _served_version(client, keys.app)

    report = run["gate_report"]
    assert run["status"] == "rejected", report
    assert any(t["refused"] for c, t in report["paired"].items() if c in report["old_classes"])
    assert served == 1


def test_a_second_round_is_refused_while_one_holds_the_lock(client, keys, db):
    with db() as session:
        assert LearnerLockRepository(session).acquire("another-process", ttl_s=60)
    refused = client.post("/v1/admin/learner/run", headers=bearer(keys.admin))
    assert refused.status_code == 409 and refused.json()["error"] == "round_running"
    assert client.get("/v1/admin/runs", headers=bearer(keys.admin)).json() == {"runs": []}


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)
def test_the_schedule_starts_a_round_once_enough_feedback_waits(learning_app, keys):
    schedule = {"enabled": True, "interval_s": 0.2, "min_new_feedback": 6}
    with TestClient(learning_app(schedule)) as client:
        wait_ready(client)
        _teach(client, keys.app, ["happy", "sad", "happy", "sad", "happy"])
        time.sleep(1.0)
        assert client.get("/v1/admin/runs", headers=bearer(keys.admin)).json() == {"runs": []}
        _teach(client, keys.app, ["sad"], seed=1)
        deadline = time.monotonic() + 120
        while not (runs := client.get("/v1/admin/runs", headers=bearer(keys.admin)).json()["runs"]):
            assert time.monotonic() < deadline, "the scheduler started no round"
            time.sleep(0.1)
        run = _wait_for_run(client, keys.admin, runs[0]["id"])
        assert run["trigger"] == "schedule" and run["counts"]["feedback"] == 6


def test_serving_never_imports_avalanche():
    code = ("import sys, service.app, service.routes.runs, service.scheduler; "
            "loaded = [m for m in sys.modules if m.split('.')[0] == 'avalanche']; "
            "assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
