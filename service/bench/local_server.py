"""Running `emoloop serve` (or another server) as a child process on loopback: a free port to
give it, and a clean stop. Used by `emoloop bench serve` and by the tests that start real
servers."""
import os
import signal
import socket
import subprocess


def free_port() -> int:
    """A loopback port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGINT to the child's whole process group (started with start_new_session=True), so
    uvicorn shuts its workers down cleanly; SIGKILL if that takes longer than `timeout_s`."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
