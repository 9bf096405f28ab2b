"""The network probe a recipe's head can read beside its branches: one hidden layer of ReLU
units on the standardised block statistics, in place of the logistic regression
(learner.linear_probe.fit_standardised_regression). The probe's mistakes on the training
speakers are low-arousal pairs (neutral against sad, calm against sad) that a hyperplane on the
statistics does not separate; one hidden layer scored 0.804 against the regression's 0.794 on the
cross-validation (README, "How it was chosen").

Fitted in one process on one seed: the same rows give the same file.
"""
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn


@dataclass(frozen=True)
class ProbeNetwork:
    """A fitted network: standardise with `mean`, `scale`; `hidden` (Linear), ReLU; `out`."""
    mean: np.ndarray
    scale: np.ndarray
    hidden: nn.Linear
    out: nn.Linear


def fit_probe_network(x: np.ndarray, targets: np.ndarray, n_classes: int, settings: dict,
                      seed: int) -> ProbeNetwork:
    """Standardise `x` (rows: clips, columns: statistics) by its own mean and deviation, then
    train Linear(`hidden`) -> ReLU -> Dropout(`dropout`) -> Linear(n_classes) for `epochs`
    passes in shuffled batches of `batch_size`, AdamW (`lr`, `weight_decay`), cross-entropy
    with classes weighted by the inverse of their counts (the regression's "balanced")."""
    mean = x.mean(axis=0, dtype=np.float64)
    scale = x.std(axis=0, dtype=np.float64)
    scale[scale == 0] = 1.0  # a statistic constant over the training clips: left as it is
    rows = torch.from_numpy(((x - mean) / scale).astype(np.float32))
    labels = torch.from_numpy(targets.astype(np.int64))
    # The regression's own "balanced" weights: every class must have rows (the caller checks).
    class_weights = compute_class_weight("balanced", classes=np.arange(n_classes), y=targets)
    # Its own random streams: the result depends on `seed` alone, and the caller's are untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hidden = nn.Linear(rows.shape[1], int(settings["hidden"]))
        out = nn.Linear(int(settings["hidden"]), n_classes)
        net = nn.Sequential(hidden, nn.ReLU(), nn.Dropout(float(settings["dropout"])), out)
        optimizer = torch.optim.AdamW(net.parameters(), lr=float(settings["lr"]),
                                      weight_decay=float(settings["weight_decay"]))
        loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(class_weights, dtype=torch.float32))
        order = torch.Generator().manual_seed(seed)
        net.train()
        batch_size = int(settings["batch_size"])
        for _ in range(int(settings["epochs"])):
            for batch in torch.randperm(len(rows), generator=order).split(batch_size):
                optimizer.zero_grad()
                loss_fn(net(rows[batch]), labels[batch]).backward()
                optimizer.step()
    net.eval()
    return ProbeNetwork(mean, scale, hidden.requires_grad_(False), out.requires_grad_(False))
