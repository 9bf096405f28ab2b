"""The regression gate: a candidate replaces the active model only if it keeps what that model
knew and does at least as well on the new feedback it was not trained on.

Old classes are the labels the active model knows. On the gate set (the base gate set shipped
beside the default model, plus feedback that earlier accepted rounds held out) the candidate
passes only if
  1. no old class loses more than `max_recall_drop` of recall,
  2. macro-F1 over the old classes does not fall (by more than `max_macro_f1_drop`, default
     0.005: one clip trading places between two classes moves it by about 0.003 on the shipped
     gate set, which is noise, not forgetting), and
  3. on the held-out share of this round's feedback its accuracy is at least the active model's.
Labels the active model does not know are new classes: reported, not guarded. Answers are the
model's unrestricted argmax, as the service gives them. The report's shape is shared with the
dashboard (see the README's "Learner" section).
"""
from collections.abc import Sequence

import numpy as np

from learner.inference import EmotionPredictor
from learner.replay import Sample

# Figures are compared after rounding away float noise: equal means equal.
_EPS = 1e-9


class RegressionGate:
    def __init__(self, max_recall_drop: float = 0.02, max_macro_f1_drop: float = 0.005):
        self.max_recall_drop = max_recall_drop
        self.max_macro_f1_drop = max_macro_f1_drop

    def judge(self, active: EmotionPredictor, candidate: EmotionPredictor,
              gate_set: Sequence[Sample], new_holdout: Sequence[Sample], *,
              scope: str = "global", user_id: str | None = None) -> dict:
        """The gate report (decision, reason and every figure behind them)."""
        old = [label for label in active.labels]
        new = [label for label in candidate.labels if label not in old]
        gate = [s for s in gate_set if s.label in old]
        truth = [s.label for s in gate]
        before, after = _answers(active, gate), _answers(candidate, gate)
        present = [label for label in old if label in truth]
        recall_before = _recalls(truth, before, present)
        recall_after = _recalls(truth, after, present)
        f1_before, f1_after = _macro_f1(truth, before, present), _macro_f1(truth, after, present)
        holdout_truth = [s.label for s in new_holdout]
        acc_before = _accuracy(holdout_truth, _answers(active, new_holdout))
        acc_after = _accuracy(holdout_truth, _answers(candidate, new_holdout))
        report = {
            "decision": "accepted", "reason": "", "scope": scope, "user_id": user_id,
            "old_classes": old, "new_classes": new, "max_recall_drop": self.max_recall_drop,
            "recall_before": recall_before, "recall_after": recall_after,
            "macro_f1_before": f1_before, "macro_f1_after": f1_after,
            "new_feedback_accuracy_before": acc_before, "new_feedback_accuracy_after": acc_after,
            "gate_set_size": len(gate), "new_holdout_size": len(new_holdout),
        }
        failure = self._failure(report)
        report["decision"] = "rejected" if failure else "accepted"
        report["reason"] = failure or _acceptance(report)
        return report

    def _failure(self, r: dict) -> str | None:
        if not r["gate_set_size"]:
            return "the gate set is empty: nothing shows the candidate keeps the old classes"
        drops = {label: r["recall_before"][label] - r["recall_after"][label]
                 for label in r["recall_before"]}
        worst = max(drops, key=lambda label: drops[label])
        if drops[worst] > self.max_recall_drop + _EPS:
            return (f"recall of old class '{worst}' fell from {r['recall_before'][worst]:.3f} to "
                    f"{r['recall_after'][worst]:.3f} on the gate set, more than the allowed "
                    f"{self.max_recall_drop:.3f}")
        if r["macro_f1_after"] < r["macro_f1_before"] - self.max_macro_f1_drop - _EPS:
            return (f"macro-F1 on the gate set fell from {r['macro_f1_before']:.4f} to "
                    f"{r['macro_f1_after']:.4f}, more than the allowed "
                    f"{self.max_macro_f1_drop:.4f}")
        before, after = r["new_feedback_accuracy_before"], r["new_feedback_accuracy_after"]
        if after is not None and after < before - _EPS:
            return (f"on the held-out new feedback it is worse than the active model: accuracy "
                    f"{after:.3f} against {before:.3f}")
        return None


def _acceptance(r: dict) -> str:
    drops = [r["recall_before"][k] - r["recall_after"][k] for k in r["recall_before"]]
    parts = [f"no old class lost more than {r['max_recall_drop']:.3f} recall "
             f"(largest loss {max(0.0, max(drops)):.3f})",
             f"macro-F1 {r['macro_f1_before']:.3f} -> {r['macro_f1_after']:.3f}"]
    if r["new_feedback_accuracy_after"] is None:
        parts.append("no new feedback was held out")
    else:
        parts.append(f"new-feedback accuracy {r['new_feedback_accuracy_before']:.3f} -> "
                     f"{r['new_feedback_accuracy_after']:.3f}")
    return "; ".join(parts)


def _answers(predictor: EmotionPredictor, samples: Sequence[Sample]) -> list[str]:
    if not samples:
        return []
    logits = predictor.logits_batch([s.features for s in samples])
    return [predictor.labels[i] for i in logits.argmax(axis=1)]


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
