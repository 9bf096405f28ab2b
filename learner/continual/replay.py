"""Samples a round learns from, the share it holds out for the gate, and the replay buffer as
rows (what the database keeps of it between rounds)."""
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from learner.continual.base_sets import FeatureSet
from storage.runs import ExemplarRow


@dataclass(frozen=True)
class Sample:
    """One labelled clip as features. `origin` says where it came from, so the replay buffer can
    be written back as rows: an ExemplarRow template (base index or feedback and clip ids)."""

    features: np.ndarray  # (frames, 64), float16 or float32
    label: str
    origin: ExemplarRow
    # Whose clip it is, for the gate's report: a base set's speaker, or "feedback".
    group: str = ""

    @property
    def feedback_id(self) -> int | None:
        return self.origin.feedback_id


@dataclass(frozen=True)
class BufferedSample:
    """A replay buffer entry: the sample and its reservoir-sampling weight."""

    sample: Sample
    weight: float


def split_holdout(samples: list[Sample], share: float,
                  rng: np.random.Generator) -> tuple[list[Sample], list[Sample]]:
    """(train, held out): per label, about `share` of its samples held out (none for a label
    with fewer than 3, so each label keeps at least two to learn from). Seeded by `rng`."""
    by_label: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_label[sample.label].append(sample)
    train, held_out = [], []
    for label in sorted(by_label):
        group = by_label[label]
        order = rng.permutation(len(group))
        n_hold = int(share * len(group) + 0.5) if len(group) >= 3 else 0
        held_out += [group[i] for i in order[:n_hold]]
        train += [group[i] for i in order[n_hold:]]
    return train, held_out


def base_exemplars(base: FeatureSet, labels: tuple[str, ...],
                   rng: np.random.Generator) -> list[ExemplarRow]:
    """The first buffer, for a version no round has stored one for: the shipped base replay set
    (of the labels the model knows), each entry with a fresh uniform reservoir weight."""
    return [ExemplarRow(source="base", label=label, weight=float(rng.random()), base_index=i)
            for i, label in enumerate(base.labels) if label in labels]


def exemplar_row(buffered: BufferedSample) -> ExemplarRow:
    origin = buffered.sample.origin
    return ExemplarRow(source=origin.source, label=buffered.sample.label,
                       weight=buffered.weight, base_index=origin.base_index,
                       feedback_id=origin.feedback_id, clip_id=origin.clip_id)
