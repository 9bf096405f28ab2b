"""`emoloop serve` against clients that are slow, greedy or many: the real server, two workers,
with short deadlines and a small connection cap, on raw sockets (an HTTP library would not send
this badly)."""
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.bench.local_server import free_port, stop_process_group, tree_rss_bytes

EMOLOOP = str(Path(sys.executable).with_name("emoloop"))
LIMITS = {"HEADER_TIMEOUT_S": "1", "BODY_TIMEOUT_S": "1", "BODY_MIN_RATE_BYTES_S": "16384",
          "BODY_MAX_TIMEOUT_S": "6", "KEEP_ALIVE_TIMEOUT_S": "2", "MAX_CONNECTIONS": "20",
          "MAX_HEADER_BYTES": "8192"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("hygiene")
    env = {**os.environ, "EMOLOOP_DATA_DIR": str(data_dir), "EMOLOOP_DATABASE_URL": "",
           "EMOLOOP_LEARNER__ENABLED": "false",
           **{f"EMOLOOP_API__{name}": value for name, value in LIMITS.items()}}
    subprocess.run([EMOLOOP, "migrate"], env=env, check=True, capture_output=True, timeout=120)
    port = free_port()
    process = subprocess.Popen([EMOLOOP, "serve", "--port", str(port), "--workers", "2",
                                "--log-level", "warning"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(port, process)
        yield port, process
    finally:
        stop_process_group(process)


def _wait_ready(port: int, process: subprocess.Popen) -> None:
    """Both workers answer /ready (the model loaded), 10 fresh connections in a row."""
    deadline, in_a_row = time.monotonic() + 180, 0
    while in_a_row < 10:
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, "the server did not become ready"
        try:
            ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            ready = False
        in_a_row = in_a_row + 1 if ready else 0
        time.sleep(0.05 if ready else 0.25)


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _answer(sock: socket.socket) -> tuple[int | None, dict | None, bytes]:
    """Everything until the server closes: status and JSON body of its answer, if any."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    if not data:
        return None, None, data
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), head


def _metric(port: int, name: str) -> dict[str, float]:
    """One metric's samples by pid, from /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(rf'^{name}\{{pid="(\d+)"\}} (\S+)$', text, re.M)}


def test_a_head_that_stalls_gets_408_at_its_deadline(server):
    port, _ = server
    with _connect(port) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        status, body, head = _answer(sock)
    assert status == 408 and body["error"] == "request_timeout"
    assert b"connection: close" in head
    assert 0.9 <= time.monotonic() - start < 3.0


def test_a_body_slower_than_the_minimum_rate_gets_408(server):
    port, _ = server
    with _connect(port) as sock:
        start = time.monotonic()
        sock.sendall(b"POST /v1/predictions HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b"x" * 100)
        for _ in range(5):  # 100 bytes every 0.5 s: far under 16 KiB/s
            time.sleep(0.5)
            try:
                sock.sendall(b"x" * 100)
            except OSError:
                break
        status, body, _ = _answer(sock)
    assert status == 408 and body["error"] == "request_timeout"
    assert time.monotonic() - start < 4.0  # 1 s + 1 s per 16 KiB received, not the whole body


def test_headers_over_the_limit_get_431_whole_or_streamed(server):
    port, _ = server
    with _connect(port) as sock:  # all in one read
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        status, body, _ = _answer(sock)
    assert status == 431 and body["error"] == "headers_too_large"
    with _connect(port) as sock:  # a header without end: cut once past the limit
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:
            while sent < 50_000_000:
                sock.sendall(b"a" * 65536)
                sent += 65536
        except OSError:
            pass
        status, body, _ = _answer(sock)
    assert status == 431 and sent < 50_000_000


def test_connections_beyond_the_cap_get_a_fast_503_and_others_still_work(server):
    port, _ = server
    connections = [_connect(port) for _ in range(45)]  # the cap: 20 per worker, 2 workers
    try:
        time.sleep(0.7)  # well within the 2 s idle timeout: none was closed for idling
        answers = []
        for sock in connections:
            sock.setblocking(False)
            try:
                answers.append(sock.recv(65536))
            except BlockingIOError:
                answers.append(b"")  # held open, waiting for a request
    finally:
        for sock in connections:
            sock.close()
    refused = [answer.partition(b"\r\n\r\n") for answer in answers if answer]
    assert len(refused) == 5
    for head, _, body in refused:
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head
        assert json.loads(body)["error"] == "over_capacity"
    time.sleep(0.6)  # the refused ones linger 0.5 s
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(server):
    port, _ = server
    with _connect(port) as sock:
        start = time.monotonic()
        status, _, data = _answer(sock)  # sends nothing at all
    assert status is None and data == b""
    assert 1.9 <= time.monotonic() - start < 4.0


def test_keep_alive_connections_spread_evenly_over_the_workers(server):
    port, _ = server
    for _ in range(3):  # a burst of 8 can land evenly by chance; three in a row hardly
        clients = [_connect(port) for _ in range(8)]
        try:
            for sock in clients:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            open_connections = _metric(port, "emoloop_worker_open_connections")
        finally:
            for sock in clients:
                sock.close()
        assert len(open_connections) == 2
        # The 8 and the /metrics request's own connection: 4 and 5.
        fewer, more = sorted(open_connections.values())
        assert fewer >= 4 and more - fewer <= 1
        time.sleep(0.3)  # the server sees them closed


def test_stalled_uploads_are_spooled_not_held_in_memory(server):
    port, process = server
    before = tree_rss_bytes(process.pid)
    uploads = [_connect(port) for _ in range(20)]
    try:
        for sock in uploads:  # 4 MB of a 5 MB body each, then nothing: 80 MB if held
            sock.sendall(b"POST /v1/predictions HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
                         b"Content-Length: 5000000\r\n\r\n")
            sock.sendall(b"\0" * 4_000_000)
        time.sleep(1.0)  # the server reads what was sent
        grown = tree_rss_bytes(process.pid) - before
        assert grown < 25_000_000, f"the server grew by {grown / 1e6:.0f} MB"
        status, body, _ = _answer(uploads[0])  # each is still cut at its deadline
        assert status == 408
    finally:
        for sock in uploads:
            sock.close()
