"""The learner lock: one round at a time across processes, on SQLite and PostgreSQL."""
import threading
from datetime import timedelta

from sqlalchemy import update

from storage.models import LearnerLock, utcnow
from storage.runs import LearnerLockRepository, TrainingRunRepository


def test_one_holder_at_a_time_until_release(session_factory):
    with session_factory() as a, session_factory() as b:
        assert LearnerLockRepository(a).acquire("one", ttl_s=60)
        assert not LearnerLockRepository(b).acquire("two", ttl_s=60)
        assert not LearnerLockRepository(a).acquire("one-again", ttl_s=60)
        LearnerLockRepository(b).release("two")  # not the holder: changes nothing
        b.commit()
        assert LearnerLockRepository(b).holder()[0] == "one"
        b.commit()  # end the read: on SQLite every transaction of these sessions takes the lock
        LearnerLockRepository(a).release("one")
        a.commit()
        assert LearnerLockRepository(b).acquire("two", ttl_s=60)


def test_an_expired_lease_can_be_taken_and_its_holder_then_cannot_renew(session_factory):
    with session_factory() as session:
        locks = LearnerLockRepository(session)
        assert locks.acquire("dead", ttl_s=60)
        session.execute(update(LearnerLock).values(expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()
        assert locks.acquire("alive", ttl_s=60)
        assert not locks.renew("dead", ttl_s=60)
        assert locks.renew("alive", ttl_s=60)
        session.commit()


def test_racing_processes_get_exactly_one_lock(session_factory):
    winners, barrier = [], threading.Barrier(8)

    def contend(name: str) -> None:
        with session_factory() as session:
            barrier.wait()
            if LearnerLockRepository(session).acquire(name, ttl_s=60):
                winners.append(name)

    threads = [threading.Thread(target=contend, args=(f"p{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1


def test_the_new_holder_marks_runs_a_dead_holder_left_running_as_failed(session_factory):
    with session_factory() as session:
        run = TrainingRunRepository(session).start("schedule")
        session.commit()
        assert TrainingRunRepository(session).fail_interrupted() == 1
        session.commit()
        run = TrainingRunRepository(session).get(run.id)
    assert run.status == "failed" and "interrupted" in run.error and run.finished_at
