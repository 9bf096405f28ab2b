"""Evaluation reports: per corpus, predictions are restricted to the labels that corpus has
(the usual protocol when corpora's label sets differ); clips whose label the model does not
know are counted as skipped, not as errors."""
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from learner.corpora import CorpusClip, CorpusError, read_corpora

PROTOCOL = (
    "Per corpus, the model's answer is restricted to the emotions that corpus contains "
    "(argmax over those labels only); clips whose emotion the model does not know are skipped."
)


@dataclass(frozen=True)
class Outcome:
    corpus: str
    truth: str
    predicted: str


def allowed_labels_by_corpus(clips: Sequence[CorpusClip], known: Sequence[str]) -> dict[str, tuple[str, ...]]:
    present = defaultdict(set)
    for clip in clips:
        present[clip.corpus].add(clip.emotion)
    return {corpus: tuple(l for l in known if l in labels) for corpus, labels in present.items()}


def predict_clips(
    clips: Sequence[CorpusClip], known: Sequence[str],
    predict: Callable[[CorpusClip, tuple[str, ...]], str],
) -> tuple[list[Outcome], int]:
    """`predict(clip, allowed_labels) -> label`. Returns the outcomes and the skipped count."""
    allowed = allowed_labels_by_corpus(clips, known)
    outcomes, skipped = [], 0
    for clip in clips:
        if clip.emotion not in known:
            skipped += 1
            continue
        outcomes.append(Outcome(clip.corpus, clip.emotion, predict(clip, allowed[clip.corpus])))
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
    }


def write_report(report: dict, report_dir: Path, title: str) -> None:
    """report.md and confusion.png in `report_dir`."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    _plot_confusion(report["confusion"], report_dir / "confusion.png", title)
    lines = [
        f"# {title}", "", PROTOCOL, "",
        f"- clips: {report['n']} (skipped: {report['skipped']})",
        f"- accuracy: {report['accuracy']:.3f}",
        f"- unweighted accuracy (mean recall): {report['unweighted_accuracy']:.3f}",
        f"- macro-F1: {report['macro_f1']:.3f}", "",
        "| corpus | n | accuracy | unweighted accuracy | macro-F1 |", "|---|---|---|---|---|",
    ]
    for corpus, s in report["per_corpus"].items():
        lines.append(f"| {corpus} | {s['n']} | {s['accuracy']:.3f} | "
                     f"{s['unweighted_accuracy']:.3f} | {s['macro_f1']:.3f} |")
    lines += ["", "| emotion | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for label, s in report["per_class"].items():
        lines.append(f"| {label} | {s['precision']:.3f} | {s['recall']:.3f} | "
                     f"{s['f1']:.3f} | {s['support']} |")
    lines += ["", "![confusion matrix](confusion.png)", ""]
    (report_dir / "report.md").write_text("\n".join(lines))


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


def evaluate_features(predictor, clips: Sequence[CorpusClip], features: Sequence[np.ndarray]) -> dict:
    """Report for clips whose features are already computed (one array per clip)."""
    logits = predictor.logits_batch(list(features)) if len(features) else []
    row = {id(c): i for i, c in enumerate(clips)}
    outcomes, skipped = predict_clips(
        clips, predictor.labels,
        lambda clip, allowed: predictor.predict_logits(logits[row[id(clip)]], allowed).emotion,
    )
    return build_report(outcomes, skipped, predictor.labels)


def clip_features(paths: list[str], *, workers: int = 2,
                  progress: bool = False) -> list[np.ndarray | None]:
    """Each clip's features as the service computes them (whole clip, no augmentation), in
    `workers` processes of one thread each; None for a clip that does not decode."""
    from multiprocessing import get_context

    from tqdm import tqdm

    from learner.inference import limit_threads

    bar = dict(total=len(paths), desc="features", unit="clip", disable=not progress)
    with get_context("spawn").Pool(workers, initializer=limit_threads, initargs=(1,)) as pool:
        return list(tqdm(pool.imap(_clean_features, paths, chunksize=8), **bar))


def _clean_features(path: str) -> np.ndarray | None:
    from learner.audio import AudioError, decode_audio
    from learner.features import extract_features

    try:
        return extract_features(decode_audio(path, max_seconds=60.0))
    except AudioError:
        return None


def evaluate_folder(data_dir: Path, model_path: Path | None = None, *,
                    report_dir: Path | None = None, speakers: list[str] | None = None,
                    workers: int = 2, progress: bool = True) -> dict:
    """Evaluate a model (default: the bundled one) on every corpus under `data_dir`, or on the
    named speakers only."""
    from learner.checkpoint import load_default_model, load_model
    from learner.inference import EmotionPredictor

    predictor = EmotionPredictor(load_model(model_path) if model_path else load_default_model())
    clips = read_corpora(data_dir)
    if speakers:
        clips = [c for c in clips if c.speaker in set(speakers)]
        if missing := set(speakers) - {c.speaker for c in clips}:
            raise CorpusError(f"no clips of speakers {sorted(missing)} in {data_dir}")
    features = clip_features([str(c.path) for c in clips], workers=workers, progress=progress)
    readable = [(c, f) for c, f in zip(clips, features) if f is not None]
    report = evaluate_features(predictor, [c for c, _ in readable], [f for _, f in readable])
    report["skipped"] += len(clips) - len(readable)
    report["unreadable"] = len(clips) - len(readable)
    report["model_sha256"] = predictor.model.sha256
    if report_dir is not None:
        write_report(report, report_dir, f"emoloop evaluation on {Path(data_dir).name}")
    return report
