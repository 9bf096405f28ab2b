"""Past one machine, in miniature, on one real PostgreSQL: two `emoloop serve` processes with
separate data folders (two API nodes) and one `emoloop learner serve`, sharing nothing but the
database (rows, clips and model files, version changes). Predictions on node A, corrections on
node B, a round in the learner, the new version served by both, a rollback from B seen by A."""
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.bench.local_server import free_port, stop_process_group
from storage.artifacts import open_artifact_store
from storage.db import create_db_engine, make_session_factory
from tests.learner.toy_learning import register_active, toy_wav
from tests.service.conftest import bearer

pytestmark = pytest.mark.postgres

EMOLOOP = str(Path(sys.executable).with_name("emoloop"))


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

    def serves(self, key: str) -> int:
        return self.predict(key, toy_wav("happy", 99))["model_version"]


def wait_until_served(node: Node, key: str, version: int, limit_s: float) -> float:
    start_time = time.perf_counter()
    while node.serves(key) != version:
        assert time.perf_counter() - start_time < limit_s, f"{node.base} still serves another"
        time.sleep(0.02)
    return time.perf_counter() - start_time


def test_two_nodes_and_a_learner_share_only_the_database(settings, keys, toy_model,
                                                         toy_base_sets, tmp_path):
    engine = create_db_engine(settings.database.url)
    try:
        shared = settings.model_copy(update={"storage": settings.storage.model_copy(
            update={"artifacts": "database"})})
        register_active(make_session_factory(engine), open_artifact_store(shared, engine),
                        toy_model)
    finally:
        engine.dispose()
    a, b = Node(settings, tmp_path / "a"), Node(settings, tmp_path / "b")
    learner = None
    try:
        a.wait_ready()
        b.wait_ready()
        labels = ["happy", "sad"] * 6
        answers = [a.predict(keys.app, toy_wav(label, i)) for i, label in enumerate(labels)]
        for answer, label in zip(answers, labels):
            corrected = b.post(f"/v1/predictions/{answer['prediction_id']}/feedback", keys.app,
                               json={"label": label})
            assert corrected.status_code == 201, corrected.text

        learner = start(["learner", "serve"], node_env(
            settings, tmp_path / "learner", EMOLOOP_LEARNER__BASE_SETS_DIR=str(toy_base_sets),
            EMOLOOP_LEARNER__MIN_NEW_FEEDBACK="12", EMOLOOP_LEARNER__INTERVAL_S="2",
            EMOLOOP_LEARNER__STEPS="6", EMOLOOP_LEARNER__BATCH_SIZE="8",
            EMOLOOP_LEARNER__REPLAY_BATCH_SIZE="4", EMOLOOP_LEARNER__MEM_SIZE="16",
            EMOLOOP_LEARNER__CROP_FRAMES="100", EMOLOOP_LEARNER__HOLDOUT_SHARE="0.25",
            EMOLOOP_LEARNER__EWC_LAMBDA="10", EMOLOOP_LEARNER__DISTILL_WEIGHT="1"))
        deadline = time.monotonic() + 180
        while True:
            runs = httpx.get(f"{b.base}/v1/admin/runs", headers=bearer(keys.admin),
                             timeout=30).json()["runs"]
            if runs and runs[0]["status"] != "running":
                break
            assert learner.poll() is None, learner.stdout.read()
            assert time.monotonic() < deadline, "no round finished"
            time.sleep(0.5)
        run = runs[0]
        assert run["status"] == "accepted", run
        assert run["counts"]["feedback"] == 12  # the clips node A stored, read by the learner
        new = run["candidate_version"]

        for node in (a, b):  # the learner activated it; both nodes were told
            wait_until_served(node, keys.app, new, limit_s=5.0)
        rollback = b.post("/v1/admin/models/1/activate", keys.admin,
                          json={"reason": "rollback from node B"})
        assert rollback.status_code == 200, rollback.text
        assert wait_until_served(a, keys.app, 1, limit_s=1.0) < 1.0
        assert b.serves(keys.app) == 1
        # Nothing of the shared state on the nodes' disks.
        assert [p for name in ("a", "b") for p in (tmp_path / name).rglob("*")
                if p.is_file()] == []
    finally:
        for process in (a.process, b.process, learner):
            if process is not None and process.poll() is None:
                stop_process_group(process)
