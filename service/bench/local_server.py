"""Running `emoloop serve` (or another server) as a child process on loopback: a free port to
give it, its memory, a clean stop, and a new empty schema on a PostgreSQL server for it to use.
Used by `emoloop bench serve`, `bench abuse` and by the tests that start real servers."""
import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (uvicorn's workers), from /proc."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if int(stat.parent.name) != pid and parent != pid:
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        kib = next((line.split()[1] for line in status.splitlines()
                    if line.startswith("VmRSS:")), "0")
        total += int(kib) * 1024
    return total


@contextmanager
def fresh_postgres_schema(server_url: str, prefix: str = "test") -> Iterator[str]:
    """A URL to a new, empty schema on the PostgreSQL database `server_url` names (its user
    needs CREATE there), dropped with everything in it afterwards. A schema is made and dropped
    in milliseconds; CREATE DATABASE takes most of a second. Every connection made from the URL
    works in the schema and is named after it, so that connections left open (a server killed)
    can be ended before the drop."""
    import psycopg
    from sqlalchemy.engine import make_url

    from storage.db import normalize_url

    schema = f"{prefix}_{uuid.uuid4().hex[:16]}"
    admin_url = make_url(normalize_url(server_url)).set(drivername="postgresql")
    conninfo = admin_url.render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    url = make_url(normalize_url(server_url)).update_query_dict(
        {"options": f"-csearch_path={schema}", "application_name": schema})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name = %s AND pid <> pg_backend_pid()", [schema])
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
