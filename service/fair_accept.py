"""Spreading connections evenly over the worker processes of `emoloop serve --workers N`.

uvicorn's workers all accept from one listening socket: every worker is woken for a new
connection and the first to call accept() takes it (and any others waiting). A burst of
connections, as a few long-lived keep-alive clients or a proxy open, often lands on one worker
while the other idles. Kernel load balancing (one SO_REUSEPORT socket per worker) hashes each
connection to a worker at random, which with 8 connections still splits them 5 to 3 or worse
about three times in four.

Here each worker accepts only while it holds no more open connections than the least loaded
worker; a worker with more waits DEFER_S before taking a connection, so the least loaded one
gets it, and takes it itself if nobody has by then (a worker that died or hangs cannot stall
accepting). The workers publish their open connections in a small file they all map
(`WorkerLoad`), named by `emoloop serve` in LOAD_FILE_ENV.

uvicorn creates a worker's listener with its event loop's `create_server`; `emoloop serve`
gives uvicorn this module's loop factory, whose loop (uvloop's, unchanged otherwise) accepts as
above for a listening socket handed to it.
"""
import asyncio
import fcntl
import logging
import mmap
import os
import socket
import struct
from pathlib import Path

import uvloop

LOAD_FILE_ENV = "EMOLOOP_WORKER_LOAD_FILE"
DEFER_S = 0.02
SLOT = struct.Struct("qq")  # a worker's pid and its open connections
log = logging.getLogger("emoloop.service")


def create_load_file(path: Path, workers: int) -> None:
    """Room for twice the workers: a replacement may start before the worker it replaces ends."""
    path.write_bytes(bytes(SLOT.size * 2 * workers))


class WorkerLoad:
    """This process's slot in the shared load file, and a look at everyone else's."""

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, 0)
            with open(path, "rb") as lock:  # slots are claimed one process at a time
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._offset = self._free_slot()
                SLOT.pack_into(self._map, self._offset, os.getpid(), 0)
        finally:
            os.close(fd)
        self.connections = 0

    def _free_slot(self) -> int:
        for offset in range(0, len(self._map), SLOT.size):
            pid, _ = SLOT.unpack_from(self._map, offset)
            if pid == 0 or not _alive(pid):
                return offset
        raise RuntimeError("no free slot in the worker load file")

    def set_connections(self, n: int) -> None:
        self.connections = n
        SLOT.pack_into(self._map, self._offset, os.getpid(), n)

    def surplus(self) -> int:
        """How many connections this worker holds beyond the least loaded live worker."""
        fewest = self.connections
        for offset in range(0, len(self._map), SLOT.size):
            pid, connections = SLOT.unpack_from(self._map, offset)
            if pid != 0 and connections < fewest and _alive(pid):
                fewest = connections
        return self.connections - fewest


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_load: WorkerLoad | None = None


def worker_load() -> WorkerLoad | None:
    """This worker's load slot; None when the server runs one worker (nothing to balance)."""
    global _load
    if _load is None and os.environ.get(LOAD_FILE_ENV):
        _load = WorkerLoad(os.environ[LOAD_FILE_ENV])
    return _load


class FairAcceptor:
    """What `create_server` returns for a balanced listener: uvicorn only closes it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol_factory,
                 load: WorkerLoad, backlog: int):
        self._loop, self._sock, self._factory, self._load = loop, sock, protocol_factory, load
        self.sockets = [sock]
        self._deferred: asyncio.TimerHandle | None = None
        self._serving = True
        sock.setblocking(False)
        sock.listen(backlog)
        loop.add_reader(sock.fileno(), self._on_connection_waiting)

    def _on_connection_waiting(self) -> None:
        if self._load.surplus() > 0:  # leave it to a less loaded worker, for a moment
            self._loop.remove_reader(self._sock.fileno())
            self._deferred = self._loop.call_later(DEFER_S, self._after_deferring)
            return
        self._accept()

    def _after_deferring(self) -> None:
        self._deferred = None
        self._accept()  # none left if another worker took it
        if self._serving:
            self._loop.add_reader(self._sock.fileno(), self._on_connection_waiting)

    def _accept(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:  # out of descriptors, say: the next wake-up tries again
            log.warning("accept failed: %s", err)
            return
        self._load.set_connections(self._load.connections + 1)  # the protocol then counts exactly
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._loop.create_task(self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError:  # the client left before it was set up
            conn.close()

    def close(self) -> None:
        if self._serving:
            self._serving = False
            self._loop.remove_reader(self._sock.fileno())
            if self._deferred is not None:
                self._deferred.cancel()

    def is_serving(self) -> bool:
        return self._serving

    async def wait_closed(self) -> None:
        return None


class FairAcceptLoop(uvloop.Loop):
    async def create_server(self, protocol_factory, host=None, port=None, *, sock=None,
                            backlog: int = 100, **kwargs):
        load = worker_load()
        if sock is None or load is None or kwargs.get("ssl") is not None:
            return await super().create_server(protocol_factory, host, port, sock=sock,
                                               backlog=backlog, **kwargs)
        return FairAcceptor(self, sock, protocol_factory, load, backlog)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvicorn's `loop` for `emoloop serve` with several workers."""
    return FairAcceptLoop()
