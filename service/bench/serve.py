"""`emoloop bench serve`: the real server under load, on loopback.

For 1 and then 2 workers: a fresh data directory (SQLite, migrated, a key of its own, the bundled
model or `--model`), `emoloop serve` started as a subprocess on a free loopback port, then a 3 s
WAV clip sent by 8 concurrent clients, each waiting for its answer before sending again. After
a warm-up, a fixed number of predictions is timed (bounded in time too), then each prediction
gets one feedback POST from the same 8 clients. Reported: latency percentiles, throughput and
errors for predictions, and feedback writes per second, beside the issue's targets.
"""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

CONCURRENCY = 8
CLIP_SECONDS = 3.0
WARMUP_REQUESTS = 48
TIME_LIMIT_S = 120.0  # per phase: the bench always ends, even against a slow server
TARGETS = {"p50_ms_1_worker": 25.0, "p99_ms_1_worker": 100.0, "throughput_2_workers": 100.0,
           "errors": 0, "feedback_per_s": 500.0}
EMOLOOP = str(Path(sys.executable).with_name("emoloop"))


def run_serve_bench(model_path: Path | None = None, requests: int = 400,
                    workers: tuple[int, ...] = (1, 2)) -> dict:
    from service.bench.clips import to_wav, voiced_clip

    clip = to_wav(voiced_clip(CLIP_SECONDS, 16_000), 16_000)
    runs = {}
    for n in workers:
        with tempfile.TemporaryDirectory(prefix="emoloop-bench-") as data_dir:
            runs[n] = _bench_server(Path(data_dir), n, clip, requests, model_path)
    report = {"concurrency": CONCURRENCY, "clip_seconds": CLIP_SECONDS, "requests": requests,
              "cpu_count": os.cpu_count(), "database": "sqlite", "targets": TARGETS,
              "workers": {str(n): r for n, r in runs.items()}}
    report["lines"] = _lines(report, runs)
    return report


def _bench_server(data_dir: Path, workers: int, clip: bytes, requests: int,
                  model_path: Path | None) -> dict:
    env = {**os.environ, "EMOLOOP_DATA_DIR": str(data_dir),
           "EMOLOOP_DATABASE_URL": f"sqlite:///{data_dir / 'emoloop.db'}",
           "EMOLOOP_LEARNER__ENABLED": "false", "OMP_NUM_THREADS": "1"}
    key = _prepare(env, model_path)
    port = _free_port()
    server = subprocess.Popen(
        [EMOLOOP, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers",
         str(workers), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(port, server)
        body, content_type = _multipart(clip)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": content_type}
        load_before = os.getloadavg()[0]
        _run_clients(port, "POST", lambda i: "/v1/predictions", lambda i: body, headers,
                     WARMUP_REQUESTS)
        cpu_start = _cpu_seconds(server.pid)
        predictions = _run_clients(port, "POST", lambda i: "/v1/predictions", lambda i: body,
                                   headers, requests)
        cpu_predictions = _cpu_seconds(server.pid) - cpu_start
        ids = [json.loads(r)["prediction_id"] for r in predictions["bodies"] if r]
        feedback_body = json.dumps({"label": "happy"}).encode()
        cpu_start = _cpu_seconds(server.pid)
        feedback = _run_clients(
            port, "POST", lambda i: f"/v1/predictions/{ids[i % len(ids)]}/feedback",
            lambda i: feedback_body,
            {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            len(ids), expect=201) if ids else {"ok": 0, "errors": 0, "seconds": 0.0,
                                                "latencies_ms": []}
        cpu_feedback = _cpu_seconds(server.pid) - cpu_start
    finally:
        os.killpg(server.pid, signal.SIGINT)  # uvicorn shuts its workers down cleanly on SIGINT
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    latencies = np.array(predictions["latencies_ms"] or [0.0])
    return {
        "p50_ms": float(np.percentile(latencies, 50)),
        "p95_ms": float(np.percentile(latencies, 95)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "throughput_per_s": predictions["ok"] / predictions["seconds"],
        "predictions": predictions["ok"], "errors": predictions["errors"] + feedback["errors"],
        "feedback_writes": feedback["ok"],
        "feedback_per_s": feedback["ok"] / feedback["seconds"] if feedback["seconds"] else 0.0,
        "feedback_p50_ms": float(np.median(feedback["latencies_ms"] or [0.0])),
        # Server CPU time per answer, all its processes: what the load costs whatever else runs
        # on the machine (the wall-clock figures above depend on that).
        "cpu_ms_per_prediction": 1000 * cpu_predictions / max(predictions["ok"], 1),
        "cpu_ms_per_feedback": 1000 * cpu_feedback / max(feedback["ok"], 1),
        "load_average_at_start": load_before,
    }


def _prepare(env: dict, model_path: Path | None) -> str:
    """Migrate the new database, make the bench's key, register --model as version 1."""
    subprocess.run([EMOLOOP, "migrate"], env=env, check=True, capture_output=True)
    made = subprocess.run([EMOLOOP, "keys", "create", "--role", "app", "--name", "bench"],
                          env=env, check=True, capture_output=True, text=True)
    if model_path is not None:
        subprocess.run([sys.executable, "-c", _REGISTER_MODEL, str(model_path)], env=env,
                       check=True, capture_output=True)
    return made.stdout.strip().splitlines()[-1]


_REGISTER_MODEL = """
import sys
from learner.checkpoint import model_from_bytes
from storage.artifacts import ArtifactStore
from storage.db import create_db_engine, make_session_factory
from storage.files import sha256_bytes
from storage.registry import ModelRegistry
from storage.settings import get_settings
settings = get_settings()
data = open(sys.argv[1], "rb").read()
labels = list(model_from_bytes(data).labels)
with make_session_factory(create_db_engine(settings.database.url))() as session:
    ModelRegistry(session, ArtifactStore(settings.storage.artifacts_dir)).bootstrap_default(
        data, sha256_bytes(data), labels=labels)
    session.commit()
"""


def _wait_ready(port: int, server: subprocess.Popen, timeout_s: float = 180.0) -> None:
    """Until /ready answers 200 on several fresh connections in a row (with several workers,
    each connection may land on another one)."""
    deadline, in_a_row = time.monotonic() + timeout_s, 0
    while in_a_row < 10:
        if server.poll() is not None:
            output = server.stdout.read().decode(errors="replace")
            raise RuntimeError(f"emoloop serve exited with {server.returncode}:\n{output}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"emoloop serve was not ready after {timeout_s:.0f} s")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/ready")
            in_a_row = in_a_row + 1 if connection.getresponse().status == 200 else 0
            connection.close()
        except OSError:
            in_a_row = 0
        time.sleep(0.05 if in_a_row else 0.25)


def _run_clients(port: int, method: str, path_for, body_for, headers: dict, total: int,
                 expect: int = 201) -> dict:
    """`total` requests from CONCURRENCY threads, each with one keep-alive connection and one
    request in flight at a time."""
    lock = threading.Lock()
    state = {"next": 0, "ok": 0, "errors": 0, "latencies_ms": [], "bodies": []}
    deadline = time.monotonic() + TIME_LIMIT_S

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < deadline:
            with lock:
                i = state["next"]
                if i >= total:
                    break
                state["next"] += 1
            start = time.perf_counter()
            try:
                connection.request(method, path_for(i), body=body_for(i), headers=headers)
                response = connection.getresponse()
                data = response.read()
                ok = response.status == expect
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                ok, data = False, b""
            elapsed_ms = (time.perf_counter() - start) * 1000
            with lock:
                if ok:
                    state["ok"] += 1
                    state["latencies_ms"].append(elapsed_ms)
                    state["bodies"].append(data)
                else:
                    state["errors"] += 1
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(CONCURRENCY)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state["seconds"] = time.perf_counter() - start
    return state


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (uvicorn's workers), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:  # fields[1]: the parent pid
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def _multipart(clip: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"clip.wav\"\r\nContent-Type: audio/wav\r\n\r\n").encode()
    body += clip + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(report: dict, runs: dict[int, dict]) -> list[str]:
    lines = [f"emoloop bench serve: {CLIP_SECONDS:g} s WAV clip, {CONCURRENCY} concurrent clients, "
             f"{report['requests']} timed predictions per server, loopback, SQLite, "
             f"{report['cpu_count']} CPUs",
             f"{'workers':>7}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'pred/s':>9}{'errors':>8}"
             f"{'feedback/s':>12}{'CPU ms/pred':>13}{'CPU ms/fb':>11}{'load avg':>10}"]
    for n, r in runs.items():
        lines.append(f"{n:>7}{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}{r['p99_ms']:>9.1f}"
                     f"{r['throughput_per_s']:>9.1f}{r['errors']:>8}{r['feedback_per_s']:>12.0f}"
                     f"{r['cpu_ms_per_prediction']:>13.2f}{r['cpu_ms_per_feedback']:>11.2f}"
                     f"{r['load_average_at_start']:>10.2f}")

    def target(name: str, value: float, goal: float, at_most: bool) -> str:
        met = value <= goal if at_most else value >= goal
        return (f"{name:<30}{value:>9.1f}   target {'<=' if at_most else '>='} {goal:g}   "
                f"ratio {value / goal:.2f}   {'met' if met else 'MISSED'}")

    one, two = runs.get(1), runs.get(2)
    if one:
        lines.append(target("p50 ms, 1 worker", one["p50_ms"], TARGETS["p50_ms_1_worker"], True))
        lines.append(target("p99 ms, 1 worker", one["p99_ms"], TARGETS["p99_ms_1_worker"], True))
    if two:
        lines.append(target("predictions/s, 2 workers", two["throughput_per_s"],
                            TARGETS["throughput_2_workers"], False))
    errors = sum(r["errors"] for r in runs.values())
    lines.append(f"{'errors, all runs':<30}{errors:>9}   target 0   "
                 f"{'met' if errors == 0 else 'MISSED'}")
    first = next(iter(runs))
    lines.append(target(f"feedback writes/s, {first} worker", runs[first]["feedback_per_s"],
                        TARGETS["feedback_per_s"], False))
    return lines
