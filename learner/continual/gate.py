"""The regression gate: a candidate replaces the active model unless the evidence says it lost
what that model knew, or does worse on the new feedback it was not trained on; and only if its
answers on that feedback show the corrections carry something it can learn.

Both models answer the same clips, so the gate compares them clip by clip (paired). For one
group of clips (an old class on the gate set, or the held-out share of this round's feedback) a
clip is *lost* when the active model answers it right and the candidate wrong, *gained* the
other way round; clips both answer alike say nothing about the difference. Given the m clips on
which the two disagree (the discordant pairs), the number lost is Binomial(m, pi). The gate tests

    H0: the candidate's expected net loss on those m clips, m * (2 pi - 1), is at most
        `tolerance` * n clips (n: the group's clips), i.e. pi <= 1/2 + tolerance * n / (2 m)

one-sided with the exact binomial tail, P(Binomial(m, pi0) >= lost). With a tolerance of 0 this
is the exact McNemar test. Each old class is tested twice with `max_recall_drop` as the tolerance
(what a class may lose as the price of learning): on its recall (its own clips, right when
answered with it) and on its false alarms (the other old classes' clips, right when NOT answered
with it; corrections that all name one label spread a small recall loss over every other class
but pile the false alarms on one). The held-out new feedback is tested with tolerance 0 (the
candidate must be at least as good there). The p-values of all these hypotheses together are
Holm-adjusted, so the chance that a candidate which truly keeps every class is refused for any
of them is at most 1 - `confidence`. The gate refuses when an adjusted p-value is at most
1 - `confidence`: the evidence then says (at that confidence) that a class lost more than the
tolerance, or that the candidate is worse on the new feedback.

The burden of proof is on the refusal for a loss: a loss the gate set is too small to show
passes. It is on the acceptance for what the round taught: the candidate's answers on the
held-out feedback must agree with its labels more than chance would if the labels were
independent of the answers (learner.continual.agreement: exact permutation test, margins
fixed, one-sided, at alpha = 1 - `confidence`, on its own: it guards against accepting noise,
an error the loss tests' Holm family does not count). Corrections that carry nothing learnable
(labels shuffled among the clips, one label for every clip) fail it; corrections that confirm
the model's answers, or teach voices it half knows, pass. Where the held-out labels are so few
that even answers agreeing with every one would not be significant (prod(count_l!) / n! >
alpha: fewer than 6 clips of two labels, say) no model could pass it, so it is not applied and
the report says so (`signal`: `decidable` false). The report says how small a loss the gate
set can see: per class, the fewest clips a candidate could lose with no gain (and the recall
that is) and still be refused, and where each old class's lost clips are (`lost_by_group`: a
shipped gate clip's speaker, or `feedback`), so a refusal says whether one voice or many pay for
the round. Every point figure (recall and macro-F1 per model, new-feedback accuracy) stays in
the report. Old classes are the labels the active model knows; labels it
does not know are new classes: reported, not guarded. Answers are the models' unrestricted
argmax, as the service gives them. The report's shape is shared with the dashboard (see the
README's "Learner" section).
"""
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from learner.continual.agreement import (Agreement, agreement_p_value, best_p_value,
                                         required_agreements)
from learner.continual.replay import Sample
from learner.inference import EmotionPredictor, logits_batches

TEST_NAME = ("one-sided exact conditional McNemar test (binomial on the discordant pairs) of "
             "'net loss <= tolerance', per old class on its recall and on its false alarms and "
             "on the new feedback, Holm-adjusted over all of them")
SIGNAL_TEST = ("one-sided exact permutation test (margins fixed) that the candidate's answers "
               "on the held-out feedback agree with its labels more than chance; not in the "
               "Holm family: a round must pass it to be accepted")
NEW_FEEDBACK = "new feedback (held out)"


@dataclass(frozen=True)
class PairedCounts:
    """One group of clips both models answered: how many, and how many each alone got right."""
    n: int
    lost: int  # right before, wrong after
    gained: int  # wrong before, right after
    # Whose the lost clips are, most first (None: not asked; empty: no clip was named).
    lost_by_group: dict[str, int] | None = None

    @classmethod
    def of(cls, truth: Sequence[str], before: Sequence[str], after: Sequence[str],
           groups: Sequence[str] | None = None):
        """`groups`: whose each clip is (Answers.groups), to count the lost ones by."""
        right_before = np.array([t == b for t, b in zip(truth, before)], dtype=bool)
        right_after = np.array([t == a for t, a in zip(truth, after)], dtype=bool)
        lost = right_before & ~right_after
        by_group = None
        if groups is not None:
            named = Counter(g or "(unnamed)" for g, was_lost in zip(groups, lost) if was_lost)
            by_group = dict(sorted(named.items(), key=lambda item: (-item[1], item[0])))
        return cls(len(truth), int(np.sum(lost)), int(np.sum(~right_before & right_after)),
                   by_group)


def loss_p_value(counts: PairedCounts, tolerance: float) -> float:
    """The one-sided p-value of H0 'expected net loss <= tolerance * n clips', given the
    discordant pairs: P(Binomial(m, pi0) >= lost), pi0 = 1/2 + tolerance * n / (2 m)."""
    from scipy.stats import binom  # imported when a round judges, not when the service starts

    discordant = counts.lost + counts.gained
    if discordant == 0 or counts.lost == 0:
        return 1.0
    pi0 = min(1.0, 0.5 + tolerance * counts.n / (2 * discordant))
    return float(binom.sf(counts.lost - 1, discordant, pi0))


def holm(p_values: dict) -> dict:
    """Holm's step-down adjusted p-values: refusing where one is <= alpha keeps the chance of
    any false refusal among all of them at most alpha."""
    order = sorted(p_values, key=lambda key: p_values[key])
    adjusted, running = {}, 0.0
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[key]))
        adjusted[key] = running
    return adjusted


def detectable_loss(n: int, tolerance: float, alpha: float) -> int | None:
    """The fewest clips of n a candidate could lose (gaining none) and be refused at `alpha`.
    With this the only loss among k tests, Holm's first step compares with alpha / k: the
    caller passes that. None if not even losing all n would be."""
    for lost in range(1, n + 1):
        if loss_p_value(PairedCounts(n, lost, 0), tolerance) <= alpha:
            return lost
    return None


@dataclass(frozen=True)
class Answers:
    """What both models answered: the gate set's clips of old classes, and the held-out new
    feedback (truth, the active model's answers, the candidate's)."""
    truth: list[str]
    before: list[str]
    after: list[str]
    holdout_truth: list[str] = field(default_factory=list)
    holdout_before: list[str] = field(default_factory=list)
    holdout_after: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # whose each gate clip is (Sample.group)

    @classmethod
    def of(cls, active: EmotionPredictor, candidate: EmotionPredictor,
           gate_set: Sequence[Sample], new_holdout: Sequence[Sample],
           memo: dict | None = None) -> "Answers":
        """`memo`: encoder states kept for another candidate on the same clips
        (learner.inference.logits_batches)."""
        gate = [s for s in gate_set if s.label in active.labels]
        before, after = _answers(active, candidate, gate, memo)
        holdout_before, holdout_after = _answers(active, candidate, new_holdout, memo)
        return cls([s.label for s in gate], before, after, [s.label for s in new_holdout],
                   holdout_before, holdout_after, [s.group for s in gate])


class RegressionGate:
    def __init__(self, max_recall_drop: float = 0.02, confidence: float = 0.95):
        self.max_recall_drop = max_recall_drop  # the tolerance of the old classes' tests
        self.confidence = confidence

    def judge(self, active: EmotionPredictor, candidate: EmotionPredictor,
              gate_set: Sequence[Sample], new_holdout: Sequence[Sample], *,
              scope: str = "global", user_id: str | None = None,
              memo: dict | None = None) -> dict:
        """The gate report on two models (decision, reason, every figure and the tests)."""
        return self.judge_answers(list(active.labels), list(candidate.labels),
                                  Answers.of(active, candidate, gate_set, new_holdout, memo),
                                  scope=scope, user_id=user_id)

    def judge_answers(self, old: list[str], labels: list[str], answers: Answers, *,
                      scope: str = "global", user_id: str | None = None) -> dict:
        """The gate report on what the models answered: `old` the active model's labels,
        `labels` the candidate's."""
        report = self.figures(old, labels, answers, scope=scope, user_id=user_id)
        report.update(self.tests(answers))
        failure = self._failure(report)
        report["decision"] = "rejected" if failure else "accepted"
        report["reason"] = failure or _acceptance(report)
        return report

    def figures(self, old: list[str], labels: list[str], answers: Answers, *,
                scope: str = "global", user_id: str | None = None) -> dict:
        """Every point figure of both models (the decision still open)."""
        a = answers
        present = [label for label in old if label in a.truth]
        return {
            "decision": "accepted", "reason": "", "scope": scope, "user_id": user_id,
            "old_classes": old, "new_classes": [label for label in labels if label not in old],
            "max_recall_drop": self.max_recall_drop,
            "recall_before": _recalls(a.truth, a.before, present),
            "recall_after": _recalls(a.truth, a.after, present),
            "macro_f1_before": _macro_f1(a.truth, a.before, present),
            "macro_f1_after": _macro_f1(a.truth, a.after, present),
            "new_feedback_accuracy_before": _accuracy(a.holdout_truth, a.holdout_before),
            "new_feedback_accuracy_after": _accuracy(a.holdout_truth, a.holdout_after),
            "gate_set_size": len(a.truth), "new_holdout_size": len(a.holdout_truth),
        }

    def tests(self, answers: Answers) -> dict:
        """The paired tests: per old class on the gate set, its recall and its false alarms,
        and on the held-out new feedback; Holm over all of them. And, on its own, the signal
        test of the candidate's answers on the held-out feedback."""
        a, alpha = answers, round(1.0 - self.confidence, 12)  # 0.05, not 0.050000000000000044
        classes = sorted(set(a.truth), key=a.truth.index)
        # Whose each gate clip is, when the clips say (answers built from Samples do).
        named = len(a.groups) == len(a.truth) and any(a.groups)
        hypotheses: dict[tuple[str, str], tuple[PairedCounts, float]] = {}
        for label in classes:
            rows = [i for i, t in enumerate(a.truth) if t == label]
            hypotheses[("paired", label)] = (PairedCounts.of(
                [label] * len(rows), [a.before[i] for i in rows], [a.after[i] for i in rows],
                [a.groups[i] for i in rows] if named else []), self.max_recall_drop)
            # Its false alarms: the clips of the other old classes, 'right' when not called
            # `label`. Corrections that all name one label raise these far more than they
            # lower any one class's recall.
            others = [i for i, t in enumerate(a.truth) if t != label]
            hypotheses[("false_alarms", label)] = (PairedCounts.of(
                [_OTHER] * len(others), [_other(a.before[i], label) for i in others],
                [_other(a.after[i], label) for i in others],
                [a.groups[i] for i in others] if named else []), self.max_recall_drop)
        if a.holdout_truth:
            hypotheses[("paired", NEW_FEEDBACK)] = (PairedCounts.of(
                a.holdout_truth, a.holdout_before, a.holdout_after), 0.0)
        p_values = {key: loss_p_value(counts, tol) for key, (counts, tol) in hypotheses.items()}
        adjusted = holm(p_values)
        first_step = alpha / max(1, len(hypotheses))
        out = {"test": TEST_NAME, "confidence": self.confidence, "alpha": alpha,
               "hypotheses": len(hypotheses), "paired": {}, "false_alarms": {}}
        for (family, key), (counts, tolerance) in hypotheses.items():
            smallest = detectable_loss(counts.n, tolerance, first_step)
            out[family][key] = {
                "n": counts.n, "lost": counts.lost, "gained": counts.gained,
                "change": (counts.gained - counts.lost) / counts.n if counts.n else 0.0,
                "tolerance": tolerance, "p_value": p_values[(family, key)],
                "adjusted_p_value": adjusted[(family, key)],
                "refused": adjusted[(family, key)] <= alpha,
                "detectable_loss_clips": smallest,
                "detectable_loss": None if smallest is None else smallest / counts.n}
            if counts.lost_by_group is not None:
                out[family][key]["lost_by_group"] = counts.lost_by_group
        out["signal"] = signal_test(a.holdout_truth, a.holdout_after, alpha)
        return out

    def _failure(self, r: dict) -> str | None:
        if not r["gate_set_size"]:
            return "the gate set is empty: nothing shows the candidate keeps the old classes"
        refused = [(family, k, t) for family in ("paired", "false_alarms")
                   for k, t in r[family].items() if t["refused"]]
        if not refused:
            return _no_signal(r["signal"]) if r["signal"]["refused"] else None
        family, key, t = min(refused, key=lambda item: item[2]["adjusted_p_value"])
        if family == "false_alarms":
            return (f"it answers '{key}' wrongly on {t['lost']} more of the other old classes' "
                    f"{t['n']} gate clips{_most_from(t)} ({t['gained']} fewer elsewhere): more "
                    f"than {t['tolerance']:.3f} of them at {r['confidence']:.0%} confidence "
                    f"(adjusted p = {t['adjusted_p_value']:.2g}): it learnt to say '{key}' where "
                    f"the active model rightly did not")
        if key == NEW_FEEDBACK:
            return (f"on the held-out new feedback it is worse than the active model: "
                    f"{t['lost']} of {t['n']} clips lost, {t['gained']} gained (accuracy "
                    f"{r['new_feedback_accuracy_before']:.3f} -> "
                    f"{r['new_feedback_accuracy_after']:.3f}; adjusted p = "
                    f"{t['adjusted_p_value']:.2g} <= {r['alpha']:.2g})")
        return (f"old class '{key}' lost more than {t['tolerance']:.3f} of recall at "
                f"{r['confidence']:.0%} confidence: {t['lost']} of its {t['n']} gate clips lost"
                f"{_most_from(t)}, {t['gained']} gained (recall {r['recall_before'][key]:.3f} -> "
                f"{r['recall_after'][key]:.3f}; adjusted p = {t['adjusted_p_value']:.2g})")


def signal_test(truth: list[str], answers: list[str], alpha: float) -> dict:
    """The `signal` part of the report: do the candidate's answers on the held-out feedback
    agree with its labels beyond chance (learner.continual.agreement)? Refused when the test
    could show it (`decidable`) and did not."""
    agreement = Agreement.of(truth, answers)
    best = best_p_value(truth)
    decidable = best <= alpha
    p = agreement_p_value(truth, answers)
    return {"test": SIGNAL_TEST, "n": agreement.n, "agreements": agreement.agreements,
            "expected_by_chance": agreement.expected,  # the agreements: new_feedback_accuracy_after
            "chance_agreement": agreement.expected / agreement.n if agreement.n else None,
            "kappa": agreement.kappa, "p_value": p, "alpha": alpha,
            "best_possible_p_value": best, "decidable": decidable,
            "required_agreements": required_agreements(truth, answers, alpha),
            "refused": decidable and p > alpha}


def _no_signal(s: dict) -> str:
    needed = ("no count of agreements could show it with the answers it gave"
              if s["required_agreements"] is None else
              f"at least {s['required_agreements']} were needed")
    return (f"its answers on the {s['n']} held-out corrections do not agree with them more "
            f"than chance would: {s['agreements']} agree, {s['expected_by_chance']:.1f} would by "
            f"chance (labels independent of its answers; exact permutation p = "
            f"{s['p_value']:.2g} > {s['alpha']:.2g}; {needed}). Corrections that carry "
            f"nothing learnable look like this (labels shuffled or arbitrary); so does a round "
            f"too small to show what it taught: more corrections can")


def _signal_part(s: dict) -> str:
    if not s["n"]:
        return "no new feedback was held out: whether it carries signal was not tested"
    if not s["decidable"]:
        return (f"the {s['n']} held-out corrections are too few to show signal (answers "
                f"agreeing with all of them would give p = {s['best_possible_p_value']:.2g} > "
                f"{s['alpha']:.2g}): not tested")
    return (f"held-out corrections: {s['agreements']} of {s['n']} agree with its answers, "
            f"{s['expected_by_chance']:.1f} would by chance (p = {s['p_value']:.2g})")


_OTHER = "(another class)"


def _most_from(t: dict) -> str:
    """', n of them from X' when one group holds more than half of a test's lost clips."""
    where = t.get("lost_by_group") or {}
    if not where:
        return ""
    group, n = next(iter(where.items()))
    return f", {n} of them from {group}" if 2 * n > t["lost"] else ""


def _other(answer: str, label: str) -> str:
    return label if answer == label else _OTHER


def _acceptance(r: dict) -> str:
    tested = [(f"'{k}' recall", t) for k, t in r["paired"].items() if k != NEW_FEEDBACK]
    tested += [(f"'{k}' false alarms", t) for k, t in r["false_alarms"].items()]
    closest, t = min(tested, key=lambda item: item[1]["adjusted_p_value"])
    parts = [f"no old class shows a loss of recall or a rise of false alarms beyond "
             f"{r['max_recall_drop']:.3f} at {r['confidence']:.0%} confidence (closest: "
             f"{closest}, {t['lost']} lost, {t['gained']} gained of {t['n']}, adjusted p = "
             f"{t['adjusted_p_value']:.2g})",
             f"macro-F1 {r['macro_f1_before']:.3f} -> {r['macro_f1_after']:.3f}"]
    if r["new_feedback_accuracy_after"] is not None:
        parts.append(f"new-feedback accuracy {r['new_feedback_accuracy_before']:.3f} -> "
                     f"{r['new_feedback_accuracy_after']:.3f}")
    parts.append(_signal_part(r["signal"]))
    return "; ".join(parts)


def _answers(active: EmotionPredictor, candidate: EmotionPredictor, samples: Sequence[Sample],
             memo: dict | None) -> tuple[list[str], list[str]]:
    """Both models' answers on the same clips; models on one encoder share its states."""
    if not samples:
        return [], []
    before, after = logits_batches([active, candidate], [s.features for s in samples],
                                   memo=memo)
    return ([active.labels[i] for i in before.argmax(axis=1)],
            [candidate.labels[i] for i in after.argmax(axis=1)])


def _recalls(truth: list[str], answers: list[str], labels: list[str]) -> dict[str, float]:
    # scikit-learn takes 1.5 s to import: here it is paid by the round's thread, not by the
    # admin request that starts the round (which imports the learner).
    from sklearn.metrics import precision_recall_fscore_support

    if not labels:
        return {}
    _, recall, _, _ = precision_recall_fscore_support(truth, answers, labels=labels,
                                                      zero_division=0)
    return {label: float(r) for label, r in zip(labels, recall)}


def _macro_f1(truth: list[str], answers: list[str], labels: list[str]) -> float:
    from sklearn.metrics import precision_recall_fscore_support

    if not labels:
        return 0.0
    _, _, f1, _ = precision_recall_fscore_support(truth, answers, labels=labels, zero_division=0)
    return float(np.mean(f1))


def _accuracy(truth: list[str], answers: list[str]) -> float | None:
    if not truth:
        return None
    return float(np.mean([t == a for t, a in zip(truth, answers)]))
