"""Personal rounds on the toy world (SQLite: see `database_backend` below).

Alice's voice is unusual: her happy clips are low (pitch 0.8), where the global toy model hears
sad. Her corrections give her a personal head that hears them as happy, while the global model
and everyone else stay as they were. Bob floods wrong labels."""
import pytest
from sqlalchemy import func, select

from learner.checkpoint import model_from_bytes
from learner.continual.rounds import run_round
from learner.features import extract_features
from learner.inference import EmotionPredictor
from learner.personal.model import PersonalPredictor, personal_head_from_bytes
from learner.personal.rounds import run_personal_rounds
from service.bench.clips import to_wav, voiced_clip
from storage.models import Feedback, ModelVersion, Prediction, TrainingRun
from storage.personal import PersonalRepository
from storage.registry import ModelRegistry
from storage.repositories import ClipRepository, FeedbackRepository, PredictionRepository
from storage.settings import PersonalSettings
from tests.learner.test_rounds import REPORT_KEYS
from tests.learner.toy_learning import Given, toy_wave
from tests.learner.toy_learning import toy_base_sets, toy_model, world  # noqa: F401 (fixtures)


@pytest.fixture
def database_backend() -> str:
    """SQLite only here: what the rounds decide does not depend on the database, and the
    storage and HTTP side of personal models runs on both in tests/service/test_personal_api.py."""
    return "sqlite"


PERSONAL = PersonalSettings(min_feedback=8, folds=2, steps=20, lr=0.05)
ALICE_HAPPY_PITCH = 0.8  # toy 'sad' is 0.6, 'happy' 1.7: the global model hears 0.8 as sad


def alice_wave(label: str, seed: int):
    if label == "happy":
        return voiced_clip(0.8, 16_000 * ALICE_HAPPY_PITCH, seed=seed)[:12_800]
    return toy_wave(label, seed)


def correct(world, user_id: str, items: list[tuple], seed: int = 0) -> list[Given]:
    """Per (wave, label): the clip stored, a prediction for the user, the label as feedback."""
    given = []
    with world.session_factory() as session:
        for i, (wave, label) in enumerate(items):
            audio = to_wav(wave, 16_000)
            sha256, path = world.artifacts.put_clip(audio, ".wav")
            clip = ClipRepository(session).get_or_create(
                sha256=sha256, duration_s=0.8, sample_rate=16_000, artifact_path=path,
                size_bytes=len(audio))
            prediction = PredictionRepository(session).create(
                api_key_id=world.api_key_id, clip_id=clip.id, model_version=1, label="sad",
                confidence=0.9, probabilities={}, latency_ms=1.0, user_id=user_id)
            given.append(Given(FeedbackRepository(session).add(prediction, label).id, label))
        session.commit()
    return given


def alice_corrects(world, n: int = 6, seed: int = 1) -> list[Given]:
    """n of her low happy clips and n sad ones, each labelled right."""
    return correct(world, "alice", [(alice_wave(label, seed * 100 + i), label)
                                    for label in ("happy", "sad") for i in range(n)])


def bob_floods(world, n: int = 8) -> list[Given]:
    """Every label wrong: his happy clips labelled sad, his sad ones happy."""
    flipped = {"happy": "sad", "sad": "happy"}
    return correct(world, "bob", [(toy_wave(label, 700 + i), flipped[label])
                                  for label in ("happy", "sad") for i in range(n)])


def rounds(world, **kwargs):
    return run_personal_rounds(world.session_factory, world.artifacts, world.settings, PERSONAL,
                               trigger="manual", **kwargs)


def versions(world, **filters) -> list[ModelVersion]:
    with world.session_factory() as session:
        return ModelRegistry(session, world.artifacts).list_versions(**filters)


def head_of(world, row: ModelVersion):
    return personal_head_from_bytes(world.artifacts.read_model(row.artifact_path, row.sha256))


def personal_predictor(world, row: ModelVersion, global_model: bytes) -> PersonalPredictor:
    return PersonalPredictor(EmotionPredictor(model_from_bytes(global_model)), head_of(world, row))


def test_enough_corrections_give_a_user_a_small_personal_head_on_the_global_version(
        world, toy_model):
    alice_corrects(world)
    [outcome] = rounds(world)

    assert outcome.status == "accepted", outcome.gate_report
    [mine] = versions(world, scope="user")
    assert (mine.user_id, mine.parent_version, mine.status) == ("alice", 1, "active")
    assert world.artifacts.path(mine.artifact_path).stat().st_size <= 1_000_000
    memory = head_of(world, mine).memory  # her 12 corrections, as the version remembers them
    assert sorted(memory.labels.tolist()) == [0] * 6 + [1] * 6
    assert (memory.weight, memory.threshold, memory.neighbours) == (
        PERSONAL.memory_weight, PERSONAL.memory_threshold, PERSONAL.memory_neighbours)
    report = outcome.gate_report
    assert REPORT_KEYS <= set(report) and (report["scope"], report["user_id"]) == ("user", "alice")
    assert report["new_feedback_accuracy_after"] > report["new_feedback_accuracy_before"]
    assert report["new_holdout_size"] == 12  # cross-validated: every correction judged
    with world.session_factory() as session:
        run = session.get(TrainingRun, outcome.run_id)
        unconsumed = session.scalar(select(func.count()).select_from(Feedback)
                                    .where(Feedback.consumed_by_run_id.is_(None)))
    assert (run.scope, run.user_id, run.status, run.candidate_version) == (
        "user", "alice", "accepted", mine.version)
    assert unconsumed == 12  # the global learner still gets all of it
    [global_v1] = versions(world, scope="global")
    assert global_v1.status == "active"

    # Her unusual happy voice: the global model hears sad, her model hears happy.
    clips = [extract_features(alice_wave("happy", 500 + i)) for i in range(6)]
    mine_answers = [personal_predictor(world, mine, toy_model).predict_features(c).emotion
                    for c in clips]
    global_answers = [EmotionPredictor(model_from_bytes(toy_model)).predict_features(c).emotion
                      for c in clips]
    assert mine_answers.count("happy") > global_answers.count("happy")
    assert rounds(world) == []  # nothing new: she is not due again


def test_a_personal_version_remembers_only_the_newest_corrections_or_none(world):
    alice_corrects(world)
    [outcome] = run_personal_rounds(world.session_factory, world.artifacts, world.settings,
                                    PERSONAL.model_copy(update={"memory_size": 5}),
                                    trigger="manual")
    [mine] = versions(world, scope="user")
    assert outcome.status == "accepted", outcome.gate_report
    assert len(head_of(world, mine).memory.labels) == 5
    assert head_of(world, mine).memory.labels.tolist() == [1] * 5  # her sad clips came last

    alice_corrects(world, seed=2)  # due again, with the memory off: the head alone
    run_personal_rounds(world.session_factory, world.artifacts, world.settings,
                        PERSONAL.model_copy(update={"memory_weight": 0.0}), trigger="manual")
    [newest] = [v for v in versions(world, scope="user") if v.status == "active"]
    assert newest.version != mine.version and head_of(world, newest).memory is None


def test_a_user_below_min_feedback_is_not_due_and_an_explicit_round_is_skipped(world):
    alice_corrects(world, n=3)
    assert rounds(world) == []
    [outcome] = rounds(world, user_ids=["alice"])
    assert outcome.status == "skipped" and "min_feedback" in outcome.error
    assert versions(world, scope="user") == []


def test_a_flood_of_wrong_labels_changes_neither_the_global_model_nor_another_user(world):
    alice_corrects(world)
    [first] = rounds(world)
    assert first.status == "accepted", first.gate_report
    [alice_v] = versions(world, scope="user", user_id="alice")

    bob_floods(world)
    outcomes = rounds(world)  # only bob is due: alice's data did not change
    assert [o.gate_report["user_id"] for o in outcomes] == ["bob"]
    assert outcomes[0].status == "rejected"
    assert "macro recall fell" in outcomes[0].gate_report["reason"]
    # The global round takes his flood (and alice's corrections); trained hard enough for the
    # damage to show, as in tests/learner/test_rounds.py, the global gate refuses it.
    global_round = run_round(world.session_factory, world.artifacts,
                             world.settings.model_copy(update={"lr": 1e-2, "steps": 12}))
    assert global_round.status == "rejected", global_round.gate_report
    assert [v.version for v in versions(world, scope="global") if v.status == "active"] == [1]

    # Alice's model is the one she had, and rebuilding it now gives the very same weights:
    # nothing of bob's reached it.
    [still] = [v for v in versions(world, scope="user", user_id="alice") if v.status == "active"]
    assert (still.version, still.sha256) == (alice_v.version, alice_v.sha256)
    [again] = rounds(world, user_ids=["alice"])
    assert again.status == "accepted"
    rebuilt = next(v for v in versions(world, scope="user", user_id="alice")
                   if v.version == again.candidate_version)
    before, after = head_of(world, alice_v), head_of(world, rebuilt)
    assert before.weight.equal(after.weight) and before.bias.equal(after.bias)


def test_only_the_users_own_corrections_train_their_model(world):
    alice = alice_corrects(world)
    # Bob corrects one of alice's predictions, saying it was him speaking: his, not hers.
    with world.session_factory() as session:
        prediction = session.scalars(select(Prediction).join(
            Feedback, Feedback.prediction_id == Prediction.id)
            .where(Feedback.id == alice[0].feedback_id)).one()
        FeedbackRepository(session).add(prediction, "happy", user_id="bob")
        session.commit()
    with world.session_factory() as session:
        mine = PersonalRepository(session).feedback_for_user("alice")
        his = PersonalRepository(session).feedback_for_user("bob")
    # One correction per prediction counts, the latest: that prediction now trains bob's model
    # only, and alice keeps the rest of hers.
    assert {i.feedback_id for i in mine} == {g.feedback_id for g in alice[1:]}
    assert [i.label for i in his] == ["happy"]


def test_a_user_forgotten_while_their_round_runs_leaves_nothing_behind(world, monkeypatch):
    import learner.personal.training as training
    from storage.forget import forget_user

    alice_corrects(world)
    real_training = training.train_personal

    def forget_her_meanwhile(*args, **kwargs):
        with world.session_factory() as session:
            forget_user(session, "alice")
            session.commit()
        return real_training(*args, **kwargs)

    monkeypatch.setattr(training, "train_personal", forget_her_meanwhile)
    [outcome] = rounds(world)
    assert outcome.status == "skipped" and "forgotten" in outcome.error
    with world.session_factory() as session:
        runs = session.scalars(select(TrainingRun).where(TrainingRun.user_id == "alice")).all()
    assert runs == []
    assert versions(world, scope="user") == []


def test_a_shutdown_during_a_personal_round_ends_it_and_keeps_the_user_due(world, monkeypatch):
    import threading

    import learner.personal.training as training
    from learner.personal.rounds import due_users

    alice_corrects(world)
    stop, real_training = threading.Event(), training.train_personal

    def shut_down_meanwhile(*args, **kwargs):
        stop.set()
        return real_training(*args, **kwargs)

    monkeypatch.setattr(training, "train_personal", shut_down_meanwhile)
    [outcome] = rounds(world, stop=stop)
    assert outcome.status == "failed" and "asked to stop" in outcome.error
    assert versions(world, scope="user") == []
    assert due_users(world.session_factory, world.artifacts, PERSONAL) == ["alice"]
