"""Cross-validation over the training speakers: a recipe scored on a hundred voices, not twelve.

The recipe's validation speakers are few (two RAVDESS actors, two BanglaSER actors, one nEMO
speaker), and one of them moves a corpus's score by points, so a choice between two recipes made
on them alone is noisy. Here each corpus's training speakers are dealt into k folds (seeded,
speaker-disjoint); for each fold one downstream of the recipe trains on the other training
speakers, its epoch chosen on the validation speakers exactly as the recipe chooses it, and then
answers the fold's speakers, whom it never heard. Pooled over the folds, every training speaker
is scored once by a model that never trained on them. One downstream's seed still moves that
pooled score by about 0.02 (README), so each fold can train on several seeds. The test speakers
are not touched: this is a validation measure, for choices.
"""
from pathlib import Path

import numpy as np

from learner.corpora import CorpusClip, CorpusError
from learner.evaluation import build_report, outcomes_from_logits
from learner.inference import limit_threads
from learner.speech_model import SpeechEmotionEnsemble
from learner.speech_training import (CachedClips, cached_logits, corpus_mean_ua,
                                     fit_block_mean_probe, load_cached_splits, map_on_splits,
                                     train_branch)


def speaker_folds(clips: list[CorpusClip], k: int, seed: int) -> list[list[str]]:
    """The speakers of `clips` dealt into k folds, corpus by corpus in a seeded order, so each
    fold holds about 1/k of every corpus's speakers (a corpus of fewer than k speakers lends one
    to each of its first folds, the next corpus starting where it stopped)."""
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, not {k}")
    rng = np.random.default_rng(seed)
    by_corpus: dict[str, set[str]] = {}
    for clip in clips:
        by_corpus.setdefault(clip.corpus, set()).add(clip.speaker)
    folds: list[list[str]] = [[] for _ in range(k)]
    position = 0
    for corpus in sorted(by_corpus):
        for speaker in rng.permutation(sorted(by_corpus[corpus])):
            folds[position % k].append(str(speaker))
            position += 1
    if any(not fold for fold in folds):
        raise CorpusError(f"{position} training speakers cannot fill {k} folds")
    return folds


def cross_validate(config: dict, data_dir: Path, encoder_path: Path, *, folds: int,
                   seeds: int = 1, progress: bool = True) -> dict:
    """The recipe's downstream scored on held-out training speakers (module docstring), each
    fold trained on `seeds` seeds (the recipe's, then the next ones; the folds stay those of the
    recipe's seed, so seeds and recipes compare fold by fold): the pooled report over every fold
    and seed (each clip counted once a seed, so its figures are the means over seeds), each
    seed's pooled score, and each fold's."""
    labels, seed = tuple(config["labels"]), int(config["seed"])
    limit_threads(int(config["train"].get("threads", 2)))
    train, validation, _ = load_cached_splits(config, data_dir, encoder_path, progress=progress)
    speakers = speaker_folds(train.clips, folds, seed)
    tasks = [(fold, seed + s) for s in range(seeds) for fold in speakers]
    results = map_on_splits(_held_out_logits, tasks, config=config, train=train,
                            validation=validation, data_dir=data_dir,
                            encoder_path=encoder_path,
                            bar=dict(desc="folds", unit="fold", disable=not progress))
    # Outcomes, not logits, are pooled: a clip is answered once a seed.
    outcomes, skipped, per_fold, per_seed = [], 0, [], {}
    for (fold, fold_seed), (rows, fold_logits, history) in zip(tasks, results):
        held = [train.clips[i] for i in rows]
        answered, unknown = outcomes_from_logits(held, labels, fold_logits)
        skipped += unknown
        best = max(history, key=lambda h: h["val_corpus_mean_ua"])
        per_fold.append({"seed": fold_seed, "speakers": sorted(fold), "clips": len(held),
                         "epoch": best["epoch"],
                         "validation_corpus_mean_ua": best["val_corpus_mean_ua"],
                         "held_out_corpus_mean_ua": round(_score(answered, labels), 4)})
        per_seed.setdefault(fold_seed, []).extend(answered)
        outcomes += answered
    pooled = build_report(outcomes, skipped, labels)
    return {"folds": folds, "seeds": sorted(per_seed), "speakers": sum(map(len, speakers)),
            "clips": len(train.clips),
            "held_out_corpus_mean_ua": round(corpus_mean_ua(pooled), 4),
            "held_out_per_corpus": {c: {"clips": r["n"] // seeds,
                                        "accuracy": round(r["accuracy"], 4),
                                        "unweighted_accuracy": round(r["unweighted_accuracy"], 4)}
                                    for c, r in pooled["per_corpus"].items()},
            "per_seed": [{"seed": s, "held_out_corpus_mean_ua": round(_score(o, labels), 4)}
                         for s, o in sorted(per_seed.items())],
            "per_fold": per_fold, "report": pooled}


def _score(outcomes: list, labels: tuple[str, ...]) -> float:
    return corpus_mean_ua(build_report(outcomes, 0, labels))


def _held_out_logits(config: dict, train: CachedClips, validation: CachedClips,
                     fold: list[str], seed: int) -> tuple[np.ndarray, np.ndarray, list]:
    """One fold on one seed: a downstream of the recipe (with its probe, if it has one) trained
    without the fold's speakers, and its logits on them."""
    out = set(fold)
    held = np.array([i for i, c in enumerate(train.clips) if c.speaker in out], dtype=np.int64)
    kept = np.array([i for i, c in enumerate(train.clips) if c.speaker not in out],
                    dtype=np.int64)
    net, history = train_branch(config, train.subset(kept), validation, seed, progress=False)
    if config.get("probe"):  # the recipe's probe too, fitted on the same training speakers
        probe = fit_block_mean_probe(train.subset(kept), config["probe"], tuple(config["labels"]),
                                     int(config["seed"]))
        net = SpeechEmotionEnsemble.of([net], probe).eval()
    return held, cached_logits(net, train.subset(held)), history
