"""Training a personal head with Avalanche, on embeddings of the parent global version.

Like a global round: the Naive strategy with a ReplayPlugin (a class-balanced buffer filled with
the global replay exemplars) and an EWCPlugin in online mode. Here the experience is the user's
corrections, the model is only the head, and EWC's anchor is the global head itself, with
importances (the diagonal Fisher information) measured on the global replay set: the head may
move where the global data does not care, and is held where it does.

Inputs are embeddings, computed once per round by the frozen parent network, so one round trains
in well under a second.
"""
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.utils.classification_dataset import (
    _make_taskaware_tensor_classification_dataset as tensor_classification_dataset,
)
from avalanche.training.plugins import EvaluationPlugin, EWCPlugin, ReplayPlugin
from avalanche.training.storage_policy import ClassBalancedBuffer
from avalanche.training.supervised import Naive
from avalanche.training.utils import copy_params_dict
from torch import nn


@dataclass(frozen=True)
class PersonalTrainingConfig:
    epochs: int = 40
    batch_size: int = 32
    lr: float = 0.01
    dropout: float = 0.2  # on the embedding, as in base training
    ewc_lambda: float = 1000.0
    replay_size: int = 400  # global exemplars in the buffer, split evenly over classes
    replay_batch_size: int = 8  # replayed exemplars beside each batch of the user's
    seed: int = 0


class GlobalExemplars(ClassBalancedBuffer):
    """The replay buffer of a personal round: the global exemplars, and only those. Avalanche
    would add the user's corrections after training, but a personal round's buffer is not kept
    (each round starts from the global one again), so that update is skipped; it would also
    call Avalanche's deprecated `update`, whose warning resets the process's warning filters."""

    def update(self, strategy, **kwargs) -> None:
        pass


class HeadOnEmbeddings(nn.Module):
    """(B, D) embeddings -> (B, n_labels) logits; dropout as the full model has before its head."""

    def __init__(self, head: nn.Linear, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(head.in_features, head.out_features)
        self.head.load_state_dict(head.state_dict())

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(embeddings))


def train_personal_head(global_head: nn.Linear, user_x: torch.Tensor, user_y: torch.Tensor,
                        replay_x: torch.Tensor, replay_y: torch.Tensor,
                        config: PersonalTrainingConfig = PersonalTrainingConfig()) -> nn.Linear:
    """A copy of `global_head` fine-tuned on the user's (embedding, label index) pairs, with
    replay of and EWC toward the global data. Deterministic for a given seed."""
    torch.manual_seed(config.seed)
    model = HeadOnEmbeddings(global_head, config.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    criterion = nn.CrossEntropyLoss()
    user_data = tensor_classification_dataset(user_x.float(), user_y.long(), task_labels=0)
    replay_data = tensor_classification_dataset(replay_x.float(), replay_y.long(), task_labels=0)

    buffer = GlobalExemplars(max_size=config.replay_size, adaptive_size=True)
    buffer.update_from_dataset(replay_data)
    ewc = EWCPlugin(ewc_lambda=config.ewc_lambda, mode="online", decay_factor=1.0)
    # The global head is "experience 0": its parameters are the anchor, the Fisher information
    # on the global replay set the importances. The strategy's clock then starts at experience
    # 1, the first at which EWC adds its penalty.
    ewc.importances[0] = ewc.compute_importances(model, criterion, optimizer, replay_data, "cpu",
                                                 config.batch_size)
    ewc.saved_params[0] = copy_params_dict(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Avalanche warns that no logger is set: none is wanted
        strategy = Naive(model=model, optimizer=optimizer, criterion=criterion,
                         train_mb_size=config.batch_size, train_epochs=config.epochs,
                         plugins=[ReplayPlugin(mem_size=config.replay_size,
                                               batch_size_mem=config.replay_batch_size,
                                               storage_policy=buffer), ewc],
                         evaluator=EvaluationPlugin(loggers=[]), device="cpu")
        strategy.clock.train_exp_counter = 1
        strategy.train(benchmark_from_datasets(train=[user_data]).train_stream[0])
    model.eval()
    return model.head


def label_indices(labels: list[str], known: tuple[str, ...]) -> torch.Tensor:
    return torch.tensor(np.array([known.index(label) for label in labels]), dtype=torch.long)
