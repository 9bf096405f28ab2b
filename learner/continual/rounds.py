"""One learning round, from unconsumed feedback to a gated, registered (and maybe active) version.

1. Take the learner lock (one round at a time across processes) and record the run.
2. Read the unconsumed feedback (its clips from the artifact store, its labels), hold a seeded
   share of it out for the gate, and restore the active version's replay buffer and EWC state.
3. Train a candidate from the active model (learner.continual.strategies), judge it
   (learner.continual.gate).
4. In ONE transaction: register the candidate (model file and state file written and checksummed
   first), store its replay buffer, mark the feedback consumed by this run, record the run with
   its gate report, activate the candidate if the gate accepted it (else mark it rejected
   and give its feedback back for the next round, once by default: learner.max_attempts), and
   release the lock: whoever sees the round's outcome can start the next one at once.

Crash safety: nothing before step 4 writes anything the system relies on, and step 4 commits all
or nothing. A process killed anywhere leaves the active model serving and the feedback
unconsumed; the next round marks the dead run failed and learns from that feedback. Files written
for a transaction that never committed are unreferenced and are overwritten when their version
number is handed out again. Other processes serve an activated version within their DB poll.
"""
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from learner.audio import AudioError, decode_audio
from learner.checkpoint import (LoadedModel, ModelFileError, features_for, model_bytes,
                                model_from_bytes)
from learner.continual.base_sets import BaseSetError, load_base_set
from learner.continual.ewc_state import EwcState, StateFileError
from learner.continual.gate import RegressionGate
from learner.continual.replay import (BufferedSample, Sample, base_exemplars, exemplar_row,
                                      split_holdout)
from learner.inference import EmotionPredictor
from learner.labels import feedback_labels
from storage.artifacts import ArtifactError, ArtifactStore
from storage.models import ModelVersion
from storage.registry import ModelRegistry
from storage.runs import (ExemplarRow, FeedbackItem, LearnerLockRepository,
                          ReplayExemplarRepository, RoundFeedbackRepository,
                          TrainingRunRepository)
from storage.settings import LearnerSettings

log = logging.getLogger("emoloop.learner")

MAX_CLIP_SECONDS = 60.0  # stored clips passed the API's limit already; this only bounds decoding


class RoundRunning(RuntimeError):
    """Another round holds the learner lock."""


class LockLost(RuntimeError):
    """Our lease on the learner lock expired and another process took it."""


@dataclass(frozen=True)
class RoundOutcome:
    run_id: int
    status: str  # accepted, rejected, skipped, failed
    candidate_version: int | None = None
    gate_report: dict | None = None
    counts: dict = field(default_factory=dict)
    error: str | None = None


def new_holder() -> str:
    """A lock holder id naming this process (host:pid) and this attempt."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def start_round(session_factory: sessionmaker[Session], settings: LearnerSettings, *,
                trigger: str, holder: str, scope: str = "global",
                user_id: str | None = None) -> int:
    """Take the lock and record a new running run; returns its id. Raises RoundRunning. Every
    round, global or personal, holds this one lock: the run it marks failed as interrupted can
    only belong to a holder that died."""
    with session_factory() as session:
        locks = LearnerLockRepository(session)
        if not locks.acquire(holder, settings.lock_ttl_s):
            raise RoundRunning("a learning round is already running")
        try:
            runs = TrainingRunRepository(session)
            if failed := runs.fail_interrupted():
                log.warning("marked %d interrupted run(s) failed; their feedback is still new",
                            failed)
            run = runs.start(trigger, scope=scope, user_id=user_id)
            session.commit()
            return run.id
        except BaseException:
            session.rollback()
            locks.release(holder)
            session.commit()
            raise


def run_round(session_factory: sessionmaker[Session], artifacts: ArtifactStore,
              settings: LearnerSettings, *, trigger: str = "manual",
              on_activated: Callable[[int], None] | None = None,
              stop: threading.Event | None = None) -> RoundOutcome:
    """Take the lock, run one round, give the lock back. Raises RoundRunning when busy."""
    holder = new_holder()
    run_id = start_round(session_factory, settings, trigger=trigger, holder=holder)
    return execute_round(session_factory, artifacts, settings, run_id=run_id, holder=holder,
                         on_activated=on_activated, stop=stop)


def execute_round(session_factory: sessionmaker[Session], artifacts: ArtifactStore,
                  settings: LearnerSettings, *, run_id: int, holder: str,
                  on_activated: Callable[[int], None] | None = None,
                  stop: threading.Event | None = None) -> RoundOutcome:
    """Run a round whose run row `start_round` made, holding its lock; releases the lock in
    the transaction that records how the round ended."""
    lease = LeaseKeeper(session_factory, holder, settings.lock_ttl_s)
    lease.start()
    try:
        outcome = LearningRound(session_factory, artifacts, settings, run_id=run_id,
                                lease=lease, stop=stop).run()
    except Exception as err:  # recorded on the run; the active model and the feedback stay
        log.exception("learning round %d failed", run_id)
        outcome = record_failure(session_factory, run_id, err, lease=lease)
    finally:
        lease.stop()
        with session_factory() as session:  # in case recording the end failed too
            LearnerLockRepository(session).release(holder)
            session.commit()
    log.info("learning round %d: %s%s", run_id, outcome.status,
             f" (version {outcome.candidate_version})" if outcome.candidate_version else "")
    if outcome.status == "accepted" and on_activated is not None:
        try:  # this process serves it now; every other one within its poll interval
            on_activated(outcome.candidate_version)
        except Exception:
            log.exception("could not load version %s in this process; the poll will retry",
                          outcome.candidate_version)
    return outcome


class LeaseKeeper:
    """Renews our lease on the learner lock while a round runs, so the lease can be short and a
    dead learner blocks the next round only briefly."""

    def __init__(self, session_factory: sessionmaker[Session], holder: str, ttl_s: float):
        self.session_factory, self.holder, self.ttl_s = session_factory, holder, ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="learner-lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing (before the transaction that releases the lock). Idempotent."""
        self._stop.set()
        self._thread.join()

    def release_with(self, session: Session) -> None:
        """Stop renewing and release the lock in `session`'s transaction, which the caller
        commits together with the round's final status."""
        self.stop()
        LearnerLockRepository(session).release(self.holder)

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                with self.session_factory() as session:
                    held = LearnerLockRepository(session).renew(self.holder, self.ttl_s)
                    session.commit()
                if not held:
                    log.error("lost the learner lock; this round's results will be discarded")
                    return
            except Exception:  # the database may be away a moment; the next try may work
                log.exception("could not renew the learner lock")


class LearningRound:
    def __init__(self, session_factory: sessionmaker[Session], artifacts: ArtifactStore,
                 settings: LearnerSettings, *, run_id: int, lease: LeaseKeeper,
                 stop: threading.Event | None = None):
        self.session_factory, self.artifacts, self.settings = session_factory, artifacts, settings
        self.run_id, self.lease, self.holder, self.stop = run_id, lease, lease.holder, stop
        self.seed = settings.seed + run_id
        self.timings: dict[str, float] = {}

    def run(self) -> RoundOutcome:
        started = time.perf_counter()
        with self.session_factory() as session:
            active = ModelRegistry(session, self.artifacts).active_global()
            items = RoundFeedbackRepository(session).unconsumed(
                limit=self.settings.max_feedback_per_round)
            session.commit()
        if not items:
            return self._finish_skipped({"feedback": 0}, "no new feedback")
        if active is None:
            raise RuntimeError("no active global model version to learn from")
        model = load_version(self.artifacts, active)
        usable, ignored, unreadable = self._usable(items, model)
        counts = {"feedback": len(items), "ignored_unknown_label": len(ignored),
                  "unreadable": len(unreadable), "strategy": self.settings.strategy}
        if not usable:
            return self._finish_skipped(counts, "no usable feedback", consumed=items)
        train, held_out = split_holdout(usable, self.settings.holdout_share,
                                        np.random.default_rng(self.seed))
        buffer = restore_buffer(self.session_factory, self.artifacts, active, model.labels,
                                kind=model.kind, seed=self.seed,
                                base_sets_dir=self.settings.base_sets_dir)
        # The frozen encoder's states of the round's clips, read by each candidate's EWC
        # importances, training and gate: computed once (strategies.cut_inputs, the gate's
        # batches in learner.inference.logits_batches).
        memo: dict = {}
        ewc_state, bootstrapped = self._ewc_state(active, model, buffer, memo)
        bootstrapped_state = ewc_state if bootstrapped else None
        self.timings["load_s"] = time.perf_counter() - started
        self._check_stop()

        # Avalanche: imported by the learner only, when a round runs
        from learner.continual.strategies import bootstrap_ewc_state, train_candidate

        mark = time.perf_counter()
        start_net, start_labels, data = model.net, model.labels, train
        if self.settings.strategy == "joint":
            start_net, start_labels, data = self._joint_inputs(active, model, train)
        self._add_time("train_s", mark)
        mark = time.perf_counter()
        gate_set = load_gate_set(self.session_factory, self.artifacts, model.labels,
                                 kind=model.kind, base_sets_dir=self.settings.base_sets_dir)
        self._add_time("gate_s", mark)
        gate = RegressionGate(self.settings.max_recall_drop, self.settings.gate_confidence)
        refused_first = None
        # The bolder candidate first (learner.bolder), then, if the gate refuses it, the one of
        # the settings as configured: the first the gate accepts is the round's candidate.
        for settings in self.settings.candidate_settings():
            mark = time.perf_counter()
            state = ewc_state
            if bootstrapped and settings is not self.settings:
                # Importances are mean squared gradients of minibatches, so their scale follows
                # the batch size: a candidate of another one bootstraps its own, as `bench
                # round-settings` measured it (the configured candidate's is the one kept).
                state = bootstrap_ewc_state(model.net, model.labels, buffer, settings,
                                            seed=self.seed, memo=memo)
            candidate = train_candidate(start_net, start_labels, data, buffer, state,
                                        settings, strategy=self.settings.strategy,
                                        seed=self.seed, stop=self.stop, memo=memo)
            self._add_time("train_s", mark)
            self._check_stop()
            mark = time.perf_counter()
            report = gate.judge(EmotionPredictor(model),
                                EmotionPredictor(LoadedModel(candidate.net, candidate.labels,
                                                             sha256="", kind=model.kind)),
                                gate_set, held_out, memo=memo)
            self._add_time("gate_s", mark)
            if report["decision"] == "accepted" or settings is self.settings:
                break
            refused_first = _refused_first(self.settings.bolder, report, candidate.steps)
        if refused_first is not None:
            report["refused_first"] = refused_first
        counts.update({"trained": len(train), "held_out": len(held_out),
                       "training_set": len(data), "replay_buffer": len(buffer),
                       "gate_set": len(gate_set),
                       "epochs": candidate.epochs, "steps": candidate.steps,
                       "candidates": 1 + (refused_first is not None),
                       "new_labels": [l for l in candidate.labels if l not in model.labels]})
        return self._commit(active, candidate, report, counts,
                            trained=[s.feedback_id for s in train],
                            held_out=[s.feedback_id for s in held_out],
                            unusable=[i.feedback_id for i in ignored + unreadable],
                            bootstrapped=bootstrapped_state, started=started)

    def _add_time(self, phase: str, since: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - since

    def _usable(self, items: list[FeedbackItem], model: LoadedModel):
        """(samples, ignored items, unreadable items); the samples hold the features `model`
        reads. Feedback naming a label outside learner.labels, or one the model does not know
        while new labels are not allowed, is ignored; a clip that is missing, corrupt or
        undecodable is unreadable. Both are consumed all the same: no later round could use
        them either."""
        allowed = feedback_labels(self.settings.labels, self.settings.allow_new_labels,
                                  model.labels)
        samples, ignored, unreadable = [], [], []
        for item in items:
            if item.label not in allowed:
                ignored.append(item)
                continue
            features = clip_features(self.artifacts, item, model.kind)
            if features is None:
                unreadable.append(item)
                continue
            samples.append(Sample(features, item.label, feedback_origin(item)))
        return samples, ignored, unreadable

    def _ewc_state(self, active: ModelVersion, model: LoadedModel,
                   buffer: list[BufferedSample], memo: dict) -> tuple[EwcState | None, bool]:
        """(state, whether it was computed now for a version that had none)."""
        if self.settings.strategy != "ewc+replay":
            return None, False
        state = load_ewc_state(self.artifacts, active)
        if state is not None:
            return state, False
        from learner.continual.strategies import bootstrap_ewc_state

        return bootstrap_ewc_state(model.net, model.labels, buffer, self.settings,
                                   seed=self.seed, memo=memo), True

    def _joint_inputs(self, active: ModelVersion, model: LoadedModel, train: list[Sample]):
        """Joint training, the upper bound: from the first version of the lineage, on all the
        feedback rounds trained on so far, this round's, and the whole base replay set."""
        with self.session_factory() as session:
            registry = ModelRegistry(session, self.artifacts)
            root = active
            while root.parent_version is not None:
                root = registry.get(root.parent_version)
            earlier = RoundFeedbackRepository(session).consumed_for_training()
            session.commit()
        root_model = load_version(self.artifacts, root)  # of the same kind: rounds keep it
        samples = list(train)
        for item in earlier:
            features = clip_features(self.artifacts, item, model.kind)
            if features is not None:
                samples.append(Sample(features, item.label, feedback_origin(item)))
        base = load_base_set("replay", self.settings.base_sets_dir, kind=model.kind)
        samples += [Sample(f, label, ExemplarRow("base", label, 0.0, base_index=i))
                    for i, (f, label) in enumerate(zip(base.features, base.labels))]
        return root_model.net, root_model.labels, samples

    def _commit(self, active: ModelVersion, candidate, report: dict, counts: dict, *,
                trained: list[int], held_out: list[int], unusable: list[int],
                bootstrapped: EwcState | None, started: float) -> RoundOutcome:
        mark = time.perf_counter()
        with self.session_factory() as session:
            if not LearnerLockRepository(session).renew(self.holder, self.settings.lock_ttl_s):
                raise LockLost("the learner lock expired and was taken over; nothing was saved")
            registry = ModelRegistry(session, self.artifacts)
            row = registry.register(
                model_bytes(candidate.net, candidate.labels), labels=list(candidate.labels),
                parent_version=active.version, gate_report=report,
                metrics={"run_id": self.run_id, "strategy": self.settings.strategy,
                         "gate_macro_f1": report["macro_f1_after"],
                         "new_feedback_accuracy": report["new_feedback_accuracy_after"]})
            if candidate.ewc is not None:
                self._write_state(session, row, candidate.ewc)
            parent = registry.get(active.version)
            if bootstrapped is not None and parent.state_path is None:
                # The next round from the parent reuses this.
                self._write_state(session, parent, bootstrapped)
            ReplayExemplarRepository(session).save(row.version,
                                                   [exemplar_row(b) for b in candidate.buffer])
            feedback = RoundFeedbackRepository(session)
            if report["decision"] != "accepted":
                # Refused: the feedback goes back for the next round (up to max_attempts). The
                # refusal may be a close call on a few clips; more feedback can settle it.
                returned = set(feedback.give_back(trained + held_out,
                                                  self.settings.max_attempts))
                counts["given_back"] = len(returned)
                trained = [i for i in trained if i not in returned]
                held_out = [i for i in held_out if i not in returned]
            feedback.mark_consumed(self.run_id, trained + unusable, held_out)
            self.lease.release_with(session)
            self.timings["save_s"] = time.perf_counter() - mark
            self.timings["total_s"] = time.perf_counter() - started
            counts["seconds"] = {k: round(v, 2) for k, v in self.timings.items()}
            # load_version: the file as stored, its checksum, and that it loads.
            return settle_candidate(session, registry, row, report, run_id=self.run_id,
                                    counts=counts,
                                    check_file=lambda: load_version(self.artifacts, row,
                                                                    session),
                                    reason=f"learning round {self.run_id}: {report['reason']}")

    def _write_state(self, session: Session, row: ModelVersion, state: EwcState) -> None:
        row.state_sha256, row.state_path = self.artifacts.put_state(row.version, state.to_bytes(),
                                                                    session)

    def _finish_skipped(self, counts: dict, reason: str,
                        consumed: Sequence[FeedbackItem] = ()) -> RoundOutcome:
        with self.session_factory() as session:
            RoundFeedbackRepository(session).mark_consumed(
                self.run_id, [i.feedback_id for i in consumed], [])
            runs = TrainingRunRepository(session)
            runs.finish(runs.get(self.run_id), "skipped", counts=counts, error=reason)
            self.lease.release_with(session)
            session.commit()
        return RoundOutcome(self.run_id, "skipped", counts=counts, error=reason)

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            from learner.continual.strategies import RoundStopped

            raise RoundStopped("the learner was asked to stop")


def _refused_first(changed: dict, report: dict, steps: int) -> dict:
    """What the gate said of the bolder candidate a round tried first and refused (the round's
    report is its fallback's)."""
    return {"changed": changed, "steps": steps, "reason": report["reason"],
            "recall_after": report["recall_after"],
            "new_feedback_accuracy_after": report["new_feedback_accuracy_after"]}


def settle_candidate(session: Session, registry: ModelRegistry, row: ModelVersion, report: dict,
                     *, run_id: int, counts: dict, check_file: Callable[[], object],
                     reason: str) -> RoundOutcome:
    """The gate's decision, in the round's one transaction (global and personal rounds alike):
    activate the registered candidate after `check_file` re-read it as stored, or mark it
    rejected; record the run with its report; commit."""
    status = "accepted" if report["decision"] == "accepted" else "rejected"
    if status == "accepted":
        check_file()
        registry.activate(row.version, reason=reason)
    else:
        registry.reject(row.version, report)
    runs = TrainingRunRepository(session)
    runs.finish(runs.get(run_id), status, counts=counts, gate_report=report,
                candidate_version=row.version)
    session.commit()
    return RoundOutcome(run_id, status, row.version, report, counts)


def record_failure(session_factory: sessionmaker[Session], run_id: int, err: Exception, *,
                   lease: LeaseKeeper | None = None) -> RoundOutcome:
    """Mark the run failed; with `lease`, release its lock in the same transaction."""
    error = f"{type(err).__name__}: {err}"
    try:
        with session_factory() as session:
            runs = TrainingRunRepository(session)
            run = runs.get(run_id)
            if run is not None and run.status == "running":
                runs.finish(run, "failed", error=error)
            if lease is not None:
                lease.release_with(session)
            session.commit()
    except Exception:  # the lock holder's next round marks it failed instead
        log.exception("could not record the failure of round %d", run_id)
    return RoundOutcome(run_id, "failed", error=error)


# ----------------------------------------------------------------------------------------------
# Reading what rounds learn from. Plain functions, shared with personal rounds.

def load_version(artifacts: ArtifactStore, row: ModelVersion,
                 session: Session | None = None) -> LoadedModel:
    """A version's model from the artifact store, its sha256 checked. Raises ModelFileError.
    `session`: read in that transaction (a candidate not committed yet)."""
    try:
        data = artifacts.read_model(row.artifact_path, row.sha256, session)
    except ArtifactError as err:
        raise ModelFileError(str(err)) from err
    return model_from_bytes(data, expected_sha256=row.sha256)


def load_ewc_state(artifacts: ArtifactStore, row: ModelVersion) -> EwcState | None:
    """The EWC state stored beside a version; None if it has none or it does not check out
    (then the round computes a fresh one from the replay buffer)."""
    if row.state_path is None or row.state_sha256 is None:
        return None
    try:
        return EwcState.from_bytes(artifacts.read_checked(row.state_path, row.state_sha256))
    except (ArtifactError, StateFileError) as err:
        log.warning("EWC state of version %s unusable (%s); computing a fresh one", row.version,
                    err)
        return None


def clip_features(artifacts: ArtifactStore, item: FeedbackItem, kind: str) -> np.ndarray | None:
    """The features a model of `kind` reads of a feedback clip, or None if its file is missing,
    corrupt or not audio."""
    try:
        audio = artifacts.read_checked(item.clip_path, item.clip_sha256)
        return features_for(kind)(decode_audio(audio, max_seconds=MAX_CLIP_SECONDS))
    except (ArtifactError, AudioError) as err:
        log.warning("feedback %d: clip %s unusable: %s", item.feedback_id, item.clip_path, err)
        return None


def feedback_origin(item: FeedbackItem) -> ExemplarRow:
    return ExemplarRow("feedback", item.label, 0.0, feedback_id=item.feedback_id,
                       clip_id=item.clip_id)


def restore_buffer(session_factory: sessionmaker[Session], artifacts: ArtifactStore,
                   version: ModelVersion, labels: Sequence[str], *, kind: str, seed: int,
                   base_sets_dir: Path | None = None) -> list[BufferedSample]:
    """The replay buffer stored for a version (a model of `kind`), as samples of its features;
    for a version without one, the base replay set shipped with the default model. Exemplars
    whose clip is gone are dropped."""
    with session_factory() as session:
        rows = ReplayExemplarRepository(session).for_version(version.version)
        items = ReplayExemplarRepository(session).feedback_items(rows)
        session.commit()
    try:
        base = load_base_set("replay", base_sets_dir, kind=kind)
    except BaseSetError as err:
        log.warning("no base replay set: %s", err)
        base = None
    if not rows and base is not None:
        rows = base_exemplars(base, tuple(labels), np.random.default_rng(seed))
    buffer = []
    for row in rows:
        if row.source == "base":
            ok = base is not None and row.base_index < len(base)
            features = base.features[row.base_index] if ok else None
        else:
            item = items.get(row.feedback_id)
            features = clip_features(artifacts, item, kind) if item is not None else None
        if features is not None:
            buffer.append(BufferedSample(Sample(features, row.label, row), row.weight))
    return buffer


def load_gate_set(session_factory: sessionmaker[Session], artifacts: ArtifactStore,
                  labels: Sequence[str], *, kind: str, scope: str = "global",
                  user_id: str | None = None, base_sets_dir: Path | None = None) -> list[Sample]:
    """The gate set for a model of `kind` knowing `labels`, as its features: the shipped base
    gate set plus the feedback that accepted rounds held out (of this scope), of those labels."""
    samples = []
    try:
        base = load_base_set("gate", base_sets_dir, kind=kind)
        samples += [Sample(f, label, ExemplarRow("base", label, 0.0, base_index=i), speaker)
                    for i, (f, label, speaker) in enumerate(zip(base.features, base.labels,
                                                                base.speakers))
                    if label in labels]
    except BaseSetError as err:
        log.warning("no base gate set: %s", err)
    with session_factory() as session:
        items = RoundFeedbackRepository(session).accepted_holdout(scope, user_id)
        session.commit()
    for item in items:
        if item.label in labels and (
                features := clip_features(artifacts, item, kind)) is not None:
            samples.append(Sample(features, item.label, feedback_origin(item), "feedback"))
    return samples
