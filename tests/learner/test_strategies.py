"""Every configured strategy trains a candidate with Avalanche, and hands back what the next
round needs; the EWC state survives its file."""
import numpy as np
import pytest
import torch

from learner.checkpoint import model_from_bytes
from learner.continual.ewc_state import EwcState, StateFileError
from learner.continual.replay import BufferedSample, Sample, split_holdout
from learner.continual.strategies import (STRATEGIES, bootstrap_ewc_state, round_steps,
                                          train_candidate)
from storage.runs import ExemplarRow
from tests.learner.toy_learning import (TOY_LABELS, toy_base_sets, toy_features,  # noqa: F401
                                        toy_learner_settings, toy_model)


def _samples(labels: list[str], seed: int) -> list[Sample]:
    return [Sample(toy_features(label, seed + i), label,
                   ExemplarRow("feedback", label, 0.0, feedback_id=seed + i, clip_id=seed + i))
            for i, label in enumerate(labels)]


def _buffer() -> list[BufferedSample]:
    return [BufferedSample(Sample(toy_features(label, 500 + i), label,
                                  ExemplarRow("base", label, 0.0, base_index=i)), 0.1 * i)
            for i, label in enumerate(list(TOY_LABELS) * 3)]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_trains_a_candidate_and_keeps_a_balanced_buffer(strategy, toy_model,
                                                                      toy_base_sets):
    settings = toy_learner_settings(toy_base_sets, steps=3)
    start = model_from_bytes(toy_model)
    new = _samples(["happy", "sad"] * 3, seed=10)
    ewc = bootstrap_ewc_state(start.net, start.labels, _buffer(), settings, seed=1)
    candidate = train_candidate(start.net, start.labels, new, _buffer(), ewc, settings,
                                strategy=strategy, seed=3)

    assert candidate.labels == TOY_LABELS and candidate.steps == 3
    moved = any(not torch.equal(a, b) for a, b in zip(candidate.net.state_dict().values(),
                                                      start.net.state_dict().values()))
    assert moved
    assert (candidate.ewc is not None) == (strategy == "ewc+replay")
    per_class = [sum(b.sample.label == label for b in candidate.buffer) for label in TOY_LABELS]
    assert per_class[0] == per_class[1] and sum(per_class) <= settings.mem_size
    assert {b.sample.origin.source for b in candidate.buffer} == {"base", "feedback"}


def test_training_is_deterministic_for_a_seed(toy_model, toy_base_sets):
    settings = toy_learner_settings(toy_base_sets, steps=3)
    start = model_from_bytes(toy_model)
    new = _samples(["happy", "sad"] * 3, seed=20)
    runs = [train_candidate(start.net, start.labels, new, _buffer(), None, settings,
                            strategy="replay", seed=5) for _ in range(2)]
    for a, b in zip(runs[0].net.state_dict().values(), runs[1].net.state_dict().values()):
        assert torch.equal(a, b)
    assert [x.weight for x in runs[0].buffer] == [x.weight for x in runs[1].buffer]


def test_with_passes_a_round_takes_steps_that_follow_its_size(toy_model, toy_base_sets):
    settings = toy_learner_settings(toy_base_sets, steps=3, batch_size=4, passes=2,
                                    min_steps=3, max_steps=7)
    assert [round_steps(settings, n) for n in (1, 8, 12, 100)] == [3, 4, 6, 7]
    start = model_from_bytes(toy_model)
    candidate = train_candidate(start.net, start.labels, _samples(["happy", "sad"] * 6, seed=30),
                                _buffer(), None, settings, strategy="replay", seed=5)
    assert candidate.steps == 6  # 12 clips, 3 batches of 4, twice over
    assert round_steps(toy_learner_settings(toy_base_sets, steps=3), 100) == 3  # no passes


def test_ewc_state_round_trips_through_its_file_and_refuses_damage():
    state = EwcState(importances={"b": torch.rand(3), "a": torch.rand(2, 2)},
                     anchor={"b": torch.rand(3), "a": torch.rand(2, 2)}, rounds=4)
    back = EwcState.from_bytes(state.to_bytes())
    assert list(back.importances) == ["b", "a"] and back.rounds == 4  # order kept
    assert all(torch.equal(back.anchor[k], state.anchor[k]) for k in state.anchor)
    data = state.to_bytes()
    with pytest.raises(StateFileError):
        EwcState.from_bytes(data, expected_sha256="0" * 64)
    with pytest.raises(StateFileError):
        EwcState.from_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")


def test_the_holdout_is_a_seeded_share_of_each_label():
    samples = _samples(["happy"] * 10 + ["sad"] * 5 + ["angry"] * 2, seed=0)
    train, held = split_holdout(samples, 0.2, np.random.default_rng(1))
    assert sorted(s.label for s in held) == ["happy", "happy", "sad"]  # too few angry to spare
    assert len(train) + len(held) == len(samples)
    again, _ = split_holdout(samples, 0.2, np.random.default_rng(1))
    assert [s.feedback_id for s in again] == [s.feedback_id for s in train]
