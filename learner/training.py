"""Base training of the CNN-BiLSTM on the corpora, split by speaker.

Augmentation is split in two for speed on a small CPU: a few speed/gain/noise variants of each
clip are turned into features once (in parallel), and every epoch picks one variant per clip,
crops it and applies SpecAugment. Classes are balanced by sampling; the epoch with the best
unweighted accuracy on the validation speakers is kept (early stopping).
"""
import json
import sys
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from learner.audio import decode_audio
from learner.augment import perturb_wave, spec_augment
from learner.checkpoint import LoadedModel, save_model
from storage.files import sha256_bytes
from learner.corpora import CorpusClip, read_corpora, split_by_speaker
from learner.evaluation import evaluate_features
from learner.features import extract_features
from learner.inference import EmotionPredictor, limit_threads, pad_batch
from learner.model import EmotionNet, ModelConfig, count_parameters


def load_training_config(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


@dataclass
class FeatureBank:
    """Per clip: its feature variants (the clean one first) and its label index."""
    clips: list[CorpusClip]
    variants: list[list[np.ndarray]]
    targets: np.ndarray


def _clip_variants(task: tuple) -> list[np.ndarray]:
    index, path, n_variants, seed, augment = task
    wave = decode_audio(path, max_seconds=60.0)
    rng = np.random.default_rng([seed, index])  # per clip, so worker scheduling cannot matter
    waves = [wave] + [
        perturb_wave(wave, rng, speeds=augment["speeds"], snr_db=tuple(augment["snr_db"]),
                     gain_db=tuple(augment["gain_db"]))
        for _ in range(n_variants - 1)
    ]
    # float16 halves the memory of the bank; the model computes in float32.
    return [extract_features(w).astype(np.float16) for w in waves]


def build_feature_bank(
    clips: list[CorpusClip], labels: tuple[str, ...], *, n_variants: int, seed: int,
    augment: dict, workers: int, desc: str, progress: bool = True,
) -> FeatureBank:
    tasks = [(i, str(c.path), n_variants, seed, augment) for i, c in enumerate(clips)]
    bar = dict(total=len(tasks), desc=desc, unit="clip", disable=not progress)
    if workers > 1:
        with get_context("spawn").Pool(workers, initializer=limit_threads, initargs=(1,)) as pool:
            variants = list(tqdm(pool.imap(_clip_variants, tasks, chunksize=16), **bar))
    else:
        variants = [_clip_variants(t) for t in tqdm(tasks, **bar)]
    targets = np.array([labels.index(c.emotion) for c in clips], dtype=np.int64)
    return FeatureBank(clips, variants, targets)


def balanced_weights(clips: list[CorpusClip]) -> np.ndarray:
    """Sampling weights giving every emotion the same share, split evenly between the corpora
    that have it, so the large, easy TESS set does not drown the others."""
    counts: dict[tuple[str, str], int] = {}
    for c in clips:
        counts[(c.emotion, c.corpus)] = counts.get((c.emotion, c.corpus), 0) + 1
    corpora_per_label: dict[str, int] = {}
    for label, _ in counts:
        corpora_per_label[label] = corpora_per_label.get(label, 0) + 1
    weights = np.array([1.0 / (corpora_per_label[c.emotion] * counts[(c.emotion, c.corpus)])
                        for c in clips])
    return weights / weights.sum()


def random_crop(features: np.ndarray, max_frames: int, rng: np.random.Generator) -> np.ndarray:
    if features.shape[0] <= max_frames:
        return features
    start = int(rng.integers(0, features.shape[0] - max_frames + 1))
    return features[start : start + max_frames]


def evaluate_bank(net: EmotionNet, labels: tuple[str, ...], bank: FeatureBank) -> dict:
    """Report on the clean variants, with the per-corpus restricted-label protocol."""
    net.eval()
    predictor = EmotionPredictor(LoadedModel(net=net, labels=labels, sha256=""))
    return evaluate_features(predictor, bank.clips, [v[0] for v in bank.variants])


def _length_bucketed_batches(
    bank: FeatureBank, weights: np.ndarray, batch_size: int, rng: np.random.Generator,
) -> list[np.ndarray]:
    """One epoch of class-balanced picks, grouped into batches of similar length (less padding,
    so less wasted compute), served in random order."""
    n = len(bank.clips)
    picks = rng.choice(n, size=n - n % batch_size, replace=True, p=weights)
    lengths = np.array([bank.variants[i][0].shape[0] for i in picks])
    pool = 16 * batch_size  # sort within pools of 16 batches: similar lengths, still shuffled
    batches = []
    for start in range(0, len(picks), pool):
        chunk = picks[start : start + pool][np.argsort(lengths[start : start + pool], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def train_epoch(
    net: EmotionNet, bank: FeatureBank, weights: np.ndarray, optimizer: torch.optim.Optimizer,
    scheduler, loss_fn: nn.Module, rng: np.random.Generator, generator: torch.Generator,
    train_cfg: dict, mask_cfg: dict, desc: str, progress: bool,
) -> float:
    net.train()
    batches = _length_bucketed_batches(bank, weights, train_cfg["batch_size"], rng)
    total = 0.0
    for idx in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        feats = [random_crop(bank.variants[i][rng.integers(len(bank.variants[i]))],
                             train_cfg["max_frames"], rng) for i in idx]
        x, lengths = pad_batch(feats)
        x = spec_augment(x, lengths, generator, **mask_cfg)
        loss = loss_fn(net(x, lengths), torch.from_numpy(bank.targets[idx]))
        total += optimiser_step(net, loss, optimizer, scheduler)
    return total / max(1, len(batches))


def optimiser_step(net: nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scheduler) -> float:
    """One step on `loss` with the gradient norm clipped at 5; returns the loss's value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(net.parameters(), 5.0)
    optimizer.step()
    scheduler.step()
    return loss.item()


class EarlyStopping:
    """Keeps the weights of the epoch with the best validation score, and says when `patience`
    epochs in a row have not beaten it."""

    def __init__(self, patience: int):
        self.patience, self.best_score, self.best_state, self.stale = patience, -1.0, None, 0

    def should_stop(self, net: nn.Module, score: float) -> bool:
        if score > self.best_score:
            self.best_score, self.stale = score, 0
            self.best_state = {k: v.clone() for k, v in net.state_dict().items()}
            return False
        self.stale += 1
        return self.stale >= self.patience

    def restore_best(self, net: nn.Module) -> None:
        net.load_state_dict(self.best_state)
        net.eval()


@dataclass
class TrainingResult:
    net: EmotionNet
    labels: tuple[str, ...]
    history: list[dict]
    validation: dict
    test: dict | None
    seconds: float


def train(config: dict, data_dir: Path, *, progress: bool = True) -> TrainingResult:
    started = time.perf_counter()
    seed, labels = int(config["seed"]), tuple(config["labels"])
    train_cfg, augment = config["train"], config["augment"]
    torch.manual_seed(seed)
    limit_threads(int(train_cfg.get("threads", 2)))
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)

    clips = [c for c in read_corpora(data_dir, config.get("corpora")) if c.emotion in labels]
    split = split_by_speaker(clips, validation_speakers=config["split"]["validation_speakers"],
                             test_speakers=config["split"]["test_speakers"])
    workers = int(train_cfg.get("workers", 2))
    common = dict(seed=seed, augment=augment, workers=workers, progress=progress)
    bank = build_feature_bank(split.train, labels, n_variants=augment["variants"],
                              desc="features (train)", **common)
    validation = build_feature_bank(split.validation, labels, n_variants=1,
                                    desc="features (validation)", **common)

    net = EmotionNet(ModelConfig(n_classes=len(labels), **config["model"]))
    steps_per_epoch = len(bank.clips) // train_cfg["batch_size"]
    optimizer = torch.optim.AdamW(net.parameters(), lr=train_cfg["lr"],
                                  weight_decay=train_cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=train_cfg["lr"], total_steps=steps_per_epoch * train_cfg["epochs"],
        pct_start=0.15,
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=train_cfg.get("label_smoothing", 0.0))
    weights = balanced_weights(bank.clips)
    mask_cfg = config["spec_augment"]

    history, stopping = [], EarlyStopping(train_cfg["patience"])
    for epoch in range(1, train_cfg["epochs"] + 1):
        loss = train_epoch(net, bank, weights, optimizer, scheduler, loss_fn, rng, generator,
                           train_cfg, mask_cfg, f"epoch {epoch}", progress)
        report = evaluate_bank(net, labels, validation)
        score = report["unweighted_accuracy"]
        history.append({"epoch": epoch, "loss": round(loss, 4),
                        "val_ua": round(score, 4), "val_accuracy": round(report["accuracy"], 4)})
        if progress:
            tqdm.write(f"epoch {epoch}: loss {loss:.3f}  validation UA {score:.3f} "
                       f"accuracy {report['accuracy']:.3f}", file=sys.stderr)
        if stopping.should_stop(net, score):
            break

    stopping.restore_best(net)
    validation_report = evaluate_bank(net, labels, validation)
    test_report = None
    if split.test:
        test = build_feature_bank(split.test, labels, n_variants=1, desc="features (test)", **common)
        test_report = evaluate_bank(net, labels, test)
    return TrainingResult(net, labels, history, validation_report, test_report,
                          time.perf_counter() - started)


def save_training_result(result: TrainingResult, config: dict, out: Path) -> dict:
    """The model file plus a JSON beside it (checksum, labels, recipe, figures)."""
    sha256 = save_model(result.net, result.labels, out)
    info = {
        "sha256": sha256,
        "labels": list(result.labels),
        "parameters": count_parameters(result.net),
        "trained_parameters": count_parameters(result.net, trainable_only=True),
        "seed": config["seed"],
        "split": config["split"],
        "training_seconds": round(result.seconds, 1),
        "history": result.history,
        "validation": _headline(result.validation),
        "test": _headline(result.test) if result.test else None,
        "config_sha256": sha256_bytes(json.dumps(config, sort_keys=True).encode()),
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _headline(report: dict) -> dict:
    keys = ("accuracy", "unweighted_accuracy", "macro_f1", "n", "per_corpus")
    return {k: report[k] for k in keys}
