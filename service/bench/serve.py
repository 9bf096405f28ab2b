"""`emoloop bench serve`: the real server under load, on loopback.

For 1 and then 2 workers: a fresh data directory and database (SQLite by default, migrated, a
key of its own, the bundled model or `--model`), `emoloop serve` started as a subprocess on a
free loopback port, then 3 s WAV clips sent by 8 concurrent clients, each waiting for its answer
before sending again (closed loop: at concurrency 8, the median latency is about 8 /
throughput). After a warm-up, a fixed
number of predictions is timed (bounded in time too), then feedback POSTs for those predictions
from the same 8 clients. Reported: latency percentiles, throughput and errors for predictions,
feedback writes per second, the CPU time the server and the client spent per request, and
each worker's share of the predictions (from the per-worker request gauges in the server's
/metrics), beside the issue's targets. With `repeats`, the whole is run that many times in turn;
each repeat's 2-worker shares and 2/1-worker throughput ratio are listed.

With `floor`, the same predictions also go to the inference floor (service.bench.inference_floor:
the engine's decoding, features and batched model behind a bare ASGI app, one worker), and the
report puts the two side by side: what the model work alone costs, and what the rest of a
prediction adds.

With `database_url` (a PostgreSQL database the bench may create schemas in) every run gets a
new, empty schema there instead of a SQLite file, dropped after. `stores` names the artifact
stores to run (`local`, `database`: storage.artifacts); with both, each worker count runs on
each store in turn within a repeat (local, database, local, database, ...: both see the same
machine), and the report puts their medians side by side with the database store's throughput
as a share of the local folder's, each repeat's too.

Nothing can flatter the server: the clips come from a pool of 32 different recordings and every
request's bytes are unique (two samples carry the request's number), so each clip is stored and
fsynced as a new one, as in production. The client is one asyncio loop sending pre-encoded
requests on 8 keep-alive connections, so it takes little of the CPU the server needs; its share
is reported.
"""
import asyncio
import http.client
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from service.bench.local_server import (free_port, fresh_postgres_schema,
                                        stop_process_group)

CONCURRENCY = 8
CLIP_SECONDS = 3.0
CLIP_POOL = 32
WARMUP_REQUESTS = 48
FEEDBACK_PER_PREDICTION = 2  # "happy", then "sad": a second opinion is a new row too
TIME_LIMIT_S = 120.0  # per phase: the bench always ends, even against a slow server
REQUEST_TIMEOUT_S = 30.0
TARGETS = {"p50_ms_1_worker": 25.0, "p99_ms_1_worker": 100.0, "throughput_2_workers": 100.0,
           "errors": 0, "feedback_per_s": 500.0,
           # The database artifact store's predictions/s against the local folder's (issue 16).
           "database_store_share": 0.85}
STORES = ("local", "database")
EMOLOOP = str(Path(sys.executable).with_name("emoloop"))


def run_serve_bench(model_path: Path | None = None, requests: int = 400,
                    workers: tuple[int, ...] = (1, 2), floor: bool = False,
                    repeats: int = 1, database_url: str | None = None,
                    stores: tuple[str, ...] = ("local",)) -> dict:
    """`floor`: also run the inference floor (service.bench.inference_floor), one worker, with
    the same clips and clients. `repeats`: run every worker count this many times, in turn;
    the report's `workers` then holds each figure's median over the repeats (errors: the sum),
    `repeats` every run. `database_url`: a PostgreSQL database for the runs' schemas (default: a
    SQLite file each). `stores`: the artifact stores, each run in turn; `stores` in the report
    holds each one's medians by worker count, `workers` the first one's."""
    unknown = set(stores) - set(STORES)
    if unknown or not stores:
        raise ValueError(f"unknown artifact store(s) {sorted(unknown)}: choose from {STORES}")
    clips = clip_pool()
    repeated: list[dict[str, dict[int, dict]]] = []
    for _ in range(repeats):
        runs: dict[str, dict[int, dict]] = {store: {} for store in stores}
        for n in workers:
            for store in stores:
                with tempfile.TemporaryDirectory(prefix="emoloop-bench-") as data_dir:
                    runs[store][n] = _bench_server(Path(data_dir), n, clips, requests,
                                                   model_path, database_url, store)
        repeated.append(runs)
    medians = {store: {n: _median_run([runs[store][n] for runs in repeated]) for n in workers}
               for store in stores}
    first = medians[stores[0]]
    report = {"concurrency": CONCURRENCY, "clip_seconds": CLIP_SECONDS, "clip_pool": CLIP_POOL,
              "requests": requests, "cpu_count": os.cpu_count(),
              "database": "postgresql" if database_url else "sqlite",
              "artifact_stores": list(stores), "targets": TARGETS,
              "workers": {str(n): r for n, r in first.items()},
              "stores": {store: {str(n): r for n, r in by_n.items()}
                         for store, by_n in medians.items()},
              "repeats": [{store: {str(n): r for n, r in by_n.items()}
                           for store, by_n in runs.items()} for runs in repeated]}
    if floor:
        report["inference_floor"] = _bench_floor(clips, requests, model_path)
    lines = []
    for store in stores:
        lines += _lines(report, medians[store], store)
        lines += _balance_lines([runs[store] for runs in repeated],
                                f"{store} store, " if len(stores) > 1 else "")
    if len(stores) > 1:
        lines += _store_lines(medians, repeated)
    lines.append(_stored_line([run for runs in repeated for by_n in runs.values()
                               for run in by_n.values()]))
    report["lines"] = lines
    return report


def _median_run(runs: list[dict]) -> dict:
    merged = {key: float(np.median([r[key] for r in runs])) for key in runs[0]
              if isinstance(runs[0][key], (int, float))}
    merged["errors"] = sum(r["errors"] for r in runs)
    return merged


def clip_pool(n: int = CLIP_POOL) -> list[bytes]:
    """n different 3 s voiced WAV clips (16-bit PCM, 16 kHz)."""
    from service.bench.clips import to_wav, voiced_clip

    return [to_wav(voiced_clip(CLIP_SECONDS, 16_000, seed=seed), 16_000) for seed in range(n)]


def unique_clip(clips: list[bytes], i: int) -> bytes:
    """Request i's clip: one of the pool with its last two samples set to i, so that no two
    requests send the same bytes (a content-addressed store cannot skip the write)."""
    clip = clips[i % len(clips)]
    return clip[:-4] + struct.pack("<hh", i % 30_000, i // 30_000)


@contextmanager
def bench_server(data_dir: Path, workers: int, model_path: Path | None = None,
                 database_url: str | None = None, artifacts: str = "local"
                 ) -> Iterator[tuple[int, subprocess.Popen, str, dict[str, str]]]:
    """`emoloop serve` on loopback over a new data folder (the learner off, one torch thread a
    worker) and a new database (a SQLite file in the folder, or a new schema in the PostgreSQL
    database `database_url` names), every worker answering: yields (port, process, an app key,
    the server's environment); stopped after, the schema dropped."""
    with ExitStack() as stack:
        url = (stack.enter_context(fresh_postgres_schema(database_url, prefix="bench"))
               if database_url else f"sqlite:///{Path(data_dir) / 'emoloop.db'}")
        # The store is said here: a config file in EMOLOOP_CONFIG cannot change what is measured.
        env = {**os.environ, "EMOLOOP_DATA_DIR": str(data_dir), "EMOLOOP_DATABASE_URL": url,
               "EMOLOOP_STORAGE__ARTIFACTS": artifacts, "EMOLOOP_LEARNER__ENABLED": "false",
               "OMP_NUM_THREADS": "1"}
        key = prepare_data_dir(env, model_path)
        port = free_port()
        server = subprocess.Popen(
            [EMOLOOP, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers",
             str(workers), "--log-level", "warning"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(port, server, workers)
            yield port, server, key, env
        finally:
            stop_process_group(server)


def _bench_server(data_dir: Path, workers: int, clips: list[bytes], requests: int,
                  model_path: Path | None, database_url: str | None = None,
                  store: str = "local") -> dict:
    with bench_server(data_dir, workers, model_path, database_url, store) as (port, server,
                                                                               key, env):
        auth = f"Authorization: Bearer {key}"
        before = _requests_by_worker(port)
        predictions = _predictions_phase(port, server, auth, clips, requests)
        shares = _shares(before, _requests_by_worker(port))
        ids = [json.loads(body)["prediction_id"] for body in predictions["bodies"]]
        labels = ("happy", "sad")
        feedback = _measured(server.pid, lambda: _run_clients(port, [
            _request(port, f"/v1/predictions/{ids[i % len(ids)]}/feedback", auth,
                     "application/json",
                     json.dumps({"label": labels[i // len(ids) % 2]}).encode())
            for i in range(FEEDBACK_PER_PREDICTION * len(ids))])) if ids else None
        predictions["load_after"] = os.getloadavg()[0]
        stored = stored_usage(env)
    feedback = feedback or {"ok": 0, "errors": 0, "seconds": 0.0, "latencies_ms": [],
                            "server_cpu_s": 0.0, "client_cpu_s": 0.0}
    return {
        **_prediction_figures(predictions),
        # Of the predictions (the warm-up's included), the share each worker answered; more
        # shares than workers: a worker was replaced (uvicorn restarts one that dies or hangs).
        "worker_shares": shares,
        "errors": predictions["errors"] + feedback["errors"],
        "feedback_writes": feedback["ok"],
        "feedback_per_s": feedback["ok"] / feedback["seconds"] if feedback["seconds"] else 0.0,
        "feedback_p50_ms": float(np.median(feedback["latencies_ms"] or [0.0])),
        "feedback_p99_ms": float(np.percentile(feedback["latencies_ms"] or [0.0], 99)),
        "cpu_ms_per_feedback": 1000 * feedback["server_cpu_s"] / max(feedback["ok"], 1),
        "client_cpu_ms_per_request": 1000 * (predictions["client_cpu_s"] + feedback[
            "client_cpu_s"]) / max(predictions["ok"] + feedback["ok"], 1),
        # What the database holds once the load is over, against what was answered 201 (the
        # warm-up's predictions too): every answered write stored, in the store measured.
        "answered_predictions": predictions["warmup_ok"] + predictions["ok"],
        "stored_predictions": stored["predictions"],
        "stored_feedback": stored["feedback"],
        "stored_artifacts": stored["artifact_store"]["artifacts"],
        "artifact_store": stored["artifact_store"]["kind"],
    }


def stored_usage(env: dict[str, str]) -> dict:
    """`emoloop storage stats --json` on the server's database and artifact store."""
    done = subprocess.run([EMOLOOP, "storage", "stats", "--json"], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout)


def _bench_floor(clips: list[bytes], requests: int, model_path: Path | None) -> dict:
    """The same prediction phase against the inference floor: uvicorn with its defaults (uvloop
    and httptools, as `emoloop serve` gets them), one worker."""
    from service.bench.inference_floor import MODEL_ENV

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if model_path is not None:
        env[MODEL_ENV] = str(Path(model_path).resolve())
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "service.bench.inference_floor:create_app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(port, server)
        predictions = _predictions_phase(port, server, "X-Bench: floor", clips, requests)
        predictions["load_after"] = os.getloadavg()[0]
    finally:
        stop_process_group(server)
    return {**_prediction_figures(predictions), "errors": predictions["errors"],
            "client_cpu_ms_per_request": 1000 * predictions["client_cpu_s"] / max(
                predictions["ok"], 1)}


def _predictions_phase(port: int, server: subprocess.Popen, auth: str, clips: list[bytes],
                       requests: int) -> dict:
    """Once the server is ready (the caller waits): the warm-up, then the timed predictions,
    measured."""
    # Distinct from the timed ones: the server stores the warm-up's clips too.
    warmup = [upload_request(port, auth, unique_clip(clips, requests + i))
              for i in range(WARMUP_REQUESTS)]
    timed = [upload_request(port, auth, unique_clip(clips, i)) for i in range(requests)]
    load_before = os.getloadavg()[0]
    warmup_ok = _run_clients(port, warmup)["ok"]
    return {**_measured(server.pid, lambda: _run_clients(port, timed)),
            "load_before": load_before, "warmup_ok": warmup_ok}


def _requests_by_worker(port: int) -> dict[str, float]:
    """Requests each worker process has answered, by pid, from the server's /metrics."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    return {m.group(1) or "": float(m.group(2)) for m in re.finditer(
        r'^emoloop_worker_requests(?:\{pid="(\d+)"\})? (\S+)$', text, re.M)}


def _workers_answering(port: int) -> int:
    """Worker processes that have answered requests and still run (prometheus_client keeps
    the figures of a worker that died)."""
    try:
        by_worker = _requests_by_worker(port)
    except OSError:
        return 0
    return sum(n > 0 and Path(f"/proc/{pid}").exists() for pid, n in by_worker.items())


def _shares(before: dict[str, float], after: dict[str, float]) -> list[float]:
    """Each worker's share of the requests answered between two looks, largest first."""
    done = [after[pid] - before.get(pid, 0.0) for pid in after]
    return sorted((n / sum(done) for n in done), reverse=True) if sum(done) else []


def _prediction_figures(predictions: dict) -> dict:
    latencies = np.array(predictions["latencies_ms"] or [0.0])
    return {
        "p50_ms": float(np.percentile(latencies, 50)),
        "p95_ms": float(np.percentile(latencies, 95)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "throughput_per_s": predictions["ok"] / predictions["seconds"],
        "predictions": predictions["ok"],
        # CPU time per answer, the server's (all its processes) and the client's: what the load
        # costs whatever else runs on the machine (the wall-clock figures above depend on that).
        "cpu_ms_per_prediction": 1000 * predictions["server_cpu_s"] / max(predictions["ok"], 1),
        "load_average_at_start": predictions["load_before"],
        "load_average_at_end": predictions["load_after"],
    }


def prepare_data_dir(env: dict, model_path: Path | None) -> str:
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
from storage.artifacts import open_artifact_store
from storage.db import create_db_engine, make_session_factory
from storage.files import sha256_bytes
from storage.registry import ModelRegistry
from storage.settings import get_settings
settings = get_settings()
data = open(sys.argv[1], "rb").read()
labels = list(model_from_bytes(data).labels)
engine = create_db_engine(settings.database.url)
with make_session_factory(engine)() as session:
    ModelRegistry(session, open_artifact_store(settings, engine)).bootstrap_default(
        data, sha256_bytes(data), labels=labels)
    session.commit()
"""


def wait_ready(port: int, server: subprocess.Popen, workers: int = 1,
               timeout_s: float = 180.0) -> None:
    """Until /ready answers 200 on several fresh connections in a row, and (from /metrics)
    `workers` live worker processes have answered requests: each connection may land on
    another worker, and one still starting answers none."""
    deadline, in_a_row = time.monotonic() + timeout_s, 0
    while in_a_row < 10 or (workers > 1 and _workers_answering(port) < workers):
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


def _run_clients(port: int, requests: list[bytes], expect: int = 201) -> dict:
    """Send the pre-encoded requests from CONCURRENCY connections, one request in flight on
    each at a time."""
    return asyncio.run(_clients(port, requests, expect))


async def _clients(port: int, requests: list[bytes], expect: int) -> dict:
    state = {"ok": 0, "errors": 0, "latencies_ms": [], "bodies": []}
    pending = iter(requests)
    deadline = time.monotonic() + TIME_LIMIT_S

    async def client() -> None:
        connection = None
        for request in pending:  # one iterator shared by all clients: each request sent once
            if time.monotonic() > deadline:
                break
            start = time.perf_counter()
            try:
                connection = connection or await asyncio.open_connection("127.0.0.1", port)
                connection[1].write(request)
                status, body = await asyncio.wait_for(read_response(connection[0]),
                                                      REQUEST_TIMEOUT_S)
            except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                if connection is not None:
                    connection[1].close()
                connection, status, body = None, 0, b""
            elapsed_ms = (time.perf_counter() - start) * 1000
            if status == expect:
                state["ok"] += 1
                state["latencies_ms"].append(elapsed_ms)
                state["bodies"].append(body)
            else:
                state["errors"] += 1
        if connection is not None:
            connection[1].close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    state["seconds"] = time.perf_counter() - start
    return state


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response with a Content-Length (all of emoloop's)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = next(int(line.split(":", 1)[1]) for line in lines[1:]
                  if line.lower().startswith("content-length:"))
    return status, await reader.readexactly(length)


def _measured(pid: int, phase) -> dict:
    """Run a phase; add the CPU seconds the server (all its processes) and this client spent."""
    server_start, client_start = _cpu_seconds(pid), time.process_time()
    result = phase()
    result["client_cpu_s"] = time.process_time() - client_start
    result["server_cpu_s"] = _cpu_seconds(pid) - server_start
    return result


def _request(port: int, path: str, auth: str, content_type: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


def upload_request(port: int, auth: str, clip: bytes) -> bytes:
    """POST /v1/predictions with the clip as the multipart field `file`."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"clip.wav\"\r\nContent-Type: audio/wav\r\n\r\n").encode()
    body += clip + f"\r\n--{boundary}--\r\n".encode()
    return _request(port, "/v1/predictions", auth, f"multipart/form-data; boundary={boundary}",
                    body)


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


def _lines(report: dict, runs: dict[int, dict], store: str = "local") -> list[str]:
    database = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}[report["database"]]
    title = (f"emoloop bench serve: {CLIP_SECONDS:g} s WAV clips ({report['clip_pool']} "
             f"recordings, every request's bytes unique), {CONCURRENCY} concurrent clients, "
             f"{report['requests']} timed predictions per server, loopback, {database}, "
             f"artifacts: {store}, {report['cpu_count']} CPUs")
    header = (f"{'workers':>7}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'pred/s':>9}{'errors':>8}"
              f"{'feedback/s':>12}{'fb p99 ms':>11}{'CPU ms/pred':>13}{'CPU ms/fb':>11}"
              f"{'client CPU ms':>15}{'load avg':>14}")
    lines = [title, header]
    for n, r in runs.items():
        lines.append(f"{n:>7}{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}{r['p99_ms']:>9.1f}"
                     f"{r['throughput_per_s']:>9.1f}{r['errors']:>8}{r['feedback_per_s']:>12.0f}"
                     f"{r['feedback_p99_ms']:>11.1f}{r['cpu_ms_per_prediction']:>13.2f}"
                     f"{r['cpu_ms_per_feedback']:>11.2f}{r['client_cpu_ms_per_request']:>15.2f}"
                     f"{r['load_average_at_start']:>8.2f}-{r['load_average_at_end']:<5.2f}")

    def target(name: str, value: float, goal: float, at_most: bool) -> str:
        met = value <= goal if at_most else value >= goal
        return (f"{name:<30}{value:>9.1f}   target {'<=' if at_most else '>='} {goal:g}   "
                f"ratio {value / goal:.2f}   {'met' if met else 'MISSED'}")

    floor = report.get("inference_floor")
    if floor:
        # The model work alone, same clients: no framework, keys, database or clip store.
        lines.append(f"{'floor':>7}{floor['p50_ms']:>9.1f}{floor['p95_ms']:>9.1f}"
                     f"{floor['p99_ms']:>9.1f}{floor['throughput_per_s']:>9.1f}"
                     f"{floor['errors']:>8}{'-':>12}{'-':>11}"
                     f"{floor['cpu_ms_per_prediction']:>13.2f}{'-':>11}"
                     f"{floor['client_cpu_ms_per_request']:>15.2f}"
                     f"{floor['load_average_at_start']:>8.2f}-{floor['load_average_at_end']:<5.2f}")
    one, two = runs.get(1), runs.get(2)
    if one:
        lines.append(target("p50 ms, 1 worker", one["p50_ms"], TARGETS["p50_ms_1_worker"], True))
        lines.append(target("p99 ms, 1 worker", one["p99_ms"], TARGETS["p99_ms_1_worker"], True))
    if floor:
        lines.append(target("p50 ms, inference floor", floor["p50_ms"],
                            TARGETS["p50_ms_1_worker"], True))
        lines.append(target("p99 ms, inference floor", floor["p99_ms"],
                            TARGETS["p99_ms_1_worker"], True))
        if one:
            lines.append(f"{'1 worker / floor':<30}p50 x{one['p50_ms'] / floor['p50_ms']:.2f}   "
                         f"CPU per prediction x"
                         f"{one['cpu_ms_per_prediction'] / floor['cpu_ms_per_prediction']:.2f}")
    if two:
        lines.append(target("predictions/s, 2 workers", two["throughput_per_s"],
                            TARGETS["throughput_2_workers"], False))
    errors = sum(r["errors"] for r in runs.values())
    lines.append(f"{'errors, all runs':<30}{errors:>9}   target 0   "
                 f"{'met' if errors == 0 else 'MISSED'}")
    for n, r in runs.items():
        lines.append(target(f"feedback writes/s, {n} worker{'s' if n > 1 else ''}",
                            r["feedback_per_s"], TARGETS["feedback_per_s"], False))
    return lines


def _balance_lines(repeated: list[dict[int, dict]], label: str = "") -> list[str]:
    """Per repeat: each worker's share of the requests with 2 workers, and 2 workers'
    predictions/s against 1 worker's in the same repeat."""
    with_two = [runs for runs in repeated if 2 in runs]
    lines = []
    for i, runs in enumerate(with_two, 1):
        line = (f"{label}repeat {i}: 2 workers {runs[2]['throughput_per_s']:.1f} pred/s, shares "
                + " / ".join(f"{100 * share:.1f}%" for share in runs[2]["worker_shares"]))
        if 1 in runs:
            line += (f"; 1 worker {runs[1]['throughput_per_s']:.1f} pred/s, ratio "
                     f"x{runs[2]['throughput_per_s'] / runs[1]['throughput_per_s']:.2f}")
        lines.append(line)
    if with_two:
        even = all(len(r[2]["worker_shares"]) == 2
                   and all(0.4 <= share <= 0.6 for share in r[2]["worker_shares"])
                   for r in with_two)
        lines.append(f"{'worker shares, 2 workers':<30}every repeat within 40-60% each   "
                     f"{'met' if even else 'MISSED'}")
    if with_two and all(1 in runs for runs in with_two):
        ratios = [r[2]["throughput_per_s"] / r[1]["throughput_per_s"] for r in with_two]
        lines.append(f"{'2 / 1 workers, pred/s':<30}median x{float(np.median(ratios)):.2f}, "
                     f"lowest x{min(ratios):.2f}   target >= x1.3 every repeat   "
                     f"{'met' if min(ratios) >= 1.3 else 'MISSED'}")
    return lines


def _store_lines(medians: dict[str, dict[int, dict]], repeated: list[dict]) -> list[str]:
    """The two artifact stores side by side: per worker count, the medians of each and the
    database store's predictions/s as a share of the local folder's; then each repeat's share."""
    local, database = medians["local"], medians["database"]
    goal = TARGETS["database_store_share"]
    lines = ["artifact stores side by side (medians over the repeats)",
             f"{'workers':>7}{'store':>10}{'pred/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
             f"{'feedback/s':>12}{'fb p99 ms':>11}{'CPU ms/pred':>13}{'load avg':>14}"]
    for n in local:
        for name, r in (("local", local[n]), ("database", database[n])):
            lines.append(f"{n:>7}{name:>10}{r['throughput_per_s']:>9.1f}{r['p50_ms']:>9.1f}"
                         f"{r['p99_ms']:>9.1f}{r['errors']:>8}{r['feedback_per_s']:>12.0f}"
                         f"{r['feedback_p99_ms']:>11.1f}{r['cpu_ms_per_prediction']:>13.2f}"
                         f"{r['load_average_at_start']:>8.2f}-{r['load_average_at_end']:<5.2f}")
    for n in local:
        share = database[n]["throughput_per_s"] / local[n]["throughput_per_s"]
        each = [runs["database"][n]["throughput_per_s"] / runs["local"][n]["throughput_per_s"]
                for runs in repeated]
        # Of the medians, checked; each repeat's pair ran back to back, so their ratios say
        # how much of a difference is the machine's load moving between runs.
        lines.append(f"{f'database / local pred/s, {n} worker' + ('s' if n > 1 else ''):<40}"
                     f"x{share:.2f}   target >= x{goal:g}   "
                     f"{'met' if share >= goal else 'MISSED'}   repeats: "
                     f"{', '.join(f'x{r:.2f}' for r in each)} (median "
                     f"x{float(np.median(each)):.2f})")
    for n in local:
        # What each prediction costs the server, whatever else the machine runs meanwhile.
        cpu = database[n]["cpu_ms_per_prediction"] / local[n]["cpu_ms_per_prediction"]
        lines.append(f"{f'database / local CPU ms/pred, {n} worker' + ('s' if n > 1 else ''):<40}"
                     f"x{cpu:.2f}")
    return lines


def _stored_line(runs: list[dict]) -> str:
    """Every run's answered writes (predictions and feedback, 201) against the rows its
    database held after the load."""
    answered = sum(r["answered_predictions"] for r in runs), sum(r["feedback_writes"]
                                                                 for r in runs)
    stored = sum(r["stored_predictions"] for r in runs), sum(r["stored_feedback"] for r in runs)
    every = all(r["stored_predictions"] == r["answered_predictions"]
                and r["stored_feedback"] == r["feedback_writes"] for r in runs)
    return (f"{'stored after the load, all runs':<40}predictions {stored[0]:,} of "
            f"{answered[0]:,} answered, feedback {stored[1]:,} of {answered[1]:,}   "
            f"target all, every run   {'met' if every else 'MISSED'}")
