"""The linear-probe baseline of the model card: each clip's mean encoder state (one block, or
several side by side) -> standardise -> logistic regression, on the same speaker split and cache
as the trained downstream, C chosen on the validation speakers. It shows what the trained
CNN-BiLSTM adds over the frozen features alone."""
import numpy as np

from learner.evaluation import build_report, outcomes_from_logits
from learner.speech_training import CachedClips

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)


def block_means(data: CachedClips, blocks: tuple[int, ...], variant: int = 0) -> np.ndarray:
    """(clips, len(blocks) * D): each clip's mean state of those blocks (on the clean pass, or
    on perturbed pass `variant`)."""
    cache, rows = data.variants[variant]
    return cache.means[rows][:, list(blocks)].reshape(len(rows), -1)


def block_statistics(data: CachedClips, blocks: tuple[int, ...], variant: int = 0, *,
                     std: bool = False, deltas: bool = False) -> np.ndarray:
    """(clips, k * len(blocks) * D): each clip's mean state of those blocks, then with `std`
    their standard deviations over its frames, then with `deltas` their mean absolute change
    from one frame to the next (zero for a clip of one frame), in the order
    learner.speech_model.SpeechEmotionEnsemble reads them. Deviations and changes come from one
    read of the cached float16 states, which serving computes in float32: a difference far
    below the spread between clips that the probe reads."""
    means = block_means(data, blocks, variant)
    if not (std or deltas):
        return means
    cache, rows = data.variants[variant]
    spreads = []
    for r in rows:
        states = cache.clip(int(r))[list(blocks)].astype(np.float32)  # (blocks, frames, D)
        parts = [states.std(axis=1)] if std else []
        if deltas:
            parts.append(np.abs(np.diff(states, axis=1)).mean(axis=1) if states.shape[1] > 1
                         else np.zeros((states.shape[0], states.shape[2]), np.float32))
        spreads.append(np.concatenate([part.reshape(-1) for part in parts]))
    return np.concatenate([means, np.stack(spreads)], axis=1)


def _report(model, x: np.ndarray, data: CachedClips, labels: tuple[str, ...]) -> dict:
    logits = np.full((len(x), len(labels)), -np.inf, dtype=np.float64)
    logits[:, model.classes_] = model.predict_log_proba(x)
    return build_report(*outcomes_from_logits(data.clips, labels, logits), labels)


def fit_standardised_regression(x: np.ndarray, targets: np.ndarray, c: float):
    """Standardise, then a class-balanced logistic regression (a fitted scikit-learn pipeline):
    the baseline below and the probe a recipe's head reads (learner.speech_training)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000,
                                                               class_weight="balanced"))
    return model.fit(x, targets)


def linear_probe(train: CachedClips, validation: CachedClips, test: CachedClips,
                 labels: tuple[str, ...], blocks: tuple[int, ...]) -> dict:
    """Blocks count from 0. -> {"blocks", "C", "validation": report, "test": report}."""
    x_train, x_val, x_test = (block_means(d, blocks) for d in (train, validation, test))
    best = None
    for c in C_GRID:
        model = fit_standardised_regression(x_train, train.targets, c)
        report = _report(model, x_val, validation, labels)
        if best is None or report["unweighted_accuracy"] > best[1]["unweighted_accuracy"]:
            best = (c, report, model)
    c, val_report, model = best
    return {"blocks": [b + 1 for b in blocks], "C": c, "validation": val_report,
            "test": _report(model, x_test, test, labels)}
