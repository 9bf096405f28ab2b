"""Evaluation reports: per corpus, predictions are restricted to the labels that corpus has
(the usual protocol when corpora's label sets differ); clips whose label the model does not
know are counted as skipped, not as errors."""
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sklearn.metrics import (
    confusion_matrix, precision_recall_fscore_support, roc_auc_score, roc_curve,
)

from learner.corpora import CorpusClip, CorpusError, read_corpora

if TYPE_CHECKING:
    from learner.inference import Prediction

PROTOCOL = (
    "Per corpus, the model's answer is restricted to the emotions that corpus contains "
    "(argmax over those labels only); clips whose emotion the model does not know are skipped."
)


@dataclass(frozen=True)
class Outcome:
    corpus: str
    truth: str
    predicted: str
    # The model's probability for each label it was allowed to answer (its corpus's labels).
    probabilities: dict[str, float] = field(default_factory=dict)


def allowed_labels_by_corpus(clips: Sequence[CorpusClip], known: Sequence[str]) -> dict[str, tuple[str, ...]]:
    present = defaultdict(set)
    for clip in clips:
        present[clip.corpus].add(clip.emotion)
    return {corpus: tuple(l for l in known if l in labels) for corpus, labels in present.items()}


def predict_clips(
    clips: Sequence[CorpusClip], known: Sequence[str],
    predict: Callable[[CorpusClip, tuple[str, ...]], "Prediction"],
) -> tuple[list[Outcome], int]:
    """`predict(clip, allowed_labels) -> Prediction`. Returns the outcomes and the skipped count."""
    allowed = allowed_labels_by_corpus(clips, known)
    outcomes, skipped = [], 0
    for clip in clips:
        if clip.emotion not in known:
            skipped += 1
            continue
        answer = predict(clip, allowed[clip.corpus])
        outcomes.append(Outcome(clip.corpus, clip.emotion, answer.emotion,
                                {l: answer.probabilities[l] for l in allowed[clip.corpus]}))
    return outcomes, skipped


def _summary(outcomes: Sequence[Outcome], labels: Sequence[str]) -> dict:
    truth = [o.truth for o in outcomes]
    predicted = [o.predicted for o in outcomes]
    present = [l for l in labels if l in set(truth)]
    _, recall, f1, _ = precision_recall_fscore_support(
        truth, predicted, labels=present, zero_division=0
    )
    return {
        "accuracy": float(np.mean([t == p for t, p in zip(truth, predicted)])) if truth else 0.0,
        "macro_f1": float(np.mean(f1)) if present else 0.0,
        "unweighted_accuracy": float(np.mean(recall)) if present else 0.0,
        "n": len(truth),
    }


def _one_vs_rest(outcomes: Sequence[Outcome], label: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Truth (is it `label`?) and P(label) over the clips that could be answered `label`: a clip
    of a corpus without that emotion is no negative, its restricted P(label) is a forced 0.
    None where either side is empty, as no curve exists then."""
    scored = [o for o in outcomes if label in o.probabilities]
    truth = np.array([o.truth == label for o in scored])
    if truth.all() or not truth.any():
        return None
    return truth, np.array([o.probabilities[label] for o in scored])


def _roc_auc(outcomes: Sequence[Outcome], labels: Sequence[str]) -> dict:
    per_class = {}
    for label in labels:
        pair = _one_vs_rest(outcomes, label)
        per_class[label] = float(roc_auc_score(*pair)) if pair else None
    known = [auc for auc in per_class.values() if auc is not None]
    return {"per_class": per_class, "macro": float(np.mean(known)) if known else None}


def build_report(outcomes: Sequence[Outcome], skipped: int, labels: Sequence[str]) -> dict:
    truth = [o.truth for o in outcomes]
    predicted = [o.predicted for o in outcomes]
    present = [l for l in labels if l in set(truth) | set(predicted)]
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=present, zero_division=0
    )
    by_corpus = defaultdict(list)
    for o in outcomes:
        by_corpus[o.corpus].append(o)
    return {
        **_summary(outcomes, labels),
        "skipped": skipped,
        "protocol": PROTOCOL,
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(present, precision, recall, f1, support)
        },
        "per_corpus": {c: _summary(o, labels) for c, o in sorted(by_corpus.items())},
        "confusion": {
            "labels": present,
            "matrix": confusion_matrix(truth, predicted, labels=present).tolist() if truth else [],
        },
        "roc_auc": _roc_auc(outcomes, labels),
    }


def write_report(report: dict, outcomes: Sequence[Outcome], report_dir: Path, title: str) -> None:
    """report.md, confusion.png and roc.png (curves drawn from `outcomes`) in `report_dir`."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    _plot_confusion(report["confusion"], report_dir / "confusion.png", title)
    _plot_roc(outcomes, report["roc_auc"]["per_class"], report_dir / "roc.png", title)
    auc = report["roc_auc"]
    lines = [
        f"# {title}", "", PROTOCOL, "",
        f"- clips: {report['n']} (skipped: {report['skipped']})",
        f"- accuracy: {report['accuracy']:.3f}",
        f"- unweighted accuracy (mean recall): {report['unweighted_accuracy']:.3f}",
        f"- macro-F1: {report['macro_f1']:.3f}",
        f"- ROC AUC, each emotion against the rest (macro): {_number(auc['macro'])}", "",
        "| corpus | n | accuracy | unweighted accuracy | macro-F1 |", "|---|---|---|---|---|",
    ]
    for corpus, s in report["per_corpus"].items():
        lines.append(f"| {corpus} | {s['n']} | {s['accuracy']:.3f} | "
                     f"{s['unweighted_accuracy']:.3f} | {s['macro_f1']:.3f} |")
    lines += ["", "| emotion | precision | recall | F1 | support | ROC AUC |",
              "|---|---|---|---|---|---|"]
    for label, s in report["per_class"].items():
        lines.append(f"| {label} | {s['precision']:.3f} | {s['recall']:.3f} | "
                     f"{s['f1']:.3f} | {s['support']} | {_number(auc['per_class'].get(label))} |")
    lines += ["", "ROC AUC: P(emotion) against the rest, over the corpora that have the emotion; "
              "none where the set lacks clips of it or of the others.", "",
              "![confusion matrix](confusion.png) ![ROC curves](roc.png)", ""]
    (report_dir / "report.md").write_text("\n".join(lines))


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def _plot_confusion(confusion: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    labels, matrix = confusion["labels"], np.array(confusion["matrix"] or [[0]])
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(labels), 0.8 + 0.7 * len(labels)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_roc(outcomes: Sequence[Outcome], aucs: dict[str, float | None], path: Path,
              title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.4, 5.4))
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="0.6", label="chance  AUC 0.50")
    colors = plt.get_cmap("tab10")  # by the label's place in the model, so stable across reports
    for i, (label, auc) in enumerate(aucs.items()):
        if auc is None:
            continue
        truth, scores = _one_vs_rest(outcomes, label)
        fpr, tpr, _ = roc_curve(truth, scores)
        ax.plot(fpr, tpr, lw=2, color=colors(i % 10),
                label=f"{label}  AUC {auc:.2f}  ({truth.sum()} of {truth.size} clips)")
    if none := [label for label, auc in aucs.items() if auc is None]:
        ax.plot([], [], " ", label="no curve (no clips of it, or\nnone of the others): "
                + ", ".join(none))
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal",
           xlabel="false positive rate", ylabel="true positive rate (recall)")
    ax.set_title(f"{title}\nROC, each emotion against the rest", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_features(predictor, clips: Sequence[CorpusClip], features: Sequence[np.ndarray]) -> dict:
    """Report for clips whose features are already computed (one array per clip)."""
    return build_report(*feature_outcomes(predictor, clips, features), predictor.labels)


def feature_outcomes(predictor, clips: Sequence[CorpusClip],
                     features: Sequence[np.ndarray]) -> tuple[list[Outcome], int]:
    """Each clip's outcome from its computed features, and how many were skipped."""
    logits = predictor.logits_batch(list(features)) if len(features) else []
    return outcomes_from_logits(clips, predictor.labels, logits)


def outcomes_from_logits(clips: Sequence[CorpusClip], labels: tuple[str, ...],
                         logits: np.ndarray) -> tuple[list[Outcome], int]:
    """Outcomes of clips whose logits (one row per clip, in `labels` order) are computed."""
    from learner.inference import prediction_from_logits

    row = {id(c): i for i, c in enumerate(clips)}
    return predict_clips(
        clips, labels,
        lambda clip, allowed: prediction_from_logits(logits[row[id(clip)]], labels, allowed),
    )


def clip_features(paths: list[str], *, kind: str, workers: int = 2,
                  progress: bool = False) -> list[np.ndarray | None]:
    """Each clip's features as the service computes them for a model of `kind` (whole clip, no
    augmentation), in `workers` processes of one thread each; None for a clip that does not
    decode."""
    from functools import partial
    from multiprocessing import get_context

    from tqdm import tqdm

    from learner.inference import limit_threads

    bar = dict(total=len(paths), desc="features", unit="clip", disable=not progress)
    with get_context("spawn").Pool(workers, initializer=limit_threads, initargs=(1,)) as pool:
        return list(tqdm(pool.imap(partial(_clean_features, kind=kind), paths, chunksize=8),
                         **bar))


def _clean_features(path: str, kind: str) -> np.ndarray | None:
    from learner.audio import AudioError, decode_audio
    from learner.checkpoint import features_for

    try:
        return features_for(kind)(decode_audio(path, max_seconds=60.0))
    except AudioError:
        return None


def evaluate_folder(data_dir: Path, model_path: Path | None = None, *,
                    encoder_path: Path | None = None, report_dir: Path | None = None,
                    speakers: list[str] | None = None, workers: int = 2,
                    progress: bool = True) -> dict:
    """Evaluate a model (default: the bundled one) on every corpus under `data_dir`, or on the
    named speakers only; with `encoder_path`, its downstream on that encoder file instead of the
    one it names (checkpoint.with_encoder). The model answers in the form the service runs it
    (learner.serving_net.for_serving), so the figures are the served model's."""
    from learner.checkpoint import load_default_model, load_model, with_encoder
    from learner.inference import EmotionPredictor
    from learner.serving_net import for_serving

    model = load_model(model_path) if model_path else load_default_model()
    predictor = EmotionPredictor(for_serving(with_encoder(model, encoder_path) if encoder_path
                                             else model))
    clips = read_corpora(data_dir)
    if speakers:
        clips = [c for c in clips if c.speaker in set(speakers)]
        if missing := set(speakers) - {c.speaker for c in clips}:
            raise CorpusError(f"no clips of speakers {sorted(missing)} in {data_dir}")
    features = clip_features([str(c.path) for c in clips], kind=predictor.model.kind,
                             workers=workers, progress=progress)
    readable = [(c, f) for c, f in zip(clips, features) if f is not None]
    outcomes, skipped = feature_outcomes(predictor, [c for c, _ in readable],
                                         [f for _, f in readable])
    report = build_report(outcomes, skipped + len(clips) - len(readable), predictor.labels)
    report["unreadable"] = len(clips) - len(readable)
    report["model_sha256"] = predictor.model.sha256
    if (encoder_sha256 := getattr(predictor.model.net, "encoder_sha256", None)) is not None:
        report["encoder_sha256"] = encoder_sha256
    if report_dir is not None:
        write_report(report, outcomes, report_dir, f"emoloop evaluation on {Path(data_dir).name}")
    return report
