"""Past one machine, in miniature, on one real PostgreSQL: two `emoloop serve` processes with
separate data folders (two API nodes) and one `emoloop learner serve`, sharing nothing but the
database (rows, clips and model files, version changes). Predictions on node A, corrections on
node B; the learner killed with SIGKILL in the middle of a round and started again, which
recovers and learns from the same feedback; the new version served by both, a rollback from B
seen by A; then node A killed with SIGKILL while a client loads both nodes, with every request
to B answered and everything A answered before it died in the database."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from service.bench.local_server import free_port, stop_process_group
from storage.artifacts import open_artifact_store
from storage.db import create_db_engine, make_session_factory
from storage.models import Feedback, Prediction, TrainingRun
from tests.learner.toy_learning import register_active, toy_wav
from tests.service.conftest import bearer

pytestmark = pytest.mark.postgres

EMOLOOP = str(Path(sys.executable).with_name("emoloop"))
TOY_ROUND = {"EMOLOOP_LEARNER__MIN_NEW_FEEDBACK": "12", "EMOLOOP_LEARNER__INTERVAL_S": "2",
             "EMOLOOP_LEARNER__STEPS": "6", "EMOLOOP_LEARNER__BATCH_SIZE": "8",
             "EMOLOOP_LEARNER__REPLAY_BATCH_SIZE": "4", "EMOLOOP_LEARNER__MEM_SIZE": "16",
             "EMOLOOP_LEARNER__CROP_FRAMES": "100", "EMOLOOP_LEARNER__HOLDOUT_SHARE": "0.25",
             "EMOLOOP_LEARNER__EWC_LAMBDA": "10", "EMOLOOP_LEARNER__DISTILL_WEIGHT": "1"}
# A round that would train for many minutes: a kill lands in it whatever the machine's speed.
ENDLESS_ROUND = {**TOY_ROUND, "EMOLOOP_LEARNER__STEPS": "1000000"}


@pytest.fixture
def database_backend() -> str:
    return "postgresql"


def node_env(settings, folder: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "EMOLOOP_DATABASE_URL": settings.database.url,
            "EMOLOOP_DATA_DIR": str(folder), "EMOLOOP_STORAGE__ARTIFACTS": "database",
            "EMOLOOP_PERSONAL__ENABLED": "false", "OMP_NUM_THREADS": "1", **extra}


def start(command: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([EMOLOOP, *command], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_9(process: subprocess.Popen) -> None:
    """SIGKILL to the whole process group, as a machine losing power would; reaped, so that
    its pid is gone (what a learner on the same host checks before taking over the lock)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


class Node:
    def __init__(self, settings, folder: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        # Polls far apart: only LISTEN/NOTIFY can bring a version change in time.
        self.process = start(["serve", "--port", str(self.port), "--workers", "1",
                              "--log-level", "warning"],
                             node_env(settings, folder, EMOLOOP_LEARNER__ENABLED="false",
                                      EMOLOOP_API__MODEL_POLL_INTERVAL_S="30"))

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, self.process.stdout.read()
            try:
                if httpx.get(f"{self.base}/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the node did not become ready"
            time.sleep(0.2)

    def post(self, path: str, key: str, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.base}{path}", headers=bearer(key), timeout=30, **kwargs)

    def predict(self, key: str, audio: bytes) -> dict:
        response = self.post("/v1/predictions", key,
                             files={"file": ("clip.wav", audio, "audio/wav")})
        assert response.status_code == 201, response.text
        return response.json()

    def correct(self, key: str, prediction_id: str, label: str) -> int:
        response = self.post(f"/v1/predictions/{prediction_id}/feedback", key,
                             json={"label": label})
        assert response.status_code == 201, response.text
        return response.json()["feedback_id"]

    def serves(self, key: str) -> int:
        return self.predict(key, toy_wav("happy", 99))["model_version"]

    def runs(self, admin_key: str) -> list[dict]:
        response = httpx.get(f"{self.base}/v1/admin/runs", headers=bearer(admin_key), timeout=30)
        assert response.status_code == 200, response.text
        return response.json()["runs"]


def wait_until_served(node: Node, key: str, version: int, limit_s: float) -> float:
    start_time = time.perf_counter()
    while node.serves(key) != version:
        assert time.perf_counter() - start_time < limit_s, f"{node.base} still serves another"
        time.sleep(0.02)
    return time.perf_counter() - start_time


def wait_for_run(node: Node, admin_key: str, learner: subprocess.Popen, done, what: str,
                 timeout_s: float = 180) -> dict:
    """The newest run once `done(run)` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = node.runs(admin_key)
        if runs and done(runs[0]):
            return runs[0]
        assert learner.poll() is None, learner.stdout.read()
        assert time.monotonic() < deadline, f"no round {what}"
        time.sleep(0.2)


class Load:
    """Clients on both nodes at once, predictions and corrections, until stopped: on A, a
    prediction then its correction on A or on B in turn; on B, a prediction and its correction
    on B, and corrections of A's predictions. Records every answer."""

    def __init__(self, a: Node, b: Node, key: str):
        self.a, self.b, self.key = a, b, key
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.a_predictions: list[str] = []  # answered 201 by A
        self.a_feedback: list[int] = []
        self.b_predictions: list[str] = []
        self.b_feedback: list[int] = []
        self.b_failures: list[str] = []
        self.b_answered = 0
        self._threads = ([threading.Thread(target=self._on_a, args=(i,)) for i in range(2)]
                         + [threading.Thread(target=self._on_b, args=(i,)) for i in range(2)])

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join()

    def _on_a(self, client: int) -> None:
        with httpx.Client(timeout=30) as http:
            i = 0
            while not self.stop.is_set():
                i += 1
                label = ("happy", "sad")[i % 2]
                try:
                    answer = http.post(f"{self.a.base}/v1/predictions", headers=bearer(self.key),
                                       files={"file": ("clip.wav", toy_wav(label, 5000 + 1000
                                                                          * client + i),
                                                       "audio/wav")})
                except httpx.TransportError:  # A is gone: what it never answered is not owed
                    time.sleep(0.05)
                    continue
                if answer.status_code != 201:
                    continue
                prediction_id = answer.json()["prediction_id"]
                with self.lock:
                    self.a_predictions.append(prediction_id)
                if i % 2:
                    self._correct_on_b(http, prediction_id, label)
                    continue
                try:
                    corrected = http.post(f"{self.a.base}/v1/predictions/{prediction_id}/feedback",
                                          headers=bearer(self.key), json={"label": label})
                except httpx.TransportError:
                    continue
                if corrected.status_code == 201:
                    with self.lock:
                        self.a_feedback.append(corrected.json()["feedback_id"])

    def _on_b(self, client: int) -> None:
        with httpx.Client(timeout=30) as http:
            i = 0
            while not self.stop.is_set():
                i += 1
                label = ("happy", "sad")[i % 2]
                answer = self._on_b_request(http, "/v1/predictions", files={"file": (
                    "clip.wav", toy_wav(label, 9000 + 1000 * client + i), "audio/wav")})
                if answer is None:
                    continue
                with self.lock:
                    self.b_predictions.append(answer["prediction_id"])
                self._correct_on_b(http, answer["prediction_id"], label)

    def _correct_on_b(self, http: httpx.Client, prediction_id: str, label: str) -> None:
        answer = self._on_b_request(http, f"/v1/predictions/{prediction_id}/feedback",
                                    json={"label": label})
        if answer is not None:
            with self.lock:
                self.b_feedback.append(answer["feedback_id"])

    def _on_b_request(self, http: httpx.Client, path: str, **kwargs) -> dict | None:
        try:
            response = http.post(f"{self.b.base}{path}", headers=bearer(self.key), **kwargs)
        except httpx.TransportError as err:
            failure = f"{path}: {err!r}"
        else:
            if response.status_code == 201:
                with self.lock:
                    self.b_answered += 1
                return response.json()
            failure = f"{path}: {response.status_code} {response.text}"
        with self.lock:
            self.b_failures.append(failure)
        return None


def wait_for(condition, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_two_nodes_and_a_learner_share_only_the_database_and_survive_kill_9(
        settings, keys, toy_model, toy_base_sets, tmp_path):
    engine = create_db_engine(settings.database.url)
    sessions = make_session_factory(engine)
    shared = settings.model_copy(update={"storage": settings.storage.model_copy(
        update={"artifacts": "database"})})
    register_active(sessions, open_artifact_store(shared, engine), toy_model)
    a, b = Node(settings, tmp_path / "a"), Node(settings, tmp_path / "b")
    learner_env = node_env(settings, tmp_path / "learner",
                           EMOLOOP_LEARNER__BASE_SETS_DIR=str(toy_base_sets))
    processes = [a.process, b.process]
    try:
        a.wait_ready()
        b.wait_ready()
        labels = ["happy", "sad"] * 6
        answers = [a.predict(keys.app, toy_wav(label, i)) for i, label in enumerate(labels)]
        corrections = [b.correct(keys.app, answer["prediction_id"], label)
                       for answer, label in zip(answers, labels)]

        # The learner killed in the middle of a round: the active version serves on, on both
        # nodes, and the round's feedback is still there, unconsumed.
        learner = start(["learner", "serve"], {**learner_env, **ENDLESS_ROUND})
        processes.append(learner)
        killed = wait_for_run(b, keys.admin, learner, lambda run: run["status"] == "running",
                              "started")
        assert a.serves(keys.app) == b.serves(keys.app) == 1
        kill_9(learner)
        assert a.serves(keys.app) == b.serves(keys.app) == 1
        with sessions() as session:
            assert session.get(TrainingRun, killed["id"]).status == "running"  # as it died
            assert session.scalars(select(Feedback.consumed_by_run_id).where(
                Feedback.id.in_(corrections))).all() == [None] * 12

        # Started again, the learner proves the holder dead (its pid is gone from this host),
        # marks the dead round failed and learns from the same feedback.
        learner = start(["learner", "serve"], {**learner_env, **TOY_ROUND})
        processes.append(learner)
        run = wait_for_run(b, keys.admin, learner,
                           lambda run: run["id"] != killed["id"] and run["status"] != "running",
                           "finished after the restart")
        assert run["status"] == "accepted", run
        assert run["counts"]["feedback"] == 12  # the clips node A stored, read by the learner
        dead = next(r for r in b.runs(keys.admin) if r["id"] == killed["id"])
        assert dead["status"] == "failed" and "interrupted" in dead["error"]
        new = run["candidate_version"]

        for node in (a, b):  # the learner activated it; both nodes were told
            wait_until_served(node, keys.app, new, limit_s=5.0)
        rollback = b.post("/v1/admin/models/1/activate", keys.admin,
                          json={"reason": "rollback from node B"})
        assert rollback.status_code == 200, rollback.text
        assert wait_until_served(a, keys.app, 1, limit_s=1.0) < 1.0
        assert b.serves(keys.app) == 1

        # Node A killed under load: B answers every request, before and after; whatever A
        # answered with a 201 before it died is in the database.
        with Load(a, b, keys.app) as load:
            wait_for(lambda: len(load.a_predictions) >= 10 and load.b_answered >= 10,
                     "the load did not get going on both nodes")
            kill_9(a.process)
            after_kill = load.b_answered
            wait_for(lambda: load.b_answered >= after_kill + 20, "B stopped answering")
        assert load.b_failures == []
        # B serves the rolled-back version, or a newer one that a later round (the learner
        # still runs every 2 s, on the load's corrections) accepted and activated meanwhile.
        accepted_later = {r["candidate_version"] for r in b.runs(keys.admin)
                          if r["id"] not in (killed["id"], run["id"])
                          and r["status"] == "accepted"}
        assert b.serves(keys.app) in {1} | accepted_later
        with sessions() as session:
            stored = set(session.scalars(select(Prediction.id)))
            assert {str(p) for p in stored} >= {*load.a_predictions, *load.b_predictions}
            feedback = dict(session.execute(
                select(Feedback.id, Feedback.consumed_by_run_id)).all())
        # Not one correction lost: the first twelve consumed by the accepted round, the rest
        # waiting for the next, or taken by it if the learner (still serving, every 2 s) got to
        # them first; never by the killed round.
        assert {i: feedback.get(i) for i in corrections} == {i: run["id"] for i in corrections}
        later = [*load.a_feedback, *load.b_feedback]
        assert all(i in feedback for i in later)
        later_rounds = {r["id"] for r in b.runs(keys.admin)} - {killed["id"], run["id"]}
        assert {feedback[i] for i in later} <= {None} | later_rounds

        # Nothing of the shared state on the nodes' disks (a running node's write probe,
        # service/store_probe.py, lives a few milliseconds every few seconds: not state).
        assert [p for name in ("a", "b") for p in (tmp_path / name).rglob("*")
                if p.is_file() and not p.name.startswith(".ready-probe-")] == []
    finally:
        for process in processes:
            if process.poll() is None:
                stop_process_group(process)
        engine.dispose()
