"""A locked database and a full disk against the real server (`emoloop serve` on loopback), on
SQLite and PostgreSQL: every answer is 503/507 JSON with Retry-After, never a 500; the client's
keep-alive connection is never dropped; /ready says why and turns back to 200 by itself; and
every correction that got a 2xx is in the store afterwards."""
import http.client
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from service.bench.local_server import free_port, stop_process_group
from storage.models import Feedback
from tests.service.conftest import files_under

EMOLOOP = str(Path(sys.executable).with_name("emoloop"))
MiB = 2**20
# The issue held the lock 30 s against the default 10 s busy timeout; the test's default is 3 s
# against 0.5 s. The README's figure: EMOLOOP_TEST_LOCK_S=30 EMOLOOP_TEST_BUSY_TIMEOUT_S=10.
LOCK_S = float(os.environ.get("EMOLOOP_TEST_LOCK_S", "3"))
BUSY_TIMEOUT_S = os.environ.get("EMOLOOP_TEST_BUSY_TIMEOUT_S", "0.5")


class KeepAliveClient:
    """One HTTP/1.1 connection for every request. A connection the server closes after an
    answer (`Connection: close`, or gone under the next request) counts as dropped; one it closed
    after KEEP_ALIVE_S idle (uvicorn's keep-alive timeout) is opened again, as any client does."""

    KEEP_ALIVE_S = 5.0

    def __init__(self, port: int, key: str):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.key, self.dropped, self.last_answer = key, 0, time.monotonic()

    def send(self, method: str, path: str, **request) -> tuple[int, dict, dict]:
        built = httpx.Request(method, f"http://x{path}", **request)
        headers = {k: v for k, v in built.headers.items() if k.lower() != "host"}
        headers["Authorization"] = f"Bearer {self.key}"
        for attempt in range(2):
            idle_s = time.monotonic() - self.last_answer
            try:
                self.connection.request(method, path, body=built.read() or None,
                                        headers=headers)
                response = self.connection.getresponse()
                body = response.read()
                break
            except (http.client.HTTPException, OSError):
                self.connection.close()
                if attempt or idle_s < self.KEEP_ALIVE_S:
                    self.dropped += 1
                    raise
        self.last_answer = time.monotonic()
        if response.will_close:
            self.dropped += 1
        headers = {name.lower(): value for name, value in response.headers.items()}
        return response.status, headers, json.loads(body) if body else {}


@pytest.fixture
def server(settings, seeded, keys, request):
    """`emoloop serve` on the test's database, with a short busy timeout and a disk floor."""
    port = free_port()
    env = {**os.environ, "EMOLOOP_DATABASE_URL": settings.database.url,
           "EMOLOOP_DATA_DIR": str(settings.storage.data_dir),
           "EMOLOOP_LEARNER__ENABLED": "false", "EMOLOOP_DATABASE__BUSY_TIMEOUT_S": BUSY_TIMEOUT_S,
           "EMOLOOP_STORAGE__MIN_FREE_BYTES": str(getattr(request, "param", 0))}
    process = subprocess.Popen([EMOLOOP, "serve", "--port", str(port), "--log-level", "warning"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the server did not become ready"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield port
    finally:
        stop_process_group(process)


def _predict(client: KeepAliveClient, clip: bytes):
    return client.send("POST", "/v1/predictions", files={"file": ("a.wav", clip, "audio/wav")})


def _correct(client: KeepAliveClient, prediction_id: str, label: str):
    return client.send("POST", f"/v1/predictions/{prediction_id}/feedback",
                       json={"label": label})


@contextmanager
def _database_locked(database_url: str):
    """Another process's transaction holding the write locks until the block ends."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        holder = sqlite3.connect(url.database, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    else:
        conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        holder = psycopg.connect(conninfo)
        holder.execute("LOCK TABLE clips, predictions, feedback, idempotent_requests "
                       "IN EXCLUSIVE MODE")
    try:
        yield
    finally:
        holder.rollback()
        holder.close()


def _wait_ready(client: KeepAliveClient, status: int = 200, timeout_s: float = 15.0) -> dict:
    """/ready's answer once it has this status (it checks the store at most once a second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = client.send("GET", "/ready")
        if answer[0] == status:
            return answer[2]
        assert time.monotonic() < deadline, f"/ready did not turn {status}"
        time.sleep(0.2)


def _accepted_are_stored(db, accepted: set[int]) -> None:
    with db() as session:
        stored = set(session.scalars(select(Feedback.id).where(Feedback.id.in_(accepted))))
    assert stored == accepted


def test_a_locked_database_answers_503_and_recovers_by_itself(server, settings, keys, db,
                                                              wav_clip):
    """Four clients, each on its own keep-alive connection, predict, correct and ask /ready
    while another process holds the database's write lock."""
    clients = [KeepAliveClient(server, keys.app) for _ in range(4)]
    predictions, accepted = [], set()
    for client in clients:  # corrections accepted before the lock
        status, _, answer = _predict(client, wav_clip)
        assert status == 201
        predictions.append(answer["prediction_id"])
        status, _, fixed = _correct(client, answer["prediction_id"], "sad")
        assert status == 201
        accepted.add(fixed["feedback_id"])
    seen, problems = [], []

    def while_locked(client: KeepAliveClient, prediction_id: str, until: float) -> None:
        labels = ["angry", "happy", "sad"]
        try:
            while time.monotonic() < until:
                for status, headers, body in (_predict(client, wav_clip),
                                              _correct(client, prediction_id,
                                                       labels[len(seen) % 3]),
                                              client.send("GET", "/ready")):
                    seen.append(status)
                    if status in (200, 201) and "feedback_id" in body:
                        accepted.add(body["feedback_id"])
                    if status != 503 or headers.get("retry-after") != "5" \
                            or body.get("error") not in ("storage_unavailable", "not_ready") \
                            or "lock" not in body.get("detail", ""):
                        problems.append((status, headers, body))
        except Exception as err:  # noqa: BLE001 (a dropped connection: counted, reported)
            problems.append(err)

    with _database_locked(settings.database.url):
        until = time.monotonic() + LOCK_S
        threads = [threading.Thread(target=while_locked, args=(client, prediction, until))
                   for client, prediction in zip(clients, predictions)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(LOCK_S + 120)
    locked_at = time.monotonic()
    # Nothing can be written, /ready says so, and every answer says why.
    assert not problems, problems[:3]
    assert len(seen) >= 12 and set(seen) == {503}
    _wait_ready(clients[0])
    recovered_s = time.monotonic() - locked_at
    for client, prediction in zip(clients, predictions):
        status, _, fixed = _correct(client, prediction, "angry")
        assert status == 201
        accepted.add(fixed["feedback_id"])
        assert _predict(client, wav_clip)[0] == 201
    dropped = sum(client.dropped for client in clients)
    assert dropped == 0
    _accepted_are_stored(db, accepted)
    print(f"\nlocked {LOCK_S:.0f} s (busy timeout {BUSY_TIMEOUT_S} s), 4 keep-alive clients: "
          f"{len(seen)} requests while locked, {seen.count(503)} answered 503, "
          f"{seen.count(500)} answered 500, {dropped} dropped connections; /ready 200 again "
          f"{recovered_s:.1f} s after the lock ended; accepted corrections stored: "
          f"{len(accepted)} of {len(accepted)}")


def _fill(path: Path, leave_bytes: int) -> None:
    """Write a file until the disk has about `leave_bytes` free (all of it taken for 0)."""
    free = os.statvfs(path.parent).f_bavail * os.statvfs(path.parent).f_frsize
    with open(path, "ab") as f:
        try:
            f.write(b"\0" * max(0, free - leave_bytes))
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            pass  # full


@pytest.fixture
def small_disk(settings):
    """The data dir on a 48 MiB tmpfs, as a disk that fills up (needs root to mount)."""
    data_dir = settings.storage.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs",
                                            str(data_dir)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield data_dir
    subprocess.run(["umount", "-l", str(data_dir)], capture_output=True)


@pytest.mark.parametrize("server", [16 * MiB], indirect=True)
def test_a_full_disk_answers_507_and_recovers_when_space_returns(small_disk, server, keys, db,
                                                                 wav_clip):
    client = KeepAliveClient(server, keys.app)
    status, _, answer = _predict(client, wav_clip)
    assert status == 201
    accepted, filler = set(), small_disk / "filler"
    clips_before = files_under(small_disk / "artifacts" / "clips")

    _fill(filler, 8 * MiB)  # below the 16 MiB floor: no new clips, corrections still welcome
    status, headers, body = _predict(client, b"RIFF" + os.urandom(2000))
    assert (status, body["error"], headers["retry-after"]) == (507, "insufficient_storage", "5")
    assert files_under(small_disk / "artifacts" / "clips") == clips_before
    status, _, body = _correct(client, answer["prediction_id"], "sad")
    assert status == 201
    accepted.add(body["feedback_id"])
    assert "below the floor" in _wait_ready(client, 503)["detail"]

    _fill(filler, 0)  # nothing left at all
    seen = []
    for label in ["angry", "happy", "sad", "angry"]:
        for status, headers, body in (_predict(client, wav_clip),
                                      _correct(client, answer["prediction_id"], label),
                                      client.send("GET", "/ready")):
            seen.append(status)
            if status in (200, 201) and "feedback_id" in body:
                accepted.add(body["feedback_id"])
            if status >= 500:
                assert headers["retry-after"] == "5" and status in (503, 507), body
    # Corrections may still fit (SQLite reuses its write-ahead log's pages); whatever got a 201
    # must be stored, checked below.
    assert 500 not in seen and 507 in seen

    filler.unlink()
    freed_at = time.monotonic()
    _wait_ready(client)
    recovered_s = time.monotonic() - freed_at
    status, _, again = _predict(client, wav_clip)
    assert status == 201
    status, _, fixed = _correct(client, again["prediction_id"], "angry")
    assert status == 201
    accepted.add(fixed["feedback_id"])
    assert client.dropped == 0
    _accepted_are_stored(db, accepted)
    print(f"\ndisk full: {len(seen)} requests, {seen.count(507)} answered 507, "
          f"{seen.count(503)} 503, {seen.count(500)} 500, {client.dropped} dropped connections; "
          f"/ready 200 again {recovered_s:.1f} s after space returned; accepted corrections "
          f"stored: {len(accepted)} of {len(accepted)}")


@pytest.mark.parametrize("server", [0], indirect=True)
def test_without_a_floor_a_write_into_a_full_disk_answers_507(small_disk, server, keys, db,
                                                              wav_clip):
    """The disk fills before any floor could say so: the clip's write itself fails (ENOSPC)."""
    client = KeepAliveClient(server, keys.app)
    assert _predict(client, wav_clip)[0] == 201
    filler = small_disk / "filler"
    _fill(filler, 0)
    clips_before = files_under(small_disk / "artifacts" / "clips")
    new_clip = wav_clip[:-64] + os.urandom(64)  # other bytes: a new file to write
    status, headers, body = _predict(client, new_clip)
    assert (status, body["error"], headers["retry-after"]) == (507, "insufficient_storage", "5")
    assert "disk is full" in body["detail"]
    assert files_under(small_disk / "artifacts" / "clips") == clips_before  # no half file
    filler.unlink()
    _wait_ready(client)
    assert _predict(client, new_clip)[0] == 201
    assert client.dropped == 0
