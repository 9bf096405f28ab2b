"""Base training of the downstream on Whisper's frozen encoder, on all corpora, split by speaker.

The encoder costs far more than the downstream, so it runs once per clip and variant
(learner.encoder_cache): the clean clip for every speaker, plus waveform-augmented variants of
the training speakers' clips. Epochs then read the cache: one variant per pick, a random crop,
classes balanced by sampling; the epoch with the best unweighted accuracy on the validation
speakers (averaged over corpora) is kept. A downstream of several branches trains each on its own
seed (the recipe's, then the next ones), in parallel processes, and joins them under one head
(learner.speech_model.SpeechEmotionEnsemble). The result wraps the bundled encoder, so it saves
and serves as one model.
"""
import sys
import time
from collections.abc import Callable
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from learner.corpora import CorpusClip, CorpusError, read_corpora, split_by_speaker
from learner.encoder_cache import EncoderCache, build_or_load_cache
from learner.evaluation import build_report, outcomes_from_logits
from learner.inference import limit_threads
from learner.probe_network import fit_probe_network
from learner.speech_encoder.weights import encoder_from_bytes
from learner.speech_model import (BlockMeanProbe, DownstreamConfig, SpeechEmotionEnsemble,
                                  SpeechEmotionModel, SpeechEmotionNet)
from learner.training import EarlyStopping, TrainingResult, balanced_weights, optimiser_step
from storage.files import sha256_bytes


class CachedClips:
    """Clips and where their encoder states are: one or more cache variants per clip."""

    def __init__(self, clips: list[CorpusClip], variants: list[tuple[EncoderCache, np.ndarray]],
                 labels: tuple[str, ...], n_blocks: int):
        self.clips, self.variants, self.labels, self.n_blocks = clips, variants, labels, n_blocks
        self.targets = np.array([labels.index(c.emotion) for c in clips], dtype=np.int64)

    @property
    def width(self) -> int:
        """The encoder's D, as its cache holds it."""
        return int(self.variants[0][0].states.shape[-1])

    def subset(self, indices: np.ndarray) -> "CachedClips":
        """These clips only (positions in `clips`), in that order; the caches are shared."""
        return CachedClips([self.clips[int(i)] for i in indices],
                           [(cache, rows[indices]) for cache, rows in self.variants],
                           self.labels, self.n_blocks)

    def states(self, i: int, variant: int, max_frames: int | None,
               rng: np.random.Generator | None) -> np.ndarray:
        """(n_blocks, frames, D) float32 of clip i, randomly cropped to max_frames."""
        cache, rows = self.variants[variant]
        states = cache.clip(int(rows[i]))[: self.n_blocks]
        length = states.shape[1]
        if max_frames is not None and length > max_frames:
            start = int(rng.integers(0, length - max_frames + 1))
            states = states[:, start : start + max_frames]
        return np.asarray(states, dtype=np.float32)


def _batch(states: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (N, T_i, D) -> zero-padded (B, N, T, D) and (B,) lengths."""
    lengths = torch.tensor([s.shape[1] for s in states])
    n, _, d = states[0].shape
    batch = torch.zeros(len(states), n, int(lengths.max()), d)
    for i, s in enumerate(states):
        batch[i, :, : s.shape[1]] = torch.from_numpy(s)
    return batch, lengths


@torch.inference_mode()
def cached_logits(net: nn.Module, data: CachedClips, batch_size: int = 64) -> np.ndarray:
    """Logits of every clip's clean variant, whole clip, batched by similar length."""
    net.eval()
    cache, rows = data.variants[0]
    order = np.argsort(cache.lengths[rows], kind="stable")
    out = np.zeros((len(data.clips), net.config.n_classes), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        x, lengths = _batch([data.states(int(i), 0, None, None) for i in chunk])
        out[chunk] = net(x, lengths).numpy()
    return out


def cached_report(net: nn.Module, data: CachedClips, labels: tuple[str, ...]) -> dict:
    """The evaluation report (per-corpus restricted labels) from cached states."""
    return build_report(*outcomes_from_logits(data.clips, labels, cached_logits(net, data)),
                        labels)


def corpus_mean_ua(report: dict) -> float:
    """The early-stopping score: unweighted accuracy per corpus, averaged over corpora. Pooled
    over clips, one validation speaker with 500 clips (nEMO) would outweigh whole corpora."""
    return float(np.mean([r["unweighted_accuracy"] for r in report["per_corpus"].values()]))


def branch_config(config: dict, encoder_width: int) -> DownstreamConfig:
    """The recipe's `model` section as one branch's downstream."""
    return DownstreamConfig(n_classes=len(config["labels"]), width=encoder_width,
                            **{**config["model"], "branches": 1})


def train_branch(config: dict, train: CachedClips, validation: CachedClips, seed: int, *,
                 progress: bool = True) -> tuple[SpeechEmotionNet, list[dict]]:
    """One downstream of one branch, trained on `seed`, its epoch chosen on the validation
    speakers."""
    train_cfg, labels = config["train"], tuple(config["labels"])
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = SpeechEmotionNet(branch_config(config, train.width))
    batch_size, epochs = train_cfg["batch_size"], train_cfg["epochs"]
    steps = len(train.clips) // batch_size
    if not validation.clips or steps == 0:
        raise CorpusError(f"{len(train.clips)} training and {len(validation.clips)} validation "
                          f"clips: need at least a batch ({batch_size}) to train on and one "
                          f"validation clip to choose the epoch on")
    optimizer = torch.optim.AdamW(net.parameters(), lr=train_cfg["lr"],
                                  weight_decay=train_cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=train_cfg["lr"], total_steps=steps * epochs, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=train_cfg.get("label_smoothing", 0.0))
    weights = balanced_weights(train.clips)
    history, stopping = [], EarlyStopping(train_cfg["patience"])
    for epoch in range(1, epochs + 1):
        net.train()
        picks = rng.choice(len(train.clips), size=steps * batch_size, replace=True, p=weights)
        total = 0.0
        for step in tqdm(range(steps), desc=f"epoch {epoch}", unit="batch", disable=not progress,
                         leave=False):
            idx = picks[step * batch_size : (step + 1) * batch_size]
            x, lengths = _batch([train.states(int(i), int(rng.integers(len(train.variants))),
                                              train_cfg["max_frames"], rng) for i in idx])
            loss = loss_fn(net(x, lengths), torch.from_numpy(train.targets[idx]))
            total += optimiser_step(net, loss, optimizer, scheduler)
        report = cached_report(net, validation, labels)
        score = corpus_mean_ua(report)
        per_corpus = {c: round(r["accuracy"], 3) for c, r in report["per_corpus"].items()}
        history.append({"seed": seed, "epoch": epoch, "loss": round(total / steps, 4),
                        "val_corpus_mean_ua": round(score, 4),
                        "val_ua": round(report["unweighted_accuracy"], 4),
                        "val_accuracy": round(report["accuracy"], 4), "val_per_corpus": per_corpus})
        if progress:
            tqdm.write(f"seed {seed} epoch {epoch}: loss {total / steps:.3f}  validation mean UA "
                       f"over corpora {score:.3f}  accuracy {per_corpus}", file=sys.stderr)
        if stopping.should_stop(net, score):
            break
    stopping.restore_best(net)
    return net, history


def train_downstream(config: dict, train: CachedClips, validation: CachedClips, *,
                     data_dir: Path, encoder_path: Path,
                     progress: bool = True) -> tuple[nn.Module, list[dict]]:
    """The recipe's downstream: `model.branches` branches on seeds seed, seed + 1, ..., each
    trained alone (`train.workers` processes at a time), joined under one head when several.
    A branch depends on its seed only, so the result is the same however they are scheduled."""
    seed, n = int(config["seed"]), int(config["model"].get("branches", 1))
    bar = dict(desc="downstream branches", unit="branch", disable=not progress or n == 1)
    trained = map_on_splits(partial(train_branch, progress=progress and n == 1),
                            [(seed + k,) for k in range(n)], config=config, train=train,
                            validation=validation, data_dir=data_dir,
                            encoder_path=encoder_path, bar=bar)
    nets = [net.eval() for net, _ in trained]
    history = [epoch for _, h in trained for epoch in h]
    probe = (fit_block_mean_probe(train, config["probe"], tuple(config["labels"]), seed)
             if config.get("probe") else None)
    if n == 1 and probe is None:
        return nets[0], history
    return SpeechEmotionEnsemble.of(nets, probe).eval(), history


def fit_block_mean_probe(train: CachedClips, probe: dict, labels: tuple[str, ...],
                         seed: int) -> BlockMeanProbe:
    """The probe the head reads beside the branches: each training clip's mean state of the
    first `probe["blocks"]` blocks, with `probe["std"]` their standard deviations over the
    clip too, with `probe["deltas"]` their mean changes from frame to frame too, standardised;
    then a logistic regression (classes balanced, `probe["C"]`), or with `probe["hidden"]` a
    network of that many hidden units (learner.probe_network, trained on `seed`); its logits
    scaled by `probe["weight"]`. It fits on the clean pass, or with `probe["perturbed"]` on
    every cached pass of each clip (clean and perturbed, one row each): the clips it answers
    come clean."""
    from learner.linear_probe import (block_statistics,  # imports this module
                                      fit_standardised_regression)

    missing = sorted(set(labels) - {c.emotion for c in train.clips})
    if missing:
        raise CorpusError(f"the probe needs training clips of every label; none of {missing}")
    blocks = int(probe["blocks"])
    if not 1 <= blocks <= train.n_blocks:
        raise ValueError(f"probe.blocks is {blocks}: the model reads {train.n_blocks} blocks")
    probed = tuple(range(blocks))
    std, deltas = bool(probe.get("std", False)), bool(probe.get("deltas", False))
    passes = range(len(train.variants)) if probe.get("perturbed", False) else range(1)
    rows = [block_statistics(train, probed, v, std=std, deltas=deltas) for v in passes]
    x, targets = np.concatenate(rows), np.tile(train.targets, len(rows))
    as_tensor = lambda a: torch.tensor(a, dtype=torch.float32)
    share = float(probe["weight"])
    if probe.get("hidden"):
        network = fit_probe_network(x, targets, len(labels), probe, seed)
        return BlockMeanProbe(blocks, as_tensor(network.mean), as_tensor(network.scale),
                              network.out.weight * share, network.out.bias * share, std, deltas,
                              network.hidden.weight.clone(), network.hidden.bias.clone())
    fitted = fit_standardised_regression(x, targets, float(probe["C"]))
    scaler, regression = fitted[0], fitted[-1]
    coef, intercept = regression.coef_, regression.intercept_
    if len(labels) == 2:  # scikit-learn keeps one row for two classes: the second's log-odds
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2,
                                                                       intercept[0] / 2])
    return BlockMeanProbe(blocks, as_tensor(scaler.mean_), as_tensor(scaler.scale_),
                          as_tensor(coef * share), as_tensor(intercept * share), std, deltas)


def map_on_splits(task: Callable, args: list[tuple], *, config: dict, train: CachedClips,
                  validation: CachedClips, data_dir: Path, encoder_path: Path,
                  bar: dict) -> list:
    """`task(config, train, validation, *a)` for each `a` of `args`, in order: in this process
    on these splits, or, with `train.workers` > 1, in that many spawned processes, each of
    which reads the same splits from the cache (`data_dir`, `encoder_path`) once."""
    workers = min(len(args), int(config["train"].get("workers", 2)))
    if workers <= 1:
        return [task(config, train, validation, *a) for a in tqdm(args, total=len(args), **bar)]
    with get_context("spawn").Pool(workers, initializer=_load_worker_splits,
                                   initargs=(config, data_dir, encoder_path)) as pool:
        return list(tqdm(pool.imap(_on_worker_splits, [(task, a) for a in args]),
                         total=len(args), **bar))


# A worker process's splits, read once by the pool's initializer and kept for every task it
# runs (the cache is memory-mapped, so this costs a corpus listing, not the states).
_worker_splits: tuple[dict, CachedClips, CachedClips] | None = None


def _load_worker_splits(config: dict, data_dir: Path, encoder_path: Path) -> None:
    global _worker_splits
    limit_threads(int(config["train"].get("threads", 2)))
    train, validation, _ = load_cached_splits(config, data_dir, encoder_path, progress=False)
    _worker_splits = (config, train, validation)


def _on_worker_splits(job: tuple[Callable, tuple]):
    task, args = job
    return task(*_worker_splits, *args)


def load_cached_splits(config: dict, data_dir: Path, encoder_path: Path, *,
                       progress: bool = True) -> tuple[CachedClips, CachedClips, CachedClips]:
    """The train, validation and test clips with their encoder states, built if not cached."""
    labels = tuple(config["labels"])
    seed, augment, train_cfg = int(config["seed"]), config["augment"], config["train"]
    n_blocks, keep = config["model"]["n_blocks"], config["cache"]["keep_blocks"]
    clips = [c for c in read_corpora(data_dir, config.get("corpora")) if c.emotion in labels]
    split = split_by_speaker(clips, validation_speakers=config["split"]["validation_speakers"],
                             test_speakers=config["split"]["test_speakers"])
    encoder_sha = sha256_bytes(Path(encoder_path).read_bytes())
    root = Path(config["cache"]["dir"])
    common = dict(keep_blocks=keep, workers=int(train_cfg.get("workers", 2)), progress=progress)
    # Clean states of every clip in one cache (any split can be read from it), then the
    # augmented variants of the training clips.
    every = sorted(str(c.path) for c in clips)
    clean = build_or_load_cache(root, encoder_path, encoder_sha, every, desc="encoder (clean)",
                                **common)
    row_of = {p: i for i, p in enumerate(every)}

    def rows(part: list[CorpusClip]) -> np.ndarray:
        return np.array([row_of[str(c.path)] for c in part], dtype=np.int64)

    train_paths = [str(c.path) for c in split.train]
    variants = [(clean, rows(split.train))]
    for v in range(1, int(augment["variants"])):
        cache = build_or_load_cache(root, encoder_path, encoder_sha, train_paths, variant=v,
                                    seed=seed, augment=augment, desc=f"encoder (variant {v})",
                                    **common)
        variants.append((cache, np.arange(len(train_paths))))
    return (CachedClips(split.train, variants, labels, n_blocks),
            CachedClips(split.validation, [(clean, rows(split.validation))], labels, n_blocks),
            CachedClips(split.test, [(clean, rows(split.test))], labels, n_blocks))


def train_speech(config: dict, data_dir: Path, encoder_path: Path, *,
                 progress: bool = True) -> TrainingResult:
    """The whole recipe: caches, downstream training, the model wrapped with its encoder."""
    started = time.perf_counter()
    labels = tuple(config["labels"])
    limit_threads(int(config["train"].get("threads", 2)))
    train, validation, test = load_cached_splits(config, data_dir, encoder_path,
                                                 progress=progress)
    data = Path(encoder_path).read_bytes()
    encoder_sha = sha256_bytes(data)
    encoder = encoder_from_bytes(data, encoder_path)  # the bytes just hashed: no second read
    downstream, history = train_downstream(config, train, validation, data_dir=data_dir,
                                           encoder_path=encoder_path, progress=progress)
    net = SpeechEmotionModel(encoder, downstream, encoder_sha)
    return TrainingResult(net, labels, history, cached_report(downstream, validation, labels),
                          cached_report(downstream, test, labels) if test.clips else None,
                          time.perf_counter() - started)
