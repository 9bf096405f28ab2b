"""kill -9 of `emoloop learner run-once` in the middle of a round: the active model keeps serving,
no feedback is lost, and the next round marks the dead run failed and learns from that feedback."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from learner.continual.rounds import run_round
from storage.models import Feedback, ModelVersion, TrainingRun
from storage.runs import LearnerLockRepository
from tests.learner.toy_learning import toy_base_sets, toy_model, world  # noqa: F401

EMOLOOP = str(Path(sys.executable).with_name("emoloop"))


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)
def test_a_killed_round_loses_nothing_and_the_next_round_learns_it(world, database_url,
                                                                    tmp_path):
    given = world.feedback(["happy", "sad"] * 6)
    settings = world.settings.model_copy(update={"lock_ttl_s": 3.0})
    config = tmp_path / "emoloop.yaml"  # JSON is YAML
    config.write_text(json.dumps({"learner": settings.model_dump(mode="json")}))
    env = {**os.environ, "EMOLOOP_CONFIG": str(config), "EMOLOOP_DATABASE_URL": database_url,
           "EMOLOOP_DATA_DIR": str(world.artifacts.root.parent)}
    learner = subprocess.Popen([EMOLOOP, "learner", "run-once"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not _runs(world):  # the round has started: lock taken, run recorded
            assert learner.poll() is None, learner.stderr.read().decode()
            assert time.monotonic() < deadline, "the learner never started its round"
            time.sleep(0.02)
        time.sleep(0.3)  # in the middle: loading its data, or training
        assert learner.poll() is None, "the round ended before it could be killed"
        os.kill(learner.pid, signal.SIGKILL)
        learner.wait(timeout=30)
    finally:
        if learner.poll() is None:
            learner.kill()

    with world.session_factory() as session:
        versions = session.scalars(select(ModelVersion)).all()
        assert [(v.version, v.status) for v in versions] == [(1, "active")]
        assert [f.consumed_by_run_id for f in session.scalars(select(Feedback))] == [None] * 12
        assert LearnerLockRepository(session).holder()[0] is not None  # a dead holder's lease
        session.commit()
    [dead] = _runs(world)
    assert dead.status == "running"

    time.sleep(3.1)  # the dead holder's lease runs out
    outcome = run_round(world.session_factory, world.artifacts, settings)
    assert outcome.status == "accepted", outcome.gate_report
    with world.session_factory() as session:
        assert session.get(TrainingRun, dead.id).status == "failed"
        consumed = {f.id: f.consumed_by_run_id for f in session.scalars(select(Feedback))}
    assert consumed == {g.feedback_id: outcome.run_id for g in given}


def _runs(world) -> list[TrainingRun]:
    with world.session_factory() as session:
        runs = session.scalars(select(TrainingRun)).all()
        session.commit()
        return runs
