"""Group commit: the writes of concurrent requests share one transaction and one commit.

A durable commit costs an fsync (about 4 ms on this machine's disk) and SQLite lets one
transaction write at a time, so a commit per request caps writes at a couple of hundred a
second. Requests hand their write to this writer's thread instead and wait for it: while one
commit runs, the next writes queue up, and the thread makes all of them in the next transaction.
Nothing waits on purpose; a lone request is written at once.

If any write of a batch fails, the batch is rolled back and each write is retried in a
transaction of its own, so a write that fails fails only its own request; except when the store
itself failed (locked past the busy timeout, disk full: storage.failures), which fails them
all. A request gets its result only after the commit holding its write returned: durable before
the 2xx, as with a commit of its own.
"""
import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker

from storage.failures import classify

T = TypeVar("T")
_STOP = object()


class GroupCommitWriter:
    def __init__(self, session_factory: sessionmaker[Session], max_batch: int = 256):
        self.session_factory = session_factory
        self.max_batch = max_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None

    async def write(self, work: Callable[[Session], T]) -> T:
        """Run `work(session)` in the next transaction and return its result once committed.
        `work` should only read and add a few rows: it runs on the writer's thread while other
        requests wait for the same commit. ORM objects it returns stay readable (sessions do
        not expire on commit)."""
        if self._thread is None:
            raise RuntimeError("the group-commit writer is not running")
        future: Future = Future()
        self._queue.put((work, future))
        return await asyncio.wrap_future(future)

    def _run(self) -> None:
        while True:
            batch, stopping = [self._queue.get()], False
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                batch.remove(_STOP)
                stopping = True
            if batch:
                self._write(batch)
            if stopping:
                return

    def _write(self, batch: list[tuple[Callable[[Session], object], Future]]) -> None:
        try:
            results = self._commit([work for work, _ in batch])
        except Exception as err:
            if len(batch) == 1 or classify(err) is not None:
                # A locked database or a full disk fails every write alike: retrying each alone
                # would only make each wait out the busy timeout again.
                for _, future in batch:
                    future.set_exception(err)
                return
            # Some write (or the commit) failed: write each alone, so only the failing ones fail.
            # Rerunning is safe: a rolled-back write left nothing behind.
            for item in batch:
                self._write([item])
            return
        for (_, future), result in zip(batch, results):
            future.set_result(result)

    def _commit(self, works: list[Callable[[Session], object]]) -> list[object]:
        with self.session_factory() as session:
            results = [work(session) for work in works]
            session.commit()
        return results
