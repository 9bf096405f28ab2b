"""Personal rounds: a user with at least `personal.min_feedback` corrections gets a personal
version, a new head (and on a speech-encoder version new input layers) on the active global
version (learner.personal.model says why those).

One round, for one user, holding the learner lock like a global round (one round at a time
across processes; the scheduler runs the users who are due right after its global check):
1. Read the user's corrections (only feedback whose `user_id` is theirs: nobody else's data ever
   trains it; personal rounds never mark feedback consumed, that is the global learner's
   bookkeeping) and the active global version.
2. Compute what the global network reads of the user's clips once (the frozen speech
   encoder's states, or log-mel frames), and of the global version's replay buffer and gate set
   (once per global version, cached in this process).
3. Train the personal part with Avalanche: Naive + ReplayPlugin (the global exemplars)
   (learner.personal.training); the same recipe once per fold to judge it, then on all the
   corrections for the version that serves.
4. The gate (PersonalGate): strictly better than the global model on the user's corrections
   (cross-validated), and on the global gate set macro recall within `personal.max_recall_drop`.
   So a user who floods wrong labels can at most change their own model, and only while it
   still knows what the global model knows.
5. In one transaction: register the version (scope user, parent = the global version), activate
   it (retiring the user's previous one) or mark it rejected, record the run with its gate
   report. If the user was forgotten meanwhile, nothing is kept.

When the global model moves on, personal versions keep serving on the global version they were
built on; each user is due again and the next round rebuilds theirs on the new global version.
"""
import logging
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from learner.checkpoint import LoadedModel
from learner.continual.gate import Answers, RegressionGate
from learner.continual.replay import Sample
from learner.continual.rounds import (
    LeaseKeeper,
    LockLost,
    RoundOutcome,
    RoundRunning,
    record_failure,
    clip_features,
    feedback_origin,
    load_gate_set,
    load_version,
    new_holder,
    restore_buffer,
    settle_candidate,
)
from learner.personal.model import (CorrectionMemory, as_stored, memory_width, personal_head_bytes,
                                    personal_head_from_bytes, personal_logits)
from storage.artifacts import ArtifactStore
from storage.models import Feedback, ModelVersion
from storage.personal import PersonalRepository
from storage.registry import ModelRegistry
from storage.runs import LearnerLockRepository, TrainingRunRepository
from storage.settings import LearnerSettings, PersonalSettings

log = logging.getLogger("emoloop.learner")
_EPS = 1e-9  # figures are compared after rounding away float noise, as the global gate does


class PersonalAnswers:
    """A version's answers on clips given as the network's inputs (learner.personal.training.
    round_inputs): the global version (its head alone) or a personal one (head, input layers,
    memory). What the gate compares; the inputs are computed once per round (the gate and replay
    sets' once per global version)."""

    def __init__(self, net: torch.nn.Module, head: torch.nn.Linear, labels: tuple[str, ...],
                 adapter: dict[str, torch.Tensor] | None = None,
                 memory: CorrectionMemory | None = None):
        self.net, self.head, self.adapter, self.memory = net, head, adapter, memory
        self.labels = labels

    def logits_batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        from learner.personal.training import embed_inputs  # Avalanche: learner only

        embeddings = embed_inputs(self.net, inputs, self.adapter)
        with torch.no_grad():
            return personal_logits(self.head.weight, self.head.bias, self.memory,
                                   embeddings).numpy()


class PersonalGate(RegressionGate):
    """A personal version's gate, with the global gate's figures (learner.continual.gate) and two
    rules:
    1. on the user's corrections, each answered by a head trained without it (k-fold
       cross-validation of the same recipe), accuracy must be strictly higher than the global
       model's: a personal model only as good is not worth serving. Cross-validation judges
       every correction, not a held-out fifth of a few dozen, so one lucky or unlucky clip does
       not decide; and the version that serves learns from all of them;
    2. on the global gate set, macro recall (the mean over the old classes) must not fall by
       more than `max_recall_drop`: the personal model must still know what the global one
       knows. A flood of wrong labels fails here. Recall per class is reported; a personal
       model may move one class's boundary for its user's voice, which is its purpose."""

    def judge_personal(self, active: PersonalAnswers, candidate: PersonalAnswers,
                       gate_set: list[Sample], corrections: list[Sample],
                       cross_validated: list[str], *, user_id: str) -> dict:
        report = self.figures(list(active.labels), list(candidate.labels),
                              Answers.of(active, candidate, gate_set, []), scope="user",
                              user_id=user_id)
        truth = [s.label for s in corrections]
        before = [active.labels[i] for i in
                  active.logits_batch([s.features for s in corrections]).argmax(axis=1)]
        report.update(
            new_feedback_accuracy_before=_accuracy(truth, before),
            new_feedback_accuracy_after=_accuracy(truth, cross_validated),
            new_holdout_size=len(corrections),
            macro_recall_before=_mean(report["recall_before"]),
            macro_recall_after=_mean(report["recall_after"]))
        failure = self._failure(report)
        report["decision"] = "rejected" if failure else "accepted"
        report["reason"] = failure or (
            f"on the user's {len(truth)} corrections (cross-validated) accuracy "
            f"{report['new_feedback_accuracy_before']:.3f} -> "
            f"{report['new_feedback_accuracy_after']:.3f}; on the global gate set macro recall "
            f"{report['macro_recall_before']:.3f} -> {report['macro_recall_after']:.3f} (at most "
            f"{self.max_recall_drop:.3f} may be lost)")
        return report

    def _failure(self, r: dict) -> str | None:
        if not r["gate_set_size"]:
            return "the gate set is empty: nothing shows the personal model keeps the old classes"
        if r["new_feedback_accuracy_after"] is None:
            return "the judgement on the user's corrections is missing"
        before, after = r["macro_recall_before"], r["macro_recall_after"]
        if after < before - self.max_recall_drop - _EPS:
            return (f"on the global gate set macro recall fell from {before:.3f} to {after:.3f}, "
                    f"more than the allowed {self.max_recall_drop:.3f}")
        before, after = r["new_feedback_accuracy_before"], r["new_feedback_accuracy_after"]
        if after <= before + _EPS:
            return (f"on the user's corrections (cross-validated) it is no better than the "
                    f"global model: accuracy {after:.3f} against {before:.3f}")
        return None


def _accuracy(truth: list[str], answers: list[str]) -> float:
    return float(np.mean([t == a for t, a in zip(truth, answers)]))


def _mean(values: dict[str, float]) -> float:
    return float(np.mean(list(values.values()))) if values else 0.0


def stratified_folds(labels: list[str], folds: int, rng: np.random.Generator) -> np.ndarray:
    """A fold number for each sample: each label's samples dealt round-robin, in seeded random
    order, so every fold holds about the same share of every label."""
    out = np.zeros(len(labels), dtype=int)
    for label in sorted(set(labels)):
        members = np.flatnonzero(np.array(labels) == label)
        out[rng.permutation(members)] = np.arange(len(members)) % folds
    return out


@dataclass(frozen=True)
class GlobalReference:
    """What every personal round on one global version needs of the old data, as the network's
    inputs (learner.personal.training.round_inputs)."""
    version: int
    replay_inputs: list[np.ndarray]
    replay_y: list[int]
    gate: list[Sample]  # features are the network's inputs, whole clips


class _ReferenceCache:
    """The last few global versions' references: computing them takes seconds (the speech
    encoder over the replay and gate sets), once per global version."""

    def __init__(self, size: int = 2):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, session_factory, artifacts, row: ModelVersion, model: LoadedModel,
            learner: LearnerSettings) -> GlobalReference:
        from learner.personal.training import clip_inputs, round_inputs  # learner only

        key = (row.version, model.sha256, learner.base_sets_dir)
        with self._lock:
            if key in self._items:
                return self._items[key]
        buffer = restore_buffer(session_factory, artifacts, row, model.labels, kind=model.kind,
                                seed=learner.seed, base_sets_dir=learner.base_sets_dir)
        rng = np.random.default_rng(learner.seed)
        replay = round_inputs(model.net, [b.sample.features for b in buffer],
                              learner.crop_frames, rng)
        replay_y = [model.labels.index(b.sample.label) for b in buffer]
        gate = load_gate_set(session_factory, artifacts, model.labels, kind=model.kind,
                             base_sets_dir=learner.base_sets_dir)
        gate_inputs = clip_inputs(model.net, [s.features for s in gate])  # as serving hears
        reference = GlobalReference(row.version, replay, replay_y,
                                    [Sample(x, s.label, s.origin)
                                     for x, s in zip(gate_inputs, gate)])
        with self._lock:
            self._items[key] = reference
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return reference


REFERENCES = _ReferenceCache()


def training_config(personal: PersonalSettings, crop_frames: int, seed: int):
    from learner.personal.training import PersonalTrainingConfig

    return PersonalTrainingConfig(steps=personal.steps, batch_size=personal.batch_size,
                                  replay_batch_size=personal.replay_batch_size, lr=personal.lr,
                                  crop_frames=crop_frames, seed=seed)


class PersonalRound:
    def __init__(self, session_factory: sessionmaker[Session], artifacts: ArtifactStore,
                 learner: LearnerSettings, personal: PersonalSettings, *, run_id: int,
                 user_id: str, holder: str, stop: threading.Event | None = None):
        self.session_factory, self.artifacts = session_factory, artifacts
        self.learner, self.personal = learner, personal
        self.run_id, self.user_id, self.holder = run_id, user_id, holder
        self.stop = stop  # set when the process shuts down: training ends, the user stays due
        self.timings: dict[str, float] = {}

    def run(self) -> RoundOutcome:
        started = time.perf_counter()
        with self.session_factory() as session:
            active = ModelRegistry(session, self.artifacts).active_global()
            repository = PersonalRepository(session)
            items = repository.feedback_for_user(self.user_id)
            summary = repository.summary(self.user_id)
            session.commit()
        if active is None:
            raise RuntimeError("no active global model version to build on")
        # Seeded by who and on what, not by the run: a personal version is a function of the
        # global version and the user's corrections alone, so a round on the same data gives
        # the same weights whatever other users did meanwhile.
        self.seed = self.learner.seed + zlib.crc32(f"{self.user_id}/{active.version}".encode())
        counts = {"feedback": summary.count, "last_feedback_id": summary.last_feedback_id,
                  "global_version": active.version}
        if summary.count < self.personal.min_feedback:
            return self._skip(counts, f"{summary.count} corrections, fewer than "
                                      f"personal.min_feedback = {self.personal.min_feedback}")
        model = load_version(self.artifacts, active)
        samples = [Sample(features, item.label, feedback_origin(item)) for item in items
                   if item.label in model.labels
                   and (features := clip_features(self.artifacts, item, model.kind)) is not None]
        counts["usable"] = len(samples)
        if len(samples) < max(self.personal.min_feedback, 2 * self.personal.folds):
            return self._skip(counts, f"only {len(samples)} corrections are usable (a clip "
                                      f"unreadable, or a label the global model does not know)")
        reference = REFERENCES.get(self.session_factory, self.artifacts, active, model,
                                   self.learner)
        self.timings["load_s"] = time.perf_counter() - started

        mark = time.perf_counter()
        from learner.personal.training import round_inputs  # Avalanche: learner only

        inputs = round_inputs(model.net, [s.features for s in samples], self.learner.crop_frames,
                              np.random.default_rng(self.seed))
        samples = [Sample(x, s.label, s.origin) for x, s in zip(inputs, samples)]
        targets = [model.labels.index(s.label) for s in samples]
        cross_validated = self._cross_validate(model, inputs, targets, reference)
        personal = self._answers(model, inputs, targets, reference)
        self.timings["train_s"] = time.perf_counter() - mark

        report = PersonalGate(self.personal.max_recall_drop).judge_personal(
            PersonalAnswers(model.net, model.net.head, model.labels), personal,
            reference.gate, samples, cross_validated, user_id=self.user_id)
        counts.update({"trained": len(samples), "folds": self.personal.folds,
                       "replay": len(reference.replay_y), "gate_set": len(reference.gate)})
        data = personal_head_bytes(personal.head, model.labels, parent_version=active.version,
                                   parent_sha256=model.sha256, parent_kind=model.kind,
                                   memory=personal.memory, adapter=personal.adapter)
        return self._commit(active, data, report, counts, started)

    def _answers(self, model: LoadedModel, inputs: list[np.ndarray], targets: list[int],
                 reference: GlobalReference) -> PersonalAnswers:
        """The personal version the recipe builds on these corrections, as the gate judges and
        the file keeps it (input layers rounded to float16 first)."""
        from learner.personal.training import embed_inputs, train_personal

        config = training_config(self.personal, self.learner.crop_frames, self.seed)
        part = train_personal(model.net, inputs, targets, reference.replay_inputs,
                              reference.replay_y, config, stop=self.stop)
        adapter = as_stored(part.adapter)
        memory = None
        if self.personal.memory_weight > 0:
            memory = CorrectionMemory.of(embed_inputs(model.net, inputs, adapter),
                                         torch.tensor(targets),
                                         weight=self.personal.memory_weight,
                                         threshold=self.personal.memory_threshold,
                                         neighbours=self.personal.memory_neighbours,
                                         size=self.personal.memory_size,
                                         width=memory_width(model.net))
        return PersonalAnswers(model.net, part.head, model.labels, adapter, memory)

    def _cross_validate(self, model: LoadedModel, inputs: list[np.ndarray], targets: list[int],
                        reference: GlobalReference) -> list[str]:
        """Each correction answered by the recipe (head, input layers and memory) built on the
        other folds."""
        folds = stratified_folds([model.labels[i] for i in targets], self.personal.folds,
                                 np.random.default_rng(self.seed))
        answers = np.zeros(len(targets), dtype=int)
        for fold in range(self.personal.folds):
            kept = np.flatnonzero(folds != fold)
            out = np.flatnonzero(folds == fold)
            version = self._answers(model, [inputs[i] for i in kept],
                                    [targets[i] for i in kept], reference)
            answers[out] = version.logits_batch([inputs[i] for i in out]).argmax(axis=1)
        return [model.labels[i] for i in answers]

    def _commit(self, active: ModelVersion, data: bytes, report: dict, counts: dict,
                started: float) -> RoundOutcome:
        with self.session_factory() as session:
            if not LearnerLockRepository(session).renew(self.holder, self.learner.lock_ttl_s):
                raise LockLost("the learner lock expired and was taken over; nothing was saved")
            # Locks the user's feedback rows (PostgreSQL): forgetting the user now waits for this
            # commit and then removes this version too; if they were forgotten already, stop.
            if not session.scalars(select(Feedback.id).where(Feedback.user_id == self.user_id)
                                   .with_for_update()).first():
                return self._discard(session)
            registry = ModelRegistry(session, self.artifacts)
            row = registry.register(
                data, labels=list(report["old_classes"]), parent_version=active.version,
                scope="user", user_id=self.user_id, gate_report=report,
                metrics={"run_id": self.run_id, "bytes": len(data),
                         "new_feedback_accuracy": report["new_feedback_accuracy_after"],
                         "gate_macro_f1": report["macro_f1_after"]})
            self.timings["total_s"] = time.perf_counter() - started
            counts["seconds"] = {k: round(v, 3) for k, v in self.timings.items()}
            # The file as stored: its checksum, and that it parses.
            return settle_candidate(
                session, registry, row, report, run_id=self.run_id, counts=counts,
                check_file=lambda: personal_head_from_bytes(
                    self.artifacts.read_model(row.artifact_path, row.sha256, session),
                    expected_sha256=row.sha256),
                reason=f"personal round {self.run_id}: {report['reason']}")

    def _skip(self, counts: dict, reason: str) -> RoundOutcome:
        with self.session_factory() as session:
            runs = TrainingRunRepository(session)
            runs.finish(runs.get(self.run_id), "skipped", counts=counts, error=reason)
            session.commit()
        return RoundOutcome(self.run_id, "skipped", counts=counts, error=reason)

    def _discard(self, session: Session) -> RoundOutcome:
        """The user was forgotten while the round ran: keep nothing of it, not even the run."""
        run = TrainingRunRepository(session).get(self.run_id)
        if run is not None:
            session.delete(run)
        session.commit()
        return RoundOutcome(self.run_id, "skipped", error="the user was forgotten meanwhile")


# ----------------------------------------------------------------------------------------------
# Running rounds: under the learner lock, one user after another.

def take_lock(session_factory: sessionmaker[Session], learner: LearnerSettings,
              holder: str) -> None:
    """Take the learner lock (and mark runs a dead process left 'running' failed). Raises
    RoundRunning when another round holds it."""
    with session_factory() as session:
        locks = LearnerLockRepository(session)
        if not locks.acquire(holder, learner.lock_ttl_s):
            raise RoundRunning("a learning round is already running")
        try:
            TrainingRunRepository(session).fail_interrupted()
            session.commit()
        except BaseException:
            session.rollback()
            locks.release(holder)
            session.commit()
            raise


def start_run(session_factory: sessionmaker[Session], user_id: str, trigger: str) -> int:
    """Record a running personal run (the caller holds the lock); returns its id."""
    with session_factory() as session:
        run = TrainingRunRepository(session).start(trigger, scope="user", user_id=user_id)
        session.commit()
        return run.id


def execute_personal_runs(session_factory: sessionmaker[Session], artifacts: ArtifactStore,
                          learner: LearnerSettings, personal: PersonalSettings, *,
                          users: list[str], holder: str, trigger: str,
                          first_run_id: int | None = None,
                          on_activated: Callable[[str], None] | None = None,
                          stop: threading.Event | None = None) -> list[RoundOutcome]:
    """A personal round for each user in turn, holding the lock `holder` took; releases it.
    `first_run_id` is the run already recorded for the first user (a round an admin started);
    `on_activated(user_id)` tells this process's engine that a user's model changed."""
    lease = LeaseKeeper(session_factory, holder, learner.lock_ttl_s)
    lease.start()
    outcomes = []
    try:
        for i, user_id in enumerate(users):
            if stop is not None and stop.is_set():
                break  # the users left are still due; the next tick takes them
            run_id = first_run_id if i == 0 and first_run_id is not None else \
                start_run(session_factory, user_id, trigger)
            try:
                outcome = PersonalRound(session_factory, artifacts, learner, personal,
                                        run_id=run_id, user_id=user_id, holder=holder,
                                        stop=stop).run()
            except LockLost:
                raise
            except Exception as err:  # recorded on the run; the user's current model stays
                log.exception("personal round %d failed", run_id)
                outcome = record_failure(session_factory, run_id, err)
            outcomes.append(outcome)
            log.info("personal round %d: %s%s", run_id, outcome.status,
                     f" (version {outcome.candidate_version})" if outcome.candidate_version
                     else "")
            if outcome.status == "accepted" and on_activated is not None:
                on_activated(user_id)
    finally:
        lease.stop()
        with session_factory() as session:
            LearnerLockRepository(session).release(holder)
            session.commit()
    return outcomes


def run_personal_rounds(session_factory: sessionmaker[Session], artifacts: ArtifactStore,
                        learner: LearnerSettings, personal: PersonalSettings, *,
                        trigger: str = "schedule", user_ids: list[str] | None = None,
                        on_activated: Callable[[str], None] | None = None,
                        stop: threading.Event | None = None) -> list[RoundOutcome]:
    """A round for each of `user_ids`, or (default) for the users who are due: enough
    corrections, and new ones or a new global version since their last round; at most
    `personal.max_users_per_tick`, longest waiting first. Raises RoundRunning when busy."""
    if user_ids is None:
        user_ids = due_users(session_factory, artifacts, personal)
    if not user_ids:
        return []
    holder = new_holder()
    take_lock(session_factory, learner, holder)
    return execute_personal_runs(session_factory, artifacts, learner, personal, users=user_ids,
                                 holder=holder, trigger=trigger, on_activated=on_activated,
                                 stop=stop)


def due_users(session_factory: sessionmaker[Session], artifacts: ArtifactStore,
              personal: PersonalSettings) -> list[str]:
    if not personal.enabled:
        return []
    with session_factory() as session:
        active = ModelRegistry(session, artifacts).active_global()
        due = [] if active is None else PersonalRepository(session).due_users(
            personal.min_feedback, active.version)
        session.commit()
    return [summary.user_id for summary in due[:personal.max_users_per_tick]]


def begin_personal_round(session_factory: sessionmaker[Session], learner: LearnerSettings,
                         user_id: str, *, trigger: str = "manual") -> tuple[int, str]:
    """Take the lock and record one user's run, whether or not they are due; returns (run id,
    lock holder) for `execute_personal_runs(..., first_run_id=run_id, holder=holder)`. Raises
    RoundRunning when another round holds the lock."""
    holder = new_holder()
    take_lock(session_factory, learner, holder)
    try:
        return start_run(session_factory, user_id, trigger), holder
    except BaseException:
        with session_factory() as session:
            LearnerLockRepository(session).release(holder)
            session.commit()
        raise
