"""The learner inside a process: an APScheduler job that starts a round once
`learner.min_new_feedback` pieces of feedback wait (checked every `learner.interval_s`), then
applies `storage.retention` and sweeps the artifact store of what a crash left behind; and rounds
an admin starts at once.
Rounds run in a background thread, one at a time across every process (the database lock in
learner.continual.rounds), so every API worker may run the scheduler.

Nothing here imports the learner's training code until a round actually runs: the service starts
as fast without it, and an inference-only install (no Avalanche) serves all the same.
"""
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import Session, sessionmaker

from storage.artifacts import ArtifactStore
from storage.repositories import FeedbackRepository
from storage.retention import prune
from storage.settings import LearnerSettings, PersonalSettings, RetentionSettings
from storage.sweep import sweep_unreferenced

log = logging.getLogger("emoloop.learner")

RETENTION_EVERY_S = 3600.0


class LearnerService:
    def __init__(self, session_factory: sessionmaker[Session], artifacts: ArtifactStore,
                 settings: LearnerSettings, on_activated: Callable[[int], None] | None = None,
                 personal: PersonalSettings | None = None,
                 on_personal_activated: Callable[[str], None] | None = None,
                 sweep_after_s: float | None = None,
                 retention: RetentionSettings | None = None):
        self.session_factory, self.artifacts, self.settings = session_factory, artifacts, settings
        self.on_activated = on_activated
        # Checks end by sweeping files no row refers to (storage.sweep) this old; None: never.
        # At most once per that age: the sweep walks the whole store, and anything younger
        # would not go anyway.
        self.sweep_after_s = sweep_after_s
        self._last_sweep: float | None = None
        # Retention (storage.retention) at most once per RETENTION_EVERY_S: its ages are days.
        self.retention = retention
        self._last_prune: float | None = None
        # Personal rounds (learner.personal.rounds) run after each check's global part; a user
        # whose personal version changed is passed to `on_personal_activated`.
        self.personal, self.on_personal_activated = personal, on_personal_activated
        self._scheduler: BackgroundScheduler | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, first_check_in_s: float | None = None) -> None:
        """Start the scheduler when `learner.enabled`; the first check comes after one interval
        unless `first_check_in_s` says sooner."""
        if not self.settings.enabled:
            return
        delay = self.settings.interval_s if first_check_in_s is None else first_check_in_s
        self._scheduler = BackgroundScheduler(timezone=timezone.utc)
        # One check at a time in this process; missed checks (a long round) collapse into one.
        self._scheduler.add_job(self.check, "interval", seconds=self.settings.interval_s,
                                id="learner-check", max_instances=1, coalesce=True,
                                next_run_time=datetime.now(timezone.utc) + timedelta(seconds=delay))
        self._scheduler.start()

    def stop(self, wait_s: float = 10.0) -> None:
        """Stop scheduling and ask a running round to stop (it records itself failed and gives
        the lock back); waits up to `wait_s` for it."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=wait_s)

    def check(self):
        """The scheduled job: run a round here if enough feedback waits and no round runs; then
        the personal rounds of the users who are due. Returns the global round's outcome."""
        from learner.continual.rounds import RoundRunning, run_round

        with self.session_factory() as session:
            # Feedback a refused round gave back rides along with the next round, but does not
            # start one: retrying the same clips alone would only re-roll the gate's dice.
            waiting = FeedbackRepository(session).count_unconsumed(untried=True)
            session.commit()
        outcome = None
        try:
            if waiting >= self.settings.min_new_feedback:
                outcome = run_round(self.session_factory, self.artifacts, self.settings,
                                    trigger="schedule", on_activated=self.on_activated,
                                    stop=self._stop)
            self._personal_rounds()
        except RoundRunning:
            pass
        self._prune()
        self._sweep()
        return outcome

    def _prune(self) -> None:
        if self.retention is None or self._stop.is_set():
            return
        now = time.monotonic()
        if self._last_prune is not None and now - self._last_prune < RETENTION_EVERY_S:
            return
        self._last_prune = now
        try:
            prune(self.session_factory, self.artifacts, self.retention)
        except Exception:  # storage only; the next check tries again
            log.exception("could not apply the retention settings")

    def _sweep(self) -> None:
        if self.sweep_after_s is None or self._stop.is_set():
            return
        now = time.monotonic()
        if self._last_sweep is not None and now - self._last_sweep < self.sweep_after_s:
            return
        self._last_sweep = now
        try:
            sweep_unreferenced(self.session_factory, self.artifacts,
                               older_than_s=self.sweep_after_s)
        except Exception:  # disk space only; the next check tries again
            log.exception("could not sweep the artifact store")

    def _personal_rounds(self) -> None:
        """After the global round, so a user due because the global model moved on is rebuilt
        on the version just activated."""
        if self.personal is None or not self.personal.enabled or self._stop.is_set():
            return
        from learner.personal.rounds import run_personal_rounds

        run_personal_rounds(self.session_factory, self.artifacts, self.settings, self.personal,
                            trigger="schedule", on_activated=self.on_personal_activated,
                            stop=self._stop)

    def start_now(self, trigger: str = "manual") -> int:
        """Start a round in a background thread; returns its run id once the run is recorded.
        Raises learner.continual.rounds.RoundRunning when one is running."""
        from learner.continual.rounds import execute_round, new_holder, start_round

        holder = new_holder()
        run_id = start_round(self.session_factory, self.settings, trigger=trigger, holder=holder)
        thread = threading.Thread(
            target=execute_round, name=f"learner-round-{run_id}", daemon=True,
            args=(self.session_factory, self.artifacts, self.settings),
            kwargs={"run_id": run_id, "holder": holder, "on_activated": self.on_activated,
                    "stop": self._stop})
        self._start(thread)
        return run_id

    def start_personal_now(self, user_id: str, trigger: str = "manual") -> int:
        """Start one user's personal round in a background thread, due or not; returns its run
        id once recorded. Raises learner.continual.rounds.RoundRunning when a round is running."""
        from learner.personal.rounds import begin_personal_round, execute_personal_runs

        run_id, holder = begin_personal_round(self.session_factory, self.settings, user_id,
                                              trigger=trigger)
        thread = threading.Thread(
            target=execute_personal_runs, name=f"personal-round-{run_id}", daemon=True,
            args=(self.session_factory, self.artifacts, self.settings, self.personal),
            kwargs={"users": [user_id], "holder": holder, "trigger": trigger,
                    "first_run_id": run_id, "on_activated": self.on_personal_activated,
                    "stop": self._stop})
        self._start(thread)
        return run_id

    def _start(self, thread: threading.Thread) -> None:
        # Kept so that stop() can ask the round to end and wait for it.
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
