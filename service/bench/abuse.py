"""`emoloop bench abuse`: `emoloop serve`, with its default limits, against clients that start
requests and never finish them, while one well-behaved client keeps asking for predictions.
Loopback only, and bounded: every scenario ends when the server has closed its last stalled
connection (or a minute after that should have happened).

One server (a fresh data directory, SQLite, the bundled model), three scenarios in turn:
- stalled uploads: 2,000 connections send the head of a 1 MB prediction upload and 100 bytes of
  its body, then nothing;
- stalled heads: 2,000 connections send the first line and one header of a request, then
  nothing;
- uploads stalled under the limit: 200 connections send all but one byte of an upload of exactly
  `api.max_upload_bytes`, then nothing;
- the stalled uploads again, to show that what the first wave left resident is reused.
Meanwhile a separate process sends predictions (3 s WAV clips, each new bytes) one after the
other on a keep-alive connection. Reported per scenario: the well-behaved client's answers and
latency; every stalled connection's answer and how long after it stalled (its last byte handed
to the system) the server closed it, against the deadline the settings give it; the server's
resident memory (all processes) before, at its highest, and after the stalled connections are
gone.
"""
import asyncio
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np

from service.bench.local_server import tree_rss_bytes
from service.bench.serve import (bench_server, clip_pool, read_response, unique_clip,
                                 upload_request)
from service.connections import raise_open_file_limit
from storage.settings import ApiSettings, get_settings

# The first again at the end: memory the first wave left resident is reused, not added to.
SCENARIOS = (("stalled uploads", "upload", 2000), ("stalled heads", "head", 2000),
             ("uploads stalled under the limit", "near_limit", 200),
             ("stalled uploads, again", "upload", 2000))
OPENING_AT_ONCE = 100  # connections being opened at the same time
SENDING_AT_ONCE = 20  # near-limit uploads sending their megabytes at the same time
LATE_S = 1.0  # a connection closed this long after its deadline still counts as in time
SETTLE_S = 3.0  # after the last stalled connection: then memory is measured again
# rss_left_mb: Python keeps memory freed by thousands of small objects for reuse instead of
# giving it back to the system; what stays after a wave must be small and must not add up.
TARGETS = {"answered": 1.0, "p99_ms": 1000.0, "rss_growth_mb": 200.0, "rss_left_mb": 50.0}


def run_abuse_bench(model_path: Path | None = None, workers: int = 1, scale: float = 1.0) -> dict:
    """`scale`: fewer stalled connections (0.1: a tenth), for a quick look."""
    raise_open_file_limit()  # this process holds the 2,000 client ends
    api = get_settings().api
    results = {}
    with (tempfile.TemporaryDirectory(prefix="emoloop-abuse-") as data_dir,
          bench_server(Path(data_dir), workers, model_path) as (port, server, key, _)):
        for name, kind, count in SCENARIOS:
            results[name] = _scenario(port, server.pid, f"Authorization: Bearer {key}", api,
                                      kind, max(1, round(count * scale)))
    report = {"workers": workers, "limits": api.model_dump(), "targets": TARGETS,
              "scenarios": results}
    report["lines"] = _lines(report)
    return report


def _scenario(port: int, server_pid: int, auth: str, api: ApiSettings, kind: str,
              count: int) -> dict:
    context = multiprocessing.get_context("spawn")
    stop, (receiving, sending) = context.Event(), context.Pipe(duplex=False)
    client = context.Process(target=_well_behaved, args=(port, auth, stop, sending))
    rss_before = tree_rss_bytes(server_pid)
    client.start()
    try:
        stalled, rss_peak = asyncio.run(_stall_all(port, server_pid, api, kind, count))
        time.sleep(SETTLE_S)
        rss_after = tree_rss_bytes(server_pid)
    finally:
        stop.set()
        # It finishes the request it is in (30 s at most); one that died sends nothing.
        answers = receiving.recv() if receiving.poll(60) else []
        client.join(10)
    statuses, latencies = zip(*answers) if answers else ((), ())
    overshoot = [s["closed_s"] - s["deadline_s"] for s in stalled if s["closed_s"] is not None]
    return {
        "stalled": count,
        "stalled_opened": sum(s["opened"] for s in stalled),
        "stalled_answers": {str(code): sum(s["status"] == code for s in stalled)
                            for code in sorted({s["status"] for s in stalled}, key=str)},
        "closed": sum(s["closed_s"] is not None for s in stalled),
        "closed_in_time": sum(s["closed_s"] is not None
                              and s["closed_s"] <= s["deadline_s"] + LATE_S for s in stalled),
        "deadline_s": float(np.median([s["deadline_s"] for s in stalled])),
        "most_late_s": max(overshoot) if overshoot else None,
        "requests": len(statuses),
        "answered": sum(status == 201 for status in statuses),
        "p50_ms": float(np.percentile(latencies, 50)) if latencies else 0.0,
        "p99_ms": float(np.percentile(latencies, 99)) if latencies else 0.0,
        "rss_before_mb": rss_before / 1e6, "rss_peak_mb": max(rss_peak, rss_before) / 1e6,
        "rss_after_mb": rss_after / 1e6,
    }


async def _stall_all(port: int, server_pid: int, api: ApiSettings, kind: str,
                     count: int) -> tuple[list[dict], int]:
    # Connections are opened and their bytes sent a few at a time: a hundred for heads and
    # small bodies, twenty for the ones that send megabytes.
    starting = asyncio.Semaphore(SENDING_AT_ONCE if kind == "near_limit" else OPENING_AT_ONCE)
    peak = 0
    done = asyncio.Event()

    async def watch_memory() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss_bytes(server_pid))
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch_memory())
    stalled = await asyncio.gather(*(_stall(port, api, kind, starting) for _ in range(count)))
    done.set()
    await watcher
    return stalled, peak


async def _stall(port: int, api: ApiSettings, kind: str, starting: asyncio.Semaphore) -> dict:
    """One stalled connection: what it sent, then how long until the server ended it."""
    head, body, deadline_s = _stalled_request(port, api, kind)
    result = {"opened": False, "status": None, "closed_s": None, "deadline_s": deadline_s}
    async with starting:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return result
        result["opened"] = True
        writer.write(head + body)
        try:
            await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            pass  # the answer, if any, is read below
        # The deadline counts from here, when it stalls: the server's clock starts with the
        # head, but leaves out the time it kept reading paused, which is less than this.
        started = time.monotonic()
    try:
        answer = await asyncio.wait_for(reader.read(), deadline_s + 60)
        if answer.startswith(b"HTTP/1.1 "):
            result["status"] = int(answer[9:12])
        result["closed_s"] = time.monotonic() - started
    except (ConnectionResetError, BrokenPipeError):  # closed, without an answer
        result["closed_s"] = time.monotonic() - started
    except asyncio.TimeoutError:
        pass  # never closed: counted as not in time
    finally:
        writer.close()
    return result


def _stalled_request(port: int, api: ApiSettings, kind: str) -> tuple[bytes, bytes, float]:
    """The bytes a stalled client sends, and the deadline the settings give it."""
    head = f"POST /v1/predictions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
    if kind == "head":
        return head, b"", api.header_timeout_s
    length = 1_000_000 if kind == "upload" else api.max_upload_bytes
    sent = 100 if kind == "upload" else length - 1
    head += (f"Content-Type: audio/wav\r\nContent-Length: {length}\r\n\r\n").encode()
    deadline = min(api.body_timeout_s + sent / api.body_min_rate_bytes_s, api.body_max_timeout_s)
    return head, bytes(sent), deadline


def _well_behaved(port: int, auth: str, stop, results) -> None:
    """In its own process: predictions one after the other on a keep-alive connection until
    `stop`; sends back (status, latency ms) for each (status 0: no answer)."""
    clips = clip_pool()
    answers = asyncio.run(_predict_until(port, auth, clips, stop))
    results.send(answers)


async def _predict_until(port: int, auth: str, clips: list[bytes], stop) -> list:
    answers, connection, i = [], None, 0
    while not stop.is_set():
        request = upload_request(port, auth, unique_clip(clips, i))
        i += 1
        start = time.perf_counter()
        try:
            connection = connection or await asyncio.open_connection("127.0.0.1", port)
            connection[1].write(request)
            status, _ = await asyncio.wait_for(read_response(connection[0]), 30)
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            if connection is not None:
                connection[1].close()
            connection, status = None, 0
        answers.append((status, (time.perf_counter() - start) * 1000))
    if connection is not None:
        connection[1].close()
    return answers


def _lines(report: dict) -> list[str]:
    limits = report["limits"]
    lines = [f"emoloop bench abuse: loopback, SQLite, {report['workers']} worker(s), "
             f"limits (heads {limits['header_timeout_s']:g} s; bodies "
             f"{limits['body_timeout_s']:g} s + 1 s per {limits['body_min_rate_bytes_s']} B, at "
             f"most {limits['body_max_timeout_s']:g} s; {limits['max_connections']} connections "
             f"per worker), one well-behaved client sending 3 s WAV predictions throughout",
             f"{'scenario':<33}{'stalled':>8}{'answers':>18}{'closed in time':>16}"
             f"{'deadline s':>11}{'latest s':>9}{'predictions':>12}{'answered':>9}{'p50 ms':>8}"
             f"{'p99 ms':>8}{'RSS MB before/peak/after':>26}"]
    met = {"answered": True, "p99": True, "growth": True, "left": True, "in_time": True}
    for name, r in report["scenarios"].items():
        answers = ",".join(f"{code}:{n}" for code, n in r["stalled_answers"].items())
        late = "-" if r["most_late_s"] is None else f"{r['most_late_s']:+.1f}"
        lines.append(f"{name:<33}{r['stalled']:>8}{answers:>18}"
                     f"{r['closed_in_time']:>9}/{r['stalled']:<6}{r['deadline_s']:>11.1f}"
                     f"{late:>9}{r['requests']:>12}{r['answered']:>9}{r['p50_ms']:>8.0f}"
                     f"{r['p99_ms']:>8.0f}{r['rss_before_mb']:>10.0f}/{r['rss_peak_mb']:.0f}/"
                     f"{r['rss_after_mb']:.0f}")
        met["answered"] &= r["requests"] > 0 and r["answered"] == r["requests"]
        met["p99"] &= r["p99_ms"] < TARGETS["p99_ms"]
        met["growth"] &= r["rss_peak_mb"] - r["rss_before_mb"] < TARGETS["rss_growth_mb"]
        met["left"] &= r["rss_after_mb"] - r["rss_before_mb"] <= TARGETS["rss_left_mb"]
        met["in_time"] &= r["closed_in_time"] == r["stalled"]
    verdict = {True: "met", False: "MISSED"}
    lines += [
        f"well-behaved client answered, every scenario: target 100%   {verdict[met['answered']]}",
        f"well-behaved client p99, every scenario: target < 1000 ms   {verdict[met['p99']]}",
        f"server RSS growth (peak - before), every scenario: target < 200 MB   "
        f"{verdict[met['growth']]}",
        f"server RSS after - before, every scenario: target <= {TARGETS['rss_left_mb']:g} MB   "
        f"{verdict[met['left']]}",
        f"stalled connections closed by their deadline (+{LATE_S:g} s), every scenario   "
        f"{verdict[met['in_time']]}"]
    return lines
