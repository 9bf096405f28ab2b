"""Training a candidate with Avalanche: the Naive strategy, with ReplayPlugin on a class-balanced
buffer and EWCPlugin in online mode as the configured strategy asks.

| strategy     | replay (ClassBalancedBuffer) | EWC (online) | trains on                          |
|--------------|------------------------------|--------------|------------------------------------|
| `ewc+replay` | yes                          | yes          | the round's new feedback           |
| `replay`     | yes                          | no           | the round's new feedback           |
| `naive`      | no                           | no           | the round's new feedback           |
| `joint`      | no                           | no           | everything so far (the caller's)   |

Replay rehearses each exemplar's label and, with `distill_weight`, the answer the starting model
gives it (ReplayDistillation): labels alone let borderline old clips flip, which the gate's
per-class recall check then refuses. Every round takes `steps` steps (or, with `passes`, as many
as that many passes over its new clips need, within bounds: round_steps) with the learning rate
falling linearly to zero, and keeps BatchNorm statistics as they were.

The buffer and the EWC state come in restored from storage and go out as plain values; the
strategy object lives for one round only and is never saved. Either kind of model trains the
same way; on the speech encoder only the downstream is trained, on the encoder's states of each
clip computed once a round and cropped at every read (as base training crops its cache), and
only its parameters are in the optimizer and the EWC state (learner.continual.avalanche_model).
Only the learner imports this module: inference never loads Avalanche.
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
from avalanche.benchmarks.utils.classification_dataset import (
    TaskAwareSupervisedClassificationDataset)
from avalanche.benchmarks.utils.data_attribute import DataAttribute
from avalanche.training.plugins import (EvaluationPlugin, EWCPlugin, LRSchedulerPlugin,
                                        ReplayPlugin, SupervisedPlugin)
from avalanche.training.storage_policy import ClassBalancedBuffer, ReservoirSamplingBuffer
from avalanche.training.supervised import Naive
from avalanche.training.utils import ParamData
from torch import nn
from torch.utils.data import Dataset

from learner.continual.avalanche_model import (MaskedInputNet, as_float_tensor, collate_masked,
                                     copy_for_training, freeze_input_layers)
from learner.continual.ewc_state import EwcState
from learner.continual.replay import BufferedSample, Sample
from learner.training import random_crop
from storage.settings import LearnerSettings

# strategy -> (replay, EWC)
STRATEGIES = {"ewc+replay": (True, True), "replay": (True, False), "naive": (False, False),
              "joint": (False, False)}


class RoundStopped(RuntimeError):
    """Training was asked to stop (the process is shutting down)."""


@dataclass(frozen=True)
class Candidate:
    net: nn.Module  # of the kind the round started from
    labels: tuple[str, ...]
    buffer: list[BufferedSample]  # the replay buffer after this round (for the next)
    ewc: EwcState | None  # None for strategies without EWC
    epochs: int
    steps: int


class FrozenBatchNorm(SupervisedPlugin):
    """BatchNorm layers keep their running statistics while a round trains: a few clips of new
    speakers must not shift the statistics every old class relies on."""

    def before_training_epoch(self, strategy, **kwargs):
        for module in strategy.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


class ReplayDistillation(SupervisedPlugin):
    """On replayed exemplars, the candidate is also pulled toward the answers the starting model
    gave (softened, temperature 2): replay of labels alone lets borderline old clips flip."""

    def __init__(self, model: MaskedInputNet, n_buffer: int, weight: float,
                 temperature: float = 2.0):
        super().__init__()
        self.start = copy_for_training(model).eval()
        self.n_buffer, self.weight, self.temperature = n_buffer, weight, temperature

    def before_backward(self, strategy, **kwargs):
        replayed = strategy.mbatch[2] < self.n_buffer
        if not replayed.any():
            return
        with torch.no_grad():
            start = self.start(strategy.mb_x[replayed])
            target = torch.softmax(start / self.temperature, dim=1)
        out = strategy.mb_output[replayed][:, : target.shape[1]] / self.temperature
        loss = nn.functional.kl_div(torch.log_softmax(out, dim=1), target,
                                    reduction="batchmean")
        strategy.loss += self.weight * self.temperature**2 * loss


class StepBudget(SupervisedPlugin):
    """Ends training after a number of steps, mid-epoch if need be: a round's time is bounded
    however much feedback it has."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    def after_training_iteration(self, strategy, **kwargs):
        # The clock (the last plugin) has not counted this step yet.
        if strategy.clock.train_exp_iterations + 1 >= self.steps:
            strategy.stop_training()


class StopWhenAsked(SupervisedPlugin):
    def __init__(self, stop: threading.Event):
        super().__init__()
        self.stop = stop

    def after_training_iteration(self, strategy, **kwargs):
        if self.stop.is_set():
            strategy.stop_training()


class CroppedInputs(Dataset):
    """What the model reads of the round's samples (MaskedInputNet.inputs); each read takes a
    random crop of at most `crop_frames` of its frames."""

    def __init__(self, inputs: list[np.ndarray], targets: list[int], crop_frames: int,
                 rng: np.random.Generator):
        self.inputs, self.targets, self.crop_frames, self.rng = inputs, targets, crop_frames, rng

    @classmethod
    def of(cls, model: MaskedInputNet, samples: list[Sample], targets: list[int],
           settings: LearnerSettings, rng: np.random.Generator,
           memo: dict | None = None) -> "CroppedInputs":
        """Each sample's inputs, a long clip's cut once to a random window of three crops: a
        round holds them all in memory (the speech encoder's states are about 100 KB a second,
        and a clip may be 30 s), and three crops' worth still gives every step a new one."""
        crop = model.input_frames(settings.crop_frames)
        return cls(cut_inputs(model, [s.features for s in samples], crop, rng, memo), targets,
                   crop, rng)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int):
        rows = random_crop(self.inputs[i], self.crop_frames, self.rng)
        return as_float_tensor(rows), self.targets[i]


def cut_inputs(model: MaskedInputNet, features: list[np.ndarray], crop: int,
               rng: np.random.Generator, memo: dict | None = None) -> list[np.ndarray]:
    """What `model` reads of each clip (MaskedInputNet.inputs), a long clip's cut once to a
    random window of three crops of `crop` frames. `memo`, a dict the caller keeps, holds the
    inputs of the clips short enough to be read whole, for the next call on them (a round's two
    candidates train on the same clips through the same frozen encoder): the same arrays the
    datasets hold, so it costs no memory of its own; long clips are read again."""
    memo = {} if memo is None else memo
    encoder = getattr(model.net, "encoder_sha256", None)  # the states are the encoder's
    inputs = []
    for start in range(0, len(features), 64):  # a few uncut clips in memory at a time
        part = features[start : start + 64]
        keys = [("inputs", encoder, id(f)) for f in part]
        fresh = [key not in memo for key in keys]
        read = iter(model.inputs([f for f, new in zip(part, fresh) if new]))
        for clip, key, new in zip(part, keys, fresh):
            row = next(read) if new else memo[key][0]
            cut = random_crop(row, 3 * crop, rng)
            if cut is row:  # read whole: kept, with the clip (so its id stays its own)
                memo[key] = (row, clip)
            inputs.append(cut if cut is row else cut.copy())  # a copy frees the uncut rows
    return inputs


def train_candidate(start: nn.Module, labels: tuple[str, ...], new: list[Sample],
                    buffer: list[BufferedSample], ewc_state: EwcState | None,
                    settings: LearnerSettings, *, strategy: str, seed: int,
                    stop: threading.Event | None = None, memo: dict | None = None) -> Candidate:
    """Fine-tune a copy of `start` on `new` as `strategy` says. Labels in `new` that `labels`
    lacks are appended (the head grows). Deterministic for a given seed. `memo`: the clips'
    inputs kept for another candidate (cut_inputs)."""
    use_replay, use_ewc = STRATEGIES[strategy]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    all_labels = tuple(labels) + tuple(sorted({s.label for s in new} - set(labels)))
    buffer = [b for b in buffer if b.sample.label in all_labels]
    pool = [b.sample for b in buffer] + list(new)
    targets = [all_labels.index(s.label) for s in pool]
    model = trainable_copy(start, settings)
    full = avalanche_dataset(CroppedInputs.of(model, pool, targets, settings, rng, memo),
                             targets)
    new_data = full.subset(list(range(len(buffer), len(pool))))
    policy = _restore_buffer(buffer, targets, full, settings.mem_size)

    ewc = EWCPlugin(settings.ewc_lambda, mode="online", decay_factor=settings.ewc_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    steps = round_steps(settings, len(new))
    plugins = _plugins(strategy, settings, model, optimizer, policy, ewc, len(buffer), steps,
                       stop)
    epochs = math.ceil(steps / max(1, math.ceil(len(new) / settings.batch_size)))
    with warnings.catch_warnings():
        # Avalanche warns that no metric loggers are set (on purpose) and about its own
        # deprecations; the round's log says what happened.
        warnings.simplefilter("ignore")
        naive = Naive(model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
                      train_mb_size=settings.batch_size, train_epochs=epochs,
                      eval_mb_size=settings.batch_size, device="cpu", plugins=plugins,
                      evaluator=EvaluationPlugin(loggers=[]), eval_every=-1)
        restored = use_ewc and _fits(ewc_state, model)
        if restored:
            _restore_ewc(ewc, ewc_state, model)
            naive.clock.train_exp_counter = 1  # EWC penalises against experience 0: the state
        # Classes timeline: the IncrementalClassifier head grows from it. Task labels (all 0):
        # they make Avalanche load batches with the dataset's own collate (padding + mask).
        experience = with_task_labels(with_classes_timeline(
            benchmark_from_datasets(train=[new_data])))
        naive.train(experience.train_stream[0], eval_streams=[])
        if stop is not None and stop.is_set():
            raise RoundStopped("the learner was asked to stop")
        if not use_replay:  # ReplayPlugin updates its buffer itself; keep it for the others too
            policy.update_from_dataset(new_data)
    ewc_after = None
    if use_ewc:
        last = naive.clock.train_exp_counter - 1
        ewc_after = EwcState(
            importances={k: v.data.clone() for k, v in ewc.importances[last].items()},
            anchor={k: v.data.clone() for k, v in ewc.saved_params[last].items()},
            rounds=(ewc_state.rounds if restored else 0) + 1)
    return Candidate(net=model.export(), labels=all_labels, buffer=_read_buffer(policy, pool),
                     ewc=ewc_after, epochs=epochs, steps=naive.clock.train_exp_iterations)


def round_steps(settings: LearnerSettings, n_new: int) -> int:
    """The steps a round over `n_new` clips takes: `settings.steps`, or with `settings.passes`
    that many passes over the clips, within [min_steps, max_steps] (the upper bound keeps a
    round's time bounded)."""
    if settings.passes is None:
        return settings.steps
    steps = round(settings.passes * math.ceil(n_new / settings.batch_size))
    return int(min(settings.max_steps, max(settings.min_steps, steps)))


def _plugins(strategy: str, settings: LearnerSettings, model: MaskedInputNet,
             optimizer: torch.optim.Optimizer, policy: ClassBalancedBuffer, ewc: EWCPlugin,
             n_buffer: int, steps: int, stop: threading.Event | None) -> list[SupervisedPlugin]:
    use_replay, use_ewc = STRATEGIES[strategy]
    plugins: list[SupervisedPlugin] = []
    if use_replay:
        plugins.append(ReplayPlugin(mem_size=settings.mem_size, batch_size=settings.batch_size,
                                    batch_size_mem=settings.replay_batch_size,
                                    storage_policy=policy))
    if use_ewc:
        plugins.append(ewc)
    if use_replay and settings.distill_weight > 0:
        plugins.append(ReplayDistillation(model, n_buffer, settings.distill_weight))
    if settings.freeze_batchnorm:
        plugins.append(FrozenBatchNorm())
    if stop is not None:
        plugins.append(StopWhenAsked(stop))
    # The learning rate falls linearly to zero over the round: the last steps, which decide
    # where the candidate ends up, are small ones.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    return plugins + [StepBudget(steps),
                      LRSchedulerPlugin(schedule, step_granularity="iteration")]


def avalanche_dataset(data: CroppedInputs, targets: list[int]):
    n = len(targets)
    return TaskAwareSupervisedClassificationDataset(
        [data], collate_fn=collate_masked,
        data_attributes=[DataAttribute(targets, "targets"),
                         # Which sample each entry is, through Avalanche's subsets and concats:
                         # the buffer is written back as rows from it, and each batch carries it
                         # (between target and task label) to tell replayed entries apart.
                         DataAttribute(list(range(n)), "pool_index", use_in_getitem=True),
                         DataAttribute([0] * n, "targets_task_labels", use_in_getitem=True)])


def _restore_buffer(buffer: list[BufferedSample], targets: list[int], full,
                    mem_size: int) -> ClassBalancedBuffer:
    """A ClassBalancedBuffer holding exactly the stored exemplars, with their stored reservoir
    weights, so later updates keep each class a uniform sample of all it has seen."""
    policy = ClassBalancedBuffer(max_size=mem_size, adaptive_size=True)
    by_class: dict[int, list[int]] = {}
    for i in range(len(buffer)):
        by_class.setdefault(targets[i], []).append(i)
    if not by_class:
        return policy
    lengths = policy.get_group_lengths(len(by_class))
    for (cls, members), length in zip(sorted(by_class.items()), lengths):
        # Avalanche keeps each group's weights sorted, highest first, and its buffer aligned.
        members = sorted(members, key=lambda i: -buffer[i].weight)[:length]
        group = ReservoirSamplingBuffer(length)
        group.buffer = full.subset(members)
        group._buffer_weights = torch.tensor([buffer[i].weight for i in members])
        policy.buffer_groups[cls] = group
        policy.seen_classes.add(cls)
    return policy


def _read_buffer(policy: ClassBalancedBuffer, pool: list[Sample]) -> list[BufferedSample]:
    out = []
    for cls in sorted(policy.buffer_groups):
        group = policy.buffer_groups[cls]
        for index, weight in zip(group.buffer.pool_index, group._buffer_weights.tolist()):
            out.append(BufferedSample(pool[int(index)], float(weight)))
    return out


def trainable_copy(start: nn.Module, settings: LearnerSettings) -> MaskedInputNet:
    """A copy of `start` as a round trains it: its input layers frozen if the settings say so."""
    model = MaskedInputNet(copy_for_training(start))
    if settings.freeze_input_layers:
        freeze_input_layers(model.net)
    return model


def _fits(state: EwcState | None, model: nn.Module) -> bool:
    """A stored state applies when it names every parameter the model trains (a round that
    freezes the input layers reads the rest of the state of one that trained them)."""
    return state is not None and all(k in state.importances for k, _ in model.named_parameters())


def bootstrap_ewc_state(start: nn.Module, labels: tuple[str, ...],
                        buffer: list[BufferedSample], settings: LearnerSettings, *,
                        seed: int, memo: dict | None = None) -> EwcState | None:
    """The EWC state of a version no EWC round produced (the bundled model, or one trained
    without EWC): importances from its replay buffer, the old data as far as we keep it, and
    anchored at its own weights. None without a buffer."""
    buffer = [b for b in buffer if b.sample.label in labels]
    if not buffer:
        return None
    torch.manual_seed(seed)
    targets = [labels.index(b.sample.label) for b in buffer]
    model = trainable_copy(start, settings)
    data = avalanche_dataset(CroppedInputs.of(model, [b.sample for b in buffer], targets,
                                                settings, np.random.default_rng(seed), memo),
                             targets)
    ewc = EWCPlugin(settings.ewc_lambda, mode="online", decay_factor=settings.ewc_decay)
    importances = ewc.compute_importances(
        model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.0), data, "cpu",
        batch_size=settings.batch_size)
    return EwcState(importances={k: v.data.clone() for k, v in importances.items()},
                    anchor={k: p.detach().clone() for k, p in model.named_parameters()})


def _restore_ewc(ewc: EWCPlugin, state: EwcState, model: nn.Module) -> None:
    names = [k for k, _ in model.named_parameters()]  # Avalanche relies on the model's order
    ewc.importances[0] = {k: ParamData(f"imp_{k}", init_tensor=state.importances[k].clone())
                          for k in names}
    ewc.saved_params[0] = {k: ParamData(k, init_tensor=state.anchor[k].clone()) for k in names}
