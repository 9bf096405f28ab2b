"""Training a personal version with Avalanche, on what the parent global version reads of each
clip (learner.continual.avalanche_model: log-mel frames, or the frozen speech encoder's states).

The Naive strategy with a ReplayPlugin whose class-balanced buffer holds the global version's
replay exemplars, BatchNorm statistics frozen, a fixed number of steps. What trains is the
personal part of the network (`personal_names`): the head, and on a speech-encoder model also
the downstream's input layers (each branch's `adaptable`, learner.speech_model), where a voice
sits; everything else stays the global version's. Replay holds the part near what the global
data needs; the personal gate checks that it did. Measured on the validation users (README,
"Personal models"): the input layers re-fitted for a voice answer its other clips better than a
head alone.

A round computes every clip's inputs once (`cut_inputs`); each step reads random crops of them.
"""
import math
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
from avalanche.benchmarks.scenarios.task_aware import with_task_labels
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from avalanche.training.storage_policy import ClassBalancedBuffer
from avalanche.training.supervised import Naive
from torch import nn

from learner.continual.avalanche_model import (MaskedInputNet, copy_for_training, head_owner,
                                               states_of_rows)
from learner.continual.strategies import (CroppedInputs, FrozenBatchNorm, RoundStopped,
                                          StepBudget, StopWhenAsked, avalanche_dataset,
                                          cut_inputs)
from learner.inference import length_batches
from learner.speech_model import SpeechEmotionModel


@dataclass(frozen=True)
class PersonalTrainingConfig:
    steps: int = 60
    batch_size: int = 16  # of the user's clips a step
    replay_batch_size: int = 16  # global exemplars beside them
    lr: float = 0.001
    crop_frames: int = 300  # feature frames of a training crop (learner.crop_frames: 3 s)
    label_smoothing: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class PersonalPart:
    """What a personal version holds of the network: its head, and the adapted input layers of
    a speech-encoder model (None on a log-mel model, whose head alone is personal)."""
    head: nn.Linear
    adapter: dict[str, torch.Tensor] | None


class GlobalExemplars(ClassBalancedBuffer):
    """The replay buffer of a personal round: the global exemplars, and only those. Avalanche
    would add the user's corrections after training, but a personal round's buffer is not kept
    (each round starts from the global one again), so that update is skipped; it would also
    call Avalanche's deprecated `update`, whose warning resets the process's warning filters."""

    def update(self, strategy, **kwargs) -> None:
        pass


def personal_names(net: nn.Module) -> tuple[str, ...]:
    """The parameters (named as in the head's owner, learner.continual.avalanche_model) a
    personal version re-fits."""
    head = ("head.weight", "head.bias")
    return net.downstream.adaptable + head if isinstance(net, SpeechEmotionModel) else head


def clip_inputs(net: nn.Module, features: list[np.ndarray]) -> list[np.ndarray]:
    """What `net` reads of each whole clip (for a speech-encoder model, its encoder's states;
    the encoder is nearly all of the time): what the gate's clips are answered from."""
    return MaskedInputNet(copy_for_training(net)).inputs(features)  # never the served net's head


def round_inputs(net: nn.Module, features: list[np.ndarray], crop_frames: int,
                 rng: np.random.Generator) -> list[np.ndarray]:
    """clip_inputs for clips to train on, computed once a round; a long clip's cut once to a
    random window of three crops (a round holds them all; a correction longer than that is also
    answered on its window in cross-validation)."""
    model = MaskedInputNet(copy_for_training(net))  # it swaps the head: never the served net's
    return cut_inputs(model, features, model.input_frames(crop_frames), rng)


def train_personal(net: nn.Module, user_inputs: list[np.ndarray], user_y: list[int],
                   replay_inputs: list[np.ndarray], replay_y: list[int],
                   config: PersonalTrainingConfig = PersonalTrainingConfig(), *,
                   stop: threading.Event | None = None) -> PersonalPart:
    """The personal part of a copy of `net`, fine-tuned on the user's inputs (round_inputs) and
    label indices with the global exemplars replayed. Deterministic for a given seed. Raises
    RoundStopped when `stop` is set meanwhile (the process is shutting down)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = MaskedInputNet(copy_for_training(net))
    owner = head_owner(model.net)
    trained = {name.replace("head.", "head.classifier.") for name in personal_names(net)}
    for name, parameter in owner.named_parameters():
        parameter.requires_grad_(name in trained)
    crop = model.input_frames(config.crop_frames)
    user_data = avalanche_dataset(CroppedInputs(user_inputs, list(user_y), crop, rng),
                                  list(user_y))
    replay_data = avalanche_dataset(CroppedInputs(replay_inputs, list(replay_y), crop, rng),
                                    list(replay_y))
    buffer = GlobalExemplars(max_size=len(replay_y), adaptive_size=True)
    buffer.update_from_dataset(replay_data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    epochs = math.ceil(config.steps / math.ceil(len(user_y) / config.batch_size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Avalanche warns that no logger is set: none is wanted
        strategy = Naive(model=model, optimizer=optimizer,
                         criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
                         train_mb_size=config.batch_size, train_epochs=epochs, device="cpu",
                         plugins=[ReplayPlugin(mem_size=len(replay_y),
                                               batch_size=config.batch_size,
                                               batch_size_mem=config.replay_batch_size,
                                               storage_policy=buffer),
                                  FrozenBatchNorm(), StepBudget(config.steps),
                                  *([StopWhenAsked(stop)] if stop is not None else [])],
                         evaluator=EvaluationPlugin(loggers=[]), eval_every=-1)
        strategy.train(with_task_labels(with_classes_timeline(
            benchmark_from_datasets(train=[user_data]))).train_stream[0], eval_streams=[])
    if stop is not None and stop.is_set():
        raise RoundStopped("the learner was asked to stop")
    classifier = owner.head.classifier
    head = nn.Linear(classifier.in_features, classifier.out_features)
    head.load_state_dict(classifier.state_dict())
    state = owner.state_dict()
    adapter = ({name: state[name].detach().clone() for name in net.downstream.adaptable}
               if isinstance(net, SpeechEmotionModel) else None)
    return PersonalPart(head.eval().requires_grad_(False), adapter)


@torch.inference_mode()
def embed_inputs(net: nn.Module, inputs: list[np.ndarray],
                 adapter: dict[str, torch.Tensor] | None = None,
                 batch_size: int = 64) -> torch.Tensor:
    """(n, D) embeddings of clips given as round_inputs, through `net` with `adapter` (a
    personal version's input layers) in place of its own; batched by similar length."""
    net.eval()
    out = torch.zeros(len(inputs), net.head.in_features)
    for chunk, x, lengths in length_batches(inputs, batch_size):
        if isinstance(net, SpeechEmotionModel):
            out[chunk] = net.downstream.embed(states_of_rows(net, x), lengths, adapter=adapter)
        else:
            out[chunk] = net.embed(x, lengths)
    return out
