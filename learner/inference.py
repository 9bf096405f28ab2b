"""Turning a clip into an emotion with probabilities, for the CLI, evaluation and the service."""
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from learner.audio import decode_audio
from learner.checkpoint import LoadedModel
from learner.speech_model import SpeechEmotionModel


@dataclass(frozen=True)
class Prediction:
    emotion: str
    confidence: float
    probabilities: dict[str, float]


class EmotionPredictor:
    """A loaded model ready for inference: eval mode, no gradients."""

    def __init__(self, model: LoadedModel):
        self.model = model
        self.labels = model.labels

    @torch.inference_mode()
    def logits(self, features: np.ndarray) -> np.ndarray:
        """(frames, F) -> (n_labels,) logits."""
        x = torch.from_numpy(features).unsqueeze(0)
        lengths = torch.tensor([features.shape[0]])
        return self.model.net(x, lengths)[0].numpy()

    @torch.inference_mode()
    def logits_batch(self, features: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Many clips at once, batched by similar length (padding does not change outputs,
        it only costs time). -> (n_clips, n_labels)."""
        out = np.zeros((len(features), len(self.labels)), dtype=np.float32)
        for chunk, x, lengths in length_batches(features, batch_size):
            out[chunk] = self.model.net(x, lengths).numpy()
        return out

    def predict_features(self, features: np.ndarray, allowed: tuple[str, ...] | None = None) -> Prediction:
        """`allowed` restricts the answer to a subset of labels (the per-corpus evaluation protocol)."""
        return self.predict_logits(self.logits(features), allowed)

    def predict_wave(self, wave: np.ndarray) -> Prediction:
        return self.predict_features(self.model.features(wave))

    def predict_audio(self, source, max_seconds: float = 30.0) -> Prediction:
        return self.predict_wave(decode_audio(source, max_seconds=max_seconds))

    def warm_up(self) -> None:
        """Run once on a synthetic clip, so first-call allocations and lazy initialisation happen
        before a user's request does."""
        t = np.arange(int(1.5 * 16_000)) / 16_000
        wave = (0.3 * np.sin(2 * np.pi * 180 * t) * np.hanning(t.size)).astype(np.float32)
        self.predict_wave(wave)

    def predict_logits(self, logits: np.ndarray, allowed: tuple[str, ...] | None = None) -> Prediction:
        return prediction_from_logits(logits, self.labels, allowed)


def prediction_from_logits(logits: np.ndarray, labels: tuple[str, ...],
                           allowed: tuple[str, ...] | None = None) -> Prediction:
    """Softmax over `labels` (only those in `allowed`, when given) and the most likely one."""
    if allowed is not None:
        keep = np.array([label in allowed for label in labels])
        logits = np.where(keep, logits, -np.inf)
    shifted = np.exp(logits - logits.max())
    probs = shifted / shifted.sum()
    best = int(probs.argmax())
    return Prediction(
        emotion=labels[best],
        confidence=float(probs[best]),
        probabilities={label: float(p) for label, p in zip(labels, probs)},
    )


@torch.inference_mode()
def logits_batches(predictors: Sequence, features: list[np.ndarray],
                   batch_size: int = 32, memo: dict | None = None) -> list[np.ndarray]:
    """Each predictor's `logits_batch(features)`, the frozen encoder run once for all: models
    on the same encoder file (its sha256) reading as many of its blocks read the same states,
    so each batch is encoded once and every such model's downstream reads it. That is what each
    model run whole computes on the same batch (the same ops on the same states: the answers are
    identical), for the cost of one encoder pass instead of one per model; the encoder is
    nearly all of a model's time. Any other predictor (the log-mel kind, a personal head)
    answers through its own logits_batch, with its own batching. `memo`, a dict the caller
    keeps, holds each batch's states for the next call on the same clips (a round judges two
    candidates on one gate set: one encoder pass)."""
    out: list[np.ndarray | None] = [None] * len(predictors)
    by_encoder: dict[tuple[str, int], list[int]] = {}
    for i, predictor in enumerate(predictors):
        if (read := _encoder_read(predictor)) is None:
            out[i] = predictor.logits_batch(features)
        else:
            by_encoder.setdefault(read, []).append(i)
            out[i] = np.zeros((len(features), len(predictor.labels)), dtype=np.float32)
    for read, members in by_encoder.items():
        nets = [predictors[i].model.net for i in members]
        for chunk, x, lengths in length_batches(features, batch_size):
            key = ("states", *read, *(id(features[i]) for i in chunk))
            if memo is not None and key in memo:
                states, state_lengths = memo[key][0]
            else:
                states, state_lengths = nets[0].encode(x, lengths)
                if memo is not None:  # the clips too: their ids stay theirs while it lives
                    memo[key] = ((states, state_lengths), [features[i] for i in chunk])
            for i, net in zip(members, nets):
                out[i][chunk] = net.downstream(states, state_lengths).numpy()
    return out


def _encoder_read(predictor) -> tuple[str, int] | None:
    """The sha256 of the encoder file whose states a predictor's answers are a function of, and
    how many of its blocks: a SpeechEmotionModel answering whole (EmotionPredictor's own
    logits_batch), else None."""
    net = getattr(getattr(predictor, "model", None), "net", None)
    whole = type(predictor).logits_batch is EmotionPredictor.logits_batch
    if not (whole and isinstance(net, SpeechEmotionModel)):
        return None
    return net.encoder_sha256, net.config.n_blocks


def length_batches(features: list[np.ndarray], batch_size: int):
    """The clips sorted by length, `batch_size` at a time (similar lengths pad little): yields
    (their indices, the zero-padded (B, max_frames, F) batch, (B,) lengths)."""
    order = sorted(range(len(features)), key=lambda i: features[i].shape[0])
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        yield (chunk, *pad_batch([features[i] for i in chunk]))


def pad_batch(features: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (frames_i, F) -> zero-padded (B, max_frames, F) float32 and (B,) lengths."""
    lengths = torch.tensor([f.shape[0] for f in features])
    batch = torch.zeros(len(features), int(lengths.max()), features[0].shape[1])
    for i, f in enumerate(features):
        batch[i, : f.shape[0]] = torch.from_numpy(np.asarray(f, dtype=np.float32))
    return batch, lengths


def limit_threads(n: int) -> None:
    """Pin torch and numpy's BLAS to `n` threads for this process. On a 2-core machine shared
    with other work, idle BLAS threads spinning beside a busy core cost more than they give
    (a 3 s clip's features took 8 ms instead of 1.6 ms)."""
    torch.set_num_threads(n)
    threadpool_limits(n)
