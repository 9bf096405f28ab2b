"""The real server: `emoloop serve` with two worker processes on loopback, and the key and
migration commands around it."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.bench.local_server import free_port, stop_process_group
from learner.labels import DEFAULT_LABELS
from service.bootstrap import create_first_keys
from storage.api_keys import ApiKeyRepository
from storage.registry import ModelRegistry
from storage.repositories import AuditLog

EMOLOOP = str(Path(sys.executable).with_name("emoloop"))


@pytest.fixture
def env(settings) -> dict[str, str]:
    return {**os.environ, "EMOLOOP_DATABASE_URL": settings.database.url,
            "EMOLOOP_DATA_DIR": str(settings.storage.data_dir),
            "EMOLOOP_API__MODEL_POLL_INTERVAL_S": "1.0", "EMOLOOP_LEARNER__ENABLED": "false"}


def test_keys_create_prints_the_new_key_last(env, db):
    result = subprocess.run([EMOLOOP, "keys", "create", "--role", "admin", "--name", "ops"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    plaintext = result.stdout.strip().splitlines()[-1]
    with db() as session:
        key = ApiKeyRepository(session).verify(plaintext)
    assert key is not None and key.role == "admin" and key.name == "ops"


def test_models_list_and_activate(env, db, artifacts, seeded, random_model):
    with db() as session:
        ModelRegistry(session, artifacts).register(random_model, labels=list(DEFAULT_LABELS),
                                                   parent_version=1)
        session.commit()
    activated = subprocess.run([EMOLOOP, "models", "activate", "2", "--reason", "try v2"],
                               env=env, capture_output=True, text=True, timeout=120)
    assert activated.returncode == 0, activated.stderr
    listed = subprocess.run([EMOLOOP, "models", "list"], env=env, capture_output=True, text=True,
                            timeout=60)
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert [(row[0], row[1]) for row in rows] == [("1", "retired"), ("2", "active")]
    missing = subprocess.run([EMOLOOP, "models", "activate", "9"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "no model version 9" in missing.stderr
    with db() as session:
        entry = AuditLog(session).list_recent(limit=1)[0]
    assert (entry.action, entry.details["reason"]) == ("model.activate", "try v2")


def test_serve_refuses_an_unmigrated_database(tmp_path):
    env = {**os.environ, "EMOLOOP_DATA_DIR": str(tmp_path), "EMOLOOP_DATABASE_URL": ""}
    result = subprocess.run([EMOLOOP, "serve", "--port", "1"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "run `emoloop migrate` first" in result.stderr


def test_first_keys_are_made_once(db):
    first = create_first_keys(db)
    assert set(first) == {"app", "admin"}
    assert create_first_keys(db) is None


def test_two_workers_serve_an_activation_within_two_seconds(env, db, artifacts, seeded,
                                                            random_model, wav_clip):
    with db() as session:
        ModelRegistry(session, artifacts).register(random_model, labels=list(DEFAULT_LABELS),
                                                   parent_version=1)
        session.commit()
    port = free_port()
    server = subprocess.Popen([EMOLOOP, "serve", "--port", str(port), "--workers", "2",
                               "--log-level", "warning"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        # First run on a database without keys: two keys, printed once. (Before them, a line
        # says the bundled model joined this store, whose version 1 is another model, as a
        # candidate.)
        printed = ""
        while "admin key" not in printed:
            line = server.stdout.readline()
            assert line, f"the server printed no keys: {printed}"
            printed += line
        assert "emoloop models activate 3" in printed  # the bundled model, waiting
        app_key = re.search(r"app key.*:\s+(emo_\S+)", printed).group(1)
        admin_key = re.search(r"admin key.*:\s+(emo_\S+)", printed).group(1)
        _wait_ready_on_every_worker(base, server)

        def version_served() -> int:  # a new connection each time: any worker may answer
            response = httpx.post(f"{base}/v1/predictions",
                                  files={"file": ("a.wav", wav_clip, "audio/wav")},
                                  headers={"Authorization": f"Bearer {app_key}"}, timeout=30)
            assert response.status_code == 201, response.text
            return response.json()["model_version"]

        assert {version_served() for _ in range(6)} == {1}
        activated = httpx.post(f"{base}/v1/admin/models/2/activate",
                               headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
        assert activated.status_code == 200, activated.text
        time.sleep(max(0.0, 2.0 - activated.elapsed.total_seconds()))
        assert [version_served() for _ in range(10)] == [2] * 10

        metrics = httpx.get(f"{base}/metrics").text  # summed over both workers
        assert len(re.findall(r"emoloop_active_model_version\{pid=\"\d+\"\} 2.0", metrics)) == 2
    finally:
        stop_process_group(server)


def _wait_ready_on_every_worker(base: str, server: subprocess.Popen) -> None:
    deadline, in_a_row = time.monotonic() + 120, 0
    while in_a_row < 10:
        assert server.poll() is None, server.stdout.read()
        assert time.monotonic() < deadline, "the server did not become ready"
        try:
            ready = httpx.get(f"{base}/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            ready = False
        in_a_row = in_a_row + 1 if ready else 0
        time.sleep(0.05 if ready else 0.25)


