"""Learning rounds on the toy world, on SQLite and PostgreSQL: feedback in, a gated version out,
and what one round hands to the next."""
import numpy as np
import pytest
from sqlalchemy import select

from learner.checkpoint import model_from_bytes
from learner.continual.ewc_state import EwcState
from learner.continual.gate import RegressionGate
from learner.continual.replay import Sample
from learner.continual.rounds import RoundRunning, run_round
from learner.inference import EmotionPredictor
from storage.db_artifacts import DatabaseArtifactStore
from storage.models import Feedback, ModelVersion, ReplayExemplar, TrainingRun
from storage.registry import ModelRegistry
from storage.repositories import AuditLog
from storage.runs import ExemplarRow, LearnerLockRepository
from tests.learner.toy_learning import (TOY_LABELS, make_world, toy_base_sets,  # noqa: F401
                                        toy_features, toy_model, world)

# What these show does not depend on the database; the round's storage side runs on both.
sqlite_only = pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)

# The figures every gate report has (personal ones too), and the global gate's paired tests.
REPORT_KEYS = {"decision", "reason", "scope", "user_id", "old_classes", "new_classes",
               "max_recall_drop", "recall_before", "recall_after", "macro_f1_before",
               "macro_f1_after", "new_feedback_accuracy_before", "new_feedback_accuracy_after",
               "gate_set_size", "new_holdout_size"}
TEST_KEYS = {"test", "confidence", "alpha", "hypotheses", "paired", "false_alarms", "signal"}


def _round(world, **overrides):
    settings = world.settings.model_copy(update=overrides)
    return run_round(world.session_factory, world.artifacts, settings, trigger="manual")


def _versions(world) -> dict[int, ModelVersion]:
    with world.session_factory() as session:
        return {v.version: v for v in ModelRegistry(session, world.artifacts).list_versions()}


def test_a_round_learns_from_feedback_registers_and_activates_a_version(world):
    given = world.feedback(["happy", "sad"] * 6)
    outcome = _round(world)

    assert outcome.status == "accepted", outcome.gate_report
    assert outcome.candidate_version == 2
    versions = _versions(world)
    assert (versions[1].status, versions[2].status, versions[2].parent_version) == (
        "retired", "active", 1)
    assert versions[2].gate_report == outcome.gate_report
    assert set(outcome.gate_report) == REPORT_KEYS | TEST_KEYS
    paired = outcome.gate_report["paired"]
    assert set(paired) == {*TOY_LABELS, "new feedback (held out)"}
    assert paired["new feedback (held out)"]["n"] == outcome.counts["held_out"]
    assert outcome.gate_report["old_classes"] == list(TOY_LABELS)
    assert outcome.counts["trained"] + outcome.counts["held_out"] == len(given)
    assert outcome.counts["held_out"] == outcome.gate_report["new_holdout_size"] > 0
    with world.session_factory() as session:
        feedback = session.scalars(select(Feedback)).all()
        run = session.get(TrainingRun, outcome.run_id)
        audit = AuditLog(session).list_recent(limit=1)[0]
    assert {f.consumed_by_run_id for f in feedback} == {outcome.run_id}
    assert sum(f.held_out for f in feedback) == outcome.counts["held_out"]
    assert (run.status, run.candidate_version, run.gate_report["decision"]) == (
        "accepted", 2, "accepted")
    assert run.finished_at is not None and run.counts["seconds"]["total_s"] > 0
    assert (audit.action, audit.target) == ("model.activate", "model_version:2")
    assert audit.details["reason"].startswith(f"learning round {outcome.run_id}")
    # The served file is complete and checksummed: it loads as the registry recorded it.
    row = versions[2]
    model = model_from_bytes(world.artifacts.read_model(row.artifact_path, row.sha256),
                             expected_sha256=row.sha256)
    assert model.labels == TOY_LABELS


@sqlite_only
def test_a_round_keeps_its_bolder_candidate_when_the_gate_accepts_it(world):
    world.feedback(["happy", "sad"] * 6)
    outcome = _round(world, bolder={"steps": 3})

    assert outcome.status == "accepted", outcome.gate_report
    assert (outcome.counts["candidates"], outcome.counts["steps"]) == (1, 3)
    assert "refused_first" not in outcome.gate_report
    assert set(_versions(world)) == {1, 2}


@sqlite_only
def test_a_round_falls_back_to_the_configured_candidate_when_the_bolder_one_is_refused(world):
    world.feedback(["happy", "sad"] * 6)
    # A learning rate no model survives: the bolder candidate forgets everything.
    outcome = _round(world, bolder={"lr": 50.0, "steps": 12})

    assert outcome.status == "accepted", outcome.gate_report
    report = outcome.gate_report
    # The version served is the configured candidate (6 steps); the refused one is on record.
    assert (outcome.counts["candidates"], outcome.counts["steps"]) == (2, 6)
    first = report["refused_first"]
    assert first["changed"] == {"lr": 50.0, "steps": 12} and first["steps"] == 12
    assert first["reason"].startswith("old class") and "lost" in first["reason"]
    assert set(report) == REPORT_KEYS | TEST_KEYS | {"refused_first"}
    versions = _versions(world)
    assert set(versions) == {1, 2} and versions[2].status == "active"
    assert versions[2].gate_report == report


@sqlite_only
def test_a_round_whose_two_candidates_are_refused_serves_neither(world):
    truth = ["happy", "sad"] * 8
    world.feedback(["sad" if label == "happy" else "happy" for label in truth], truth=truth)
    outcome = _round(world, strategy="naive", lr=1e-2, steps=12, bolder={"lr": 3e-2})

    assert outcome.status == "rejected", outcome.gate_report
    assert outcome.counts["candidates"] == 2 and outcome.gate_report["refused_first"]
    versions = _versions(world)
    assert (versions[1].status, versions[2].status) == ("active", "rejected")


@sqlite_only
def test_a_round_without_new_feedback_is_skipped(world):
    outcome = _round(world)
    assert (outcome.status, outcome.candidate_version) == ("skipped", None)
    assert set(_versions(world)) == {1}


def test_the_gate_rejects_a_candidate_trained_on_flipped_labels(world):
    truth = ["happy", "sad"] * 8
    flipped = ["sad" if label == "happy" else "happy" for label in truth]
    world.feedback(flipped, truth=truth)
    outcome = _round(world, strategy="naive", lr=1e-2, steps=12)  # the forgetting the gate is for

    assert outcome.status == "rejected", outcome.gate_report
    report = outcome.gate_report
    assert report["decision"] == "rejected" and report["reason"]
    assert any(report["recall_after"][c] < report["recall_before"][c] - 0.02 for c in TOY_LABELS)
    versions = _versions(world)
    assert (versions[1].status, versions[2].status) == ("active", "rejected")
    assert versions[2].gate_report == report
    with world.session_factory() as session:
        run = session.get(TrainingRun, outcome.run_id)
        feedback = [(f.consumed_by_run_id, f.rejections) for f in session.scalars(select(Feedback))]
    assert (run.status, run.gate_report) == ("rejected", report)
    assert run.counts["given_back"] == 16
    assert set(feedback) == {(None, 1)}  # given back for one more round

    again = _round(world, strategy="naive", lr=1e-2, steps=12)
    assert again.status == "rejected" and again.counts["feedback"] == 16
    assert again.counts["given_back"] == 0
    with world.session_factory() as session:  # the second refusal is the last: gone for good
        assert {f.consumed_by_run_id for f in session.scalars(select(Feedback))} == {again.run_id}
    assert _round(world).status == "skipped"
    assert _versions(world)[1].status == "active"


def test_feedback_a_refused_round_gave_back_trains_the_next_round(world, tmp_path):
    first = world.feedback(["happy", "sad"] * 4)
    refused = _round(world, base_sets_dir=tmp_path)  # no gate set: nothing can pass
    assert refused.status == "rejected" and refused.counts["given_back"] == 8

    later = world.feedback(["happy", "sad"] * 4, seed=5)
    accepted = _round(world)
    assert accepted.status == "accepted", accepted.gate_report
    assert accepted.counts["feedback"] == 16
    with world.session_factory() as session:
        rows = {f.id: (f.consumed_by_run_id, f.rejections)
                for f in session.scalars(select(Feedback))}
    assert {rows[g.feedback_id] for g in first} == {(accepted.run_id, 1)}
    assert {rows[g.feedback_id] for g in later} == {(accepted.run_id, 0)}


@sqlite_only
def test_with_one_attempt_a_refused_round_consumes_its_feedback(world, tmp_path):
    world.feedback(["happy", "sad"] * 4)
    refused = _round(world, base_sets_dir=tmp_path, max_attempts=1)  # no gate set
    assert refused.status == "rejected" and refused.counts["given_back"] == 0
    with world.session_factory() as session:
        assert {f.consumed_by_run_id for f in session.scalars(select(Feedback))} == {
            refused.run_id}


def test_the_gate_accepts_an_equal_candidate_and_rejects_a_worse_one(toy_model):
    good = EmotionPredictor(model_from_bytes(toy_model))
    swapped = model_from_bytes(toy_model)
    head = swapped.net.head
    head.weight.data, head.bias.data = head.weight.data.flip(0), head.bias.data.flip(0)
    bad = EmotionPredictor(swapped)
    gate_set = [Sample(toy_features(label, 50 + k), label, ExemplarRow("base", label, 0.0, 0))
                for label in TOY_LABELS for k in range(12)]
    holdout = gate_set[:6] + gate_set[-6:]
    gate = RegressionGate(max_recall_drop=0.02)

    accepted = gate.judge(good, good, gate_set, holdout)
    assert accepted["decision"] == "accepted", accepted["reason"]
    assert accepted["recall_before"] == accepted["recall_after"] == {"happy": 1.0, "sad": 1.0}
    rejected = gate.judge(good, bad, gate_set, holdout)
    assert rejected["decision"] == "rejected"
    assert all(rejected["paired"][c]["refused"] for c in TOY_LABELS), rejected["reason"]
    assert rejected["macro_f1_after"] < rejected["macro_f1_before"]
    assert rejected["new_feedback_accuracy_after"] < rejected["new_feedback_accuracy_before"]


def test_rounds_read_and_write_everything_through_the_database_store(
        session_factory, tmp_path, toy_model, toy_base_sets):
    """Clips, model files and EWC state in the database: a round reads the clips the API
    stored, checks its candidate in its own uncommitted transaction, and the next round restores
    the state the first one stored."""
    world = make_world(session_factory, tmp_path, toy_model, toy_base_sets,
                       artifacts=DatabaseArtifactStore(session_factory.kw["bind"]))
    world.feedback(["happy", "sad"] * 6, seed=1)
    first = _round(world)
    assert first.status == "accepted", first.error or first.gate_report
    world.feedback(["happy", "sad"] * 6, seed=2)
    second = _round(world)
    assert second.status == "accepted", second.error or second.gate_report
    v3 = _versions(world)[3]
    state = EwcState.from_bytes(world.artifacts.read_checked(v3.state_path, v3.state_sha256))
    assert state.rounds == 2 and v3.status == "active"
    assert not (tmp_path / "artifacts").exists()


def test_ewc_state_and_replay_exemplars_carry_from_one_round_to_the_next(world):
    world.feedback(["happy", "sad"] * 6, seed=1)
    first = _round(world)
    assert first.status == "accepted", first.gate_report
    v2 = _versions(world)[2]
    state = EwcState.from_bytes(world.artifacts.read_checked(v2.state_path, v2.state_sha256))
    assert state.rounds == 1 and set(state.importances) == set(state.anchor)
    assert all(t.abs().sum() > 0 for t in state.importances.values() if t.dim() > 1)
    with world.session_factory() as session:
        rows = session.scalars(select(ReplayExemplar)
                               .where(ReplayExemplar.model_version == 2)).all()
    assert 0 < len(rows) <= world.settings.mem_size
    sources = {r.source for r in rows}
    assert sources == {"base", "feedback"}  # the buffer started from the base set, took feedback
    per_class = [sum(r.label == label for r in rows) for label in TOY_LABELS]
    assert max(per_class) - min(per_class) <= 1  # class-balanced

    world.feedback(["happy", "sad"] * 6, seed=2)
    second = _round(world)
    assert second.status == "accepted", second.gate_report
    v3 = _versions(world)[3]
    after = EwcState.from_bytes(world.artifacts.read_checked(v3.state_path, v3.state_sha256))
    assert after.rounds == 2  # restored from version 2's file, then updated
    # The anchor is version 3's own weights: the next round is pulled toward what it starts from.
    served = model_from_bytes(world.artifacts.read_model(v3.artifact_path, v3.sha256)).net
    assert np.allclose(after.anchor["net.lstm.weight_hh_l0"].numpy(),
                       served.lstm.weight_hh_l0.detach().numpy())
    with world.session_factory() as session:
        kept = {(r.source, r.base_index, r.feedback_id) for r in rows}
        rows3 = session.scalars(select(ReplayExemplar)
                                .where(ReplayExemplar.model_version == 3)).all()
        gate_holdout = session.scalars(select(Feedback).where(Feedback.held_out.is_(True))).all()
    # Exemplars of version 2 that survived the reservoir are the same rows' entries again.
    assert kept & {(r.source, r.base_index, r.feedback_id) for r in rows3}
    # The first round's held-out feedback joined the second round's gate set.
    toy_gate_set = 16
    assert second.gate_report["gate_set_size"] == toy_gate_set + sum(
        f.consumed_by_run_id == first.run_id for f in gate_holdout)


@sqlite_only
def test_a_new_label_grows_the_head_and_the_gate_treats_it_as_new(world):
    world.feedback(["angry"] * 6 + ["happy", "sad"] * 3)
    outcome = _round(world)

    report = outcome.gate_report
    assert (report["old_classes"], report["new_classes"]) == (list(TOY_LABELS), ["angry"])
    assert set(report["recall_before"]) == set(TOY_LABELS)  # only old classes are guarded
    candidate = _versions(world)[outcome.candidate_version]
    assert candidate.labels == [*TOY_LABELS, "angry"]
    model = model_from_bytes(world.artifacts.read_model(candidate.artifact_path,
                                                        candidate.sha256))
    assert model.net.head.out_features == 3 and model.labels == (*TOY_LABELS, "angry")


@sqlite_only
def test_new_labels_are_ignored_when_the_config_forbids_them(world):
    world.feedback(["angry"] * 3 + ["happy", "sad"] * 3)
    outcome = _round(world, allow_new_labels=False)
    assert outcome.counts["ignored_unknown_label"] == 3
    assert _versions(world)[outcome.candidate_version].labels == list(TOY_LABELS)
    with world.session_factory() as session:  # consumed all the same: never retried
        assert {f.consumed_by_run_id for f in session.scalars(select(Feedback))} == {
            outcome.run_id}


@sqlite_only
def test_a_corrupt_active_model_fails_the_round_and_changes_nothing(world):
    world.feedback(["happy", "sad"] * 3)
    v1 = _versions(world)[1]
    world.artifacts.path(v1.artifact_path).write_bytes(b"not a model any more")
    outcome = _round(world)

    assert outcome.status == "failed" and "ModelFileError" in outcome.error
    versions = _versions(world)
    assert set(versions) == {1} and versions[1].status == "active"
    with world.session_factory() as session:
        assert {f.consumed_by_run_id for f in session.scalars(select(Feedback))} == {None}
        assert session.get(TrainingRun, outcome.run_id).status == "failed"


@sqlite_only
def test_joint_retrains_the_first_version_on_every_correction_so_far(world):
    world.feedback(["happy", "sad"] * 4, seed=1)
    first = _round(world, strategy="joint")
    world.feedback(["happy", "sad"] * 4, seed=2)
    second = _round(world, strategy="joint")
    toy_replay_set = 8
    assert second.counts["training_set"] == (first.counts["trained"] + second.counts["trained"]
                                             + toy_replay_set)
    assert _versions(world)[second.candidate_version].parent_version == (
        first.candidate_version if first.status == "accepted" else 1)


def test_no_round_starts_while_another_process_holds_the_lock(world):
    world.feedback(["happy", "sad"] * 3)
    with world.session_factory() as session:
        assert LearnerLockRepository(session).acquire("another-process", ttl_s=60)
    with pytest.raises(RoundRunning):
        _round(world)
    with world.session_factory() as session:
        assert session.scalars(select(TrainingRun)).all() == []
        assert {f.consumed_by_run_id for f in session.scalars(select(Feedback))} == {None}
