"""Group commit: the writes of concurrent requests share one transaction and one commit.

A durable commit costs an fsync (about 4 ms on this machine's disk) and SQLite lets one
transaction write at a time, so a commit per request caps writes at a couple of hundred a
second. Requests hand their write to this writer's thread instead and wait for it: while one
commit runs, the next writes queue up, and the thread makes all of them in the next transaction.
Nothing waits on purpose; a lone request is written at once.

Each write runs in its own savepoint, so a write that fails fails only its own request. A
request gets its result only after the commit holding its write returned: durable before the
2xx, as with a commit of its own.
"""
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("emoloop.service")
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

    def write(self, work: Callable[[Session], T]) -> T:
        """Run `work(session)` in the next transaction and return its result once committed.
        Blocks the calling thread; `work` should only add rows, it runs on the writer's thread
        while other requests wait for the same commit. ORM objects it returns stay readable
        (sessions do not expire on commit)."""
        if self._thread is None:
            raise RuntimeError("the group-commit writer is not running")
        future: Future = Future()
        self._queue.put((work, future))
        return future.result()

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
        results: list[tuple[Future, object, BaseException | None]] = []
        try:
            with self.session_factory() as session:
                for work, future in batch:
                    try:
                        with session.begin_nested():
                            results.append((future, work(session), None))
                    except Exception as err:  # this request's write only; the others go on
                        results.append((future, None, err))
                session.commit()
        except Exception as err:  # the commit itself failed: nothing of this batch was written
            log.exception("group commit of %d writes failed", len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        for future, result, error in results:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
