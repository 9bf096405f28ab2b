"""The group-commit writer: concurrent writes share commits, a failing write fails alone."""
import asyncio

import pytest
from sqlalchemy import func, select

from service.group_commit import GroupCommitWriter
from storage.models import AuditEntry
from storage.repositories import AuditLog


@pytest.fixture
def writer(session_factory):
    writer = GroupCommitWriter(session_factory)
    writer.start()
    yield writer
    writer.stop()


def count_entries(session_factory) -> int:
    with session_factory() as session:
        return session.scalar(select(func.count()).select_from(AuditEntry))


def test_concurrent_writes_are_committed_and_a_failing_one_fails_alone(writer, session_factory):
    commits = []
    real_commit = writer._commit

    def counting_commit(works):
        commits.append(len(works))
        return real_commit(works)

    writer._commit = counting_commit

    def record(i):
        def work(session):
            if i == 7:
                raise ValueError("bad write")
            return AuditLog(session).record("test.write", f"item:{i}").id
        return work

    async def main():
        return await asyncio.gather(*(writer.write(record(i)) for i in range(40)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[7], ValueError)
    ids = [r for i, r in enumerate(results) if i != 7]
    assert len(set(ids)) == 39 and all(isinstance(r, int) for r in ids)
    assert count_entries(session_factory) == 39
    assert max(commits) > 1  # writes queued behind a commit went into one transaction


def test_stop_writes_what_is_queued(session_factory):
    writer = GroupCommitWriter(session_factory)
    writer.start()

    async def main():
        return await asyncio.gather(*(writer.write(
            lambda session, i=i: AuditLog(session).record("t", f"{i}").id) for i in range(5)))

    assert len(asyncio.run(main())) == 5
    writer.stop()
    assert count_entries(session_factory) == 5
