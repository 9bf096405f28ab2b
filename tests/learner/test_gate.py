"""The gate's decision on constructed prediction tables: what the active model and a candidate
answered, clip by clip, on a gate set shaped like the shipped one (8 classes, 50 clips each, the
active model right on 39 of them: recall 0.78)."""
import pytest
from scipy.stats import binomtest

from learner.continual.gate import NEW_FEEDBACK, Answers, RegressionGate, holm

CLASSES = ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]
PER_CLASS, RIGHT = 50, 39


def _table() -> tuple[list[str], list[str]]:
    """Truth and the active model's answers: per class the first 39 clips right."""
    truth, before = [], []
    for i, label in enumerate(CLASSES):
        wrong = CLASSES[(i + 1) % len(CLASSES)]
        truth += [label] * PER_CLASS
        before += [label] * RIGHT + [wrong] * (PER_CLASS - RIGHT)
    return truth, before


def _candidate(truth, before, *, lost: dict[str, int] = {}, gained: dict[str, int] = {},
               to: str | None = None):
    """The active model's answers with `lost[c]` right clips of class c made wrong (answered
    `to`, by default the class two along) and `gained[c]` wrong ones made right."""
    after = list(before)
    for label in CLASSES:
        rows = [i for i, t in enumerate(truth) if t == label]
        right = [i for i in rows if before[i] == label]
        wrong = [i for i in rows if before[i] != label]
        for i in right[:lost.get(label, 0)]:
            after[i] = to or CLASSES[(CLASSES.index(label) + 2) % len(CLASSES)]
        for i in wrong[:gained.get(label, 0)]:
            after[i] = label
    return after


def _judge(after, holdout=([], [], []), gate=RegressionGate(0.02, 0.95)):
    truth, before = _table()
    return gate.judge_answers(CLASSES, CLASSES, Answers(truth, before, after, *holdout))


def _expected_refusal(lost: int, hypotheses: int, tolerance: float = 0.02,
                      alpha: float = 0.05) -> bool:
    """Independently of learner.continual.gate: the exact binomial test of the lost clips among the
    discordant ones, its null the most loss the tolerance allows; Holm with every other
    hypothesis at a larger p multiplies the smallest p-value by their number."""
    if lost == 0:
        return False
    pi0 = min(1.0, 0.5 + tolerance * PER_CLASS / (2 * lost))
    p = binomtest(lost, lost, pi0, alternative="greater").pvalue
    return min(1.0, hypotheses * p) <= alpha


def test_a_pure_loss_in_one_class_is_refused_exactly_when_the_test_says_so():
    truth, before = _table()
    decisions = {}
    for lost in range(0, RIGHT + 1):
        report = _judge(_candidate(truth, before, lost={"sad": lost}))
        decisions[lost] = report["decision"] == "rejected"
        # Every clip 'sad' lost is now answered 'fearful': that class's false alarms are tested
        # too (with a weaker p-value here), 16 hypotheses in all.
        assert decisions[lost] == _expected_refusal(lost, 2 * len(CLASSES)), (lost, report)
        if decisions[lost]:
            assert "old class 'sad' lost more than 0.020" in report["reason"]
    smallest = min(k for k, refused in decisions.items() if refused)
    # The test's resolution on 50 clips a class: losing 10 clips (20 points) and gaining none.
    assert smallest == 10 and not decisions[smallest - 1]
    assert all(decisions[k] for k in range(smallest, RIGHT + 1))
    report = _judge(before)
    assert report["paired"]["sad"]["detectable_loss_clips"] == smallest
    assert report["paired"]["sad"]["detectable_loss"] == pytest.approx(smallest / PER_CLASS)


def test_noise_level_swaps_both_ways_are_accepted():
    truth, before = _table()
    # Every class trades clips both ways: some lose a little, some gain.
    swaps = _candidate(truth, before, lost={c: 4 for c in CLASSES},
                       gained={c: 2 + i % 3 for i, c in enumerate(CLASSES)})
    report = _judge(swaps)
    assert report["decision"] == "accepted", report["reason"]
    assert report["reason"].startswith("no old class shows a loss of recall or a rise of false")
    assert report["recall_after"]["neutral"] == pytest.approx(0.78 - 0.04)
    # The point-estimate rule this gate replaced (no class may lose 2 points) refused this.
    assert max(report["recall_before"][c] - report["recall_after"][c] for c in CLASSES) > 0.02
    assert all(0.04 < t["adjusted_p_value"] <= 1 for t in report["paired"].values())


def test_a_real_loss_hidden_among_swaps_is_still_refused():
    truth, before = _table()
    report = _judge(_candidate(truth, before, lost={"angry": 14}, gained={"angry": 1}))
    assert report["decision"] == "rejected"
    assert report["paired"]["angry"]["refused"]
    assert [k for k, t in report["paired"].items() if t["refused"]] == ["angry"]


def test_small_losses_of_every_class_to_one_label_are_refused_on_its_false_alarms():
    # What corrections that all name 'sad' do: every other class loses a few clips to it, too
    # few for its own recall test, but 'sad' now answers 28 more clips wrongly.
    truth, before = _table()
    poisoned = _candidate(truth, before, lost={c: 4 for c in CLASSES if c != "sad"}, to="sad")
    report = _judge(poisoned)
    assert report["decision"] == "rejected"
    assert not any(t["refused"] for t in report["paired"].values())
    sad = report["false_alarms"]["sad"]
    assert (sad["n"], sad["lost"], sad["gained"], sad["refused"]) == (350, 28, 0, True)
    assert [c for c, t in report["false_alarms"].items() if t["refused"]] == ["sad"]
    assert "it answers 'sad' wrongly on 28 more" in report["reason"]


def test_the_candidate_must_be_at_least_as_good_on_the_held_out_new_feedback():
    truth, before = _table()
    holdout_truth = ["happy"] * 20 + ["sad"] * 20
    active = ["happy"] * 14 + ["sad"] * 6 + ["sad"] * 14 + ["happy"] * 6  # 28 of 40 right

    def worse_by(lost: int, gained: int = 0) -> list[str]:
        after = list(active)
        right = [i for i, (t, a) in enumerate(zip(holdout_truth, active)) if t == a]
        wrong = [i for i, (t, a) in enumerate(zip(holdout_truth, active)) if t != a]
        for i in right[:lost]:
            after[i] = "angry"
        for i in wrong[:gained]:
            after[i] = holdout_truth[i]
        return after

    clearly = _judge(before, (holdout_truth, active, worse_by(9)))
    assert clearly["decision"] == "rejected"
    assert "held-out new feedback it is worse" in clearly["reason"]
    held = clearly["paired"][NEW_FEEDBACK]
    assert (held["n"], held["lost"], held["gained"], held["tolerance"]) == (40, 9, 0, 0.0)
    # Exact McNemar, one-sided: 0.5 ** 9, Holm over the 8 classes twice and this.
    assert held["p_value"] == pytest.approx(0.5 ** 9)
    assert held["adjusted_p_value"] == pytest.approx(17 * 0.5 ** 9)
    assert clearly["new_feedback_accuracy_after"] < clearly["new_feedback_accuracy_before"]

    for after in (worse_by(2), worse_by(4, gained=3), active, worse_by(0, gained=10)):
        report = _judge(before, (holdout_truth, active, after))
        assert report["decision"] == "accepted", report["reason"]


def test_the_report_keeps_every_figure_and_the_test_behind_the_decision():
    truth, before = _table()
    report = _judge(_candidate(truth, before, lost={"sad": 3}, gained={"sad": 1}))
    assert report["decision"] == "accepted"
    assert report["confidence"] == 0.95 and report["alpha"] == pytest.approx(0.05)
    assert "McNemar" in report["test"] and "Holm" in report["test"]
    assert report["hypotheses"] == 2 * len(CLASSES)
    sad = report["paired"]["sad"]
    assert (sad["n"], sad["lost"], sad["gained"]) == (50, 3, 1)
    assert sad["change"] == pytest.approx(-0.04)
    assert report["recall_before"]["sad"] - report["recall_after"]["sad"] == pytest.approx(0.04)
    assert {"macro_f1_before", "macro_f1_after", "gate_set_size", "new_holdout_size",
            "max_recall_drop"} <= set(report)
    assert report["gate_set_size"] == len(CLASSES) * PER_CLASS


def test_the_report_says_whose_clips_a_class_lost_and_a_refusal_names_the_voice_that_paid():
    truth, before = _table()
    # Two speakers per class, alternating; the candidate loses 12 right 'sad' clips and says
    # 'sad' on 30 more clips of other classes (the first right ones of three classes).
    speakers = [f"speaker-{i % 2}" for i in range(len(truth))]
    after = _candidate(truth, before, lost={"sad": 12})
    for label in ("neutral", "calm", "happy"):
        rows = [i for i, t in enumerate(truth) if t == label and before[i] == label]
        for i in rows[:10]:
            after[i] = "sad"
    report = RegressionGate(0.02, 0.95).judge_answers(
        CLASSES, CLASSES, Answers(truth, before, after, groups=speakers))
    sad = report["paired"]["sad"]
    assert sad["lost_by_group"] == {"speaker-0": 6, "speaker-1": 6}
    assert sum(report["false_alarms"]["sad"]["lost_by_group"].values()) == 30
    assert report["paired"]["happy"]["lost_by_group"] == {"speaker-0": 5, "speaker-1": 5}
    assert report["paired"]["angry"]["lost_by_group"] == {}
    # Split evenly: no one voice is named.
    assert report["decision"] == "rejected" and "of them from" not in report["reason"]

    # The same loss of 'sad' from one speaker's clips: the reason names that speaker.
    one = ["speaker-1" if t == "sad" and before[i] == "sad" and after[i] != "sad" else "other"
           for i, t in enumerate(truth)]
    after = _candidate(truth, before, lost={"sad": 20})
    report = RegressionGate(0.02, 0.95).judge_answers(
        CLASSES, CLASSES, Answers(truth, before, after, groups=one))
    assert report["paired"]["sad"]["lost_by_group"] == {"speaker-1": 12, "other": 8}
    assert "20 of its 50 gate clips lost, 12 of them from speaker-1" in report["reason"]


def test_a_stricter_confidence_or_tolerance_needs_a_larger_loss_to_refuse():
    truth, before = _table()
    table = _candidate(truth, before, lost={"sad": 10})
    assert _judge(table)["decision"] == "rejected"
    assert _judge(table, gate=RegressionGate(0.02, 0.99))["decision"] == "accepted"
    assert _judge(table, gate=RegressionGate(0.10, 0.95))["decision"] == "accepted"
    strict = _judge(before, gate=RegressionGate(0.0, 0.95))["paired"]["sad"]
    # Exact McNemar over 16 hypotheses: 16 * 0.5 ** 9 <= 0.05 < 16 * 0.5 ** 8.
    assert strict["detectable_loss_clips"] == 9


def test_an_empty_gate_set_refuses():
    report = RegressionGate().judge_answers(CLASSES, CLASSES, Answers([], [], []))
    assert report["decision"] == "rejected" and "gate set is empty" in report["reason"]


def test_holm_adjusts_step_down():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    assert adjusted == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5})


# The signal test: the held-out feedback of a round, 20 clips of 5 labels (what 100 corrections
# hold out), and the candidate's answers on it.
HELD = [label for label in CLASSES[2:7] for _ in range(4)]
SHIFT = {label: CLASSES[2:7][(i + 1) % 5] for i, label in enumerate(CLASSES[2:7])}


def _answers_right_on(k: int, truth=HELD) -> list[str]:
    """Answers right on k of the clips (spread over the labels), the others shifted one label."""
    rows = sorted(range(len(truth)), key=lambda i: (i % 4, i))[:k]
    return [t if i in rows else SHIFT[t] for i, t in enumerate(truth)]


def _judge_held(truth, active, candidate):
    table, before = _table()
    return _judge(before, (truth, active, candidate))


def test_corrections_that_carry_no_signal_are_refused():
    # Shuffled labels: the candidate answers as the active model did, and both agree with the
    # labels only as often as chance would (4 of 20: 5 labels of 4 clips, answers alike).
    answers = _answers_right_on(4)
    report = _judge_held(HELD, answers, answers)
    signal = report["signal"]
    assert report["decision"] == "rejected"
    assert (signal["n"], signal["agreements"], signal["expected_by_chance"]) == (20, 4, 4.0)
    assert signal["decidable"] and signal["refused"] and signal["p_value"] > 0.5
    assert signal["required_agreements"] == 8
    assert not any(t["refused"] for family in ("paired", "false_alarms")
                   for t in report[family].values())  # nothing was lost
    assert "do not agree with them more than chance would: 4 agree, 4.0" in report["reason"]
    assert "at least 8 were needed" in report["reason"]
    # Not one agreement short of what the margins need either.
    assert _judge_held(HELD, answers, _answers_right_on(7))["decision"] == "rejected"


def test_confirming_and_improving_corrections_are_accepted():
    confirmed = _answers_right_on(20)  # the labels are the model's own answers
    report = _judge_held(HELD, confirmed, confirmed)
    assert report["decision"] == "accepted", report["reason"]
    assert report["signal"]["p_value"] < 1e-9 and report["signal"]["kappa"] == 1.0
    assert "20 of 20 agree with its answers, 4.0 would by chance" in report["reason"]
    # Newcomers: the active model right on 7 (not enough alone), the candidate on 8.
    report = _judge_held(HELD, _answers_right_on(7), _answers_right_on(8))
    assert report["decision"] == "accepted", report["reason"]
    assert report["signal"]["p_value"] == pytest.approx(0.0356, abs=1e-3)
    # The signal test is not in the Holm family: 8 classes twice and the new feedback.
    assert report["hypotheses"] == 2 * len(CLASSES) + 1


def test_a_held_out_set_too_small_to_show_signal_is_not_tested_and_says_so():
    tiny = ["happy", "sad"] * 2  # answering all four right would give p = 1/6
    report = _judge_held(tiny, tiny, tiny)
    assert report["decision"] == "accepted", report["reason"]
    signal = report["signal"]
    assert not signal["decidable"] and not signal["refused"]
    assert signal["best_possible_p_value"] == pytest.approx(1 / 6)
    assert "4 held-out corrections are too few to show signal" in report["reason"]
    # One label held out: no answers could show agreement; the false alarms guard instead.
    assert not _judge_held(["sad"] * 20, ["sad"] * 20, ["sad"] * 20)["signal"]["decidable"]
    # No feedback held out at all.
    assert "was not tested" in _judge_held([], [], [])["reason"]


def test_a_small_round_that_can_show_signal_but_does_not_says_what_it_needed():
    held = ["happy", "sad"] * 3  # 6 clips: all right would give p = 1/20
    report = _judge_held(held, held, ["happy", "sad", "happy", "sad", "happy", "happy"])
    assert report["decision"] == "rejected"
    assert report["signal"]["decidable"] and report["signal"]["required_agreements"] is None
    assert "no count of agreements could show it" in report["reason"]
    assert "so does a round too small to show what it taught" in report["reason"]
    assert _judge_held(held, held, held)["decision"] == "accepted"
