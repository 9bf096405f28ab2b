"""The old data shipped beside the default model, so a fresh install (no corpora) can run rounds.

Two class-balanced sets of feature tensors (a model kind's features of clean clips, centre-cropped,
float16):
- `base_replay.safetensors`: what the replay buffer starts with; rounds rehearse it. From the
  default model's TRAINING speakers only.
- `base_gate.safetensors`: part of every gate set; how the gate sees old classes' recall. With a
  `gate_set` section in the model's recipe, clips of speakers the model never trained on (what
  an unseen speaker loses does not show on training speakers' clips; `unseen_gate`), else
  training speakers' clips.
`base_sets.json` records their sha256, checked on every load.
The validation speakers stay unheard (the continual bench uses them as newcomers) and the test
speakers unseen (they measure forgetting). The sets are features, not weights: retraining the
default model with the same features leaves them valid. A model of another kind reads other
features, so each kind has its own files, side by side in one folder: the log-mel kind's keep the
names above (the files shipped before there were two kinds), every other kind's put the kind
before the suffix:
- `base_replay.whisper-cnn-bilstm.safetensors`, `base_gate.whisper-cnn-bilstm.safetensors`,
  `base_sets.whisper-cnn-bilstm.json`.
So when the default model changes kind, versions of the old kind in existing stores keep learning
with their own sets. Each load names the kind it needs, and a file of other features is refused.
Built for the kind of the model they ship beside by
`emoloop learner build-base-sets --data ../shared/data`.
"""
import json
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load as load_safetensors

from learner.checkpoint import DEFAULT_MODEL_DIR, FEATURES_BY_KIND, LOGMEL_KIND
from learner.corpora import CorpusClip, read_corpora, split_by_speaker
from learner.file_metadata import read_metadata, save_with_metadata
from storage.files import sha256_bytes, write_atomic

SET_NAMES = ("replay", "gate")
# Clips a class of the training speakers' in each set (the gate set's fill where unseen voices
# have too few, or the whole gate set for a recipe without a `gate_set` section).
REPLAY_PER_CLASS, GATE_PER_CLASS = 16, 50
REPO_ROOT = Path(__file__).resolve().parents[2]


def set_file_name(name: str, kind: str) -> str:
    """`base_replay.safetensors` for the log-mel kind, `base_replay.KIND.safetensors` else."""
    return f"base_{name}{_kind_suffix(kind)}.safetensors"


def info_file_name(kind: str) -> str:
    """`base_sets.json` for the log-mel kind, `base_sets.KIND.json` else."""
    return f"base_sets{_kind_suffix(kind)}.json"


def _kind_suffix(kind: str) -> str:
    if kind not in FEATURES_BY_KIND:
        raise ValueError(f"unknown model kind {kind!r}")
    # The log-mel kind's files were named before there was a second kind; they stay valid.
    return "" if kind == LOGMEL_KIND else f".{kind}"


class BaseSetError(RuntimeError):
    """A shipped base set that is missing, corrupt, or made from other features."""


@dataclass(frozen=True)
class FeatureSet:
    """Clips as features: (frames_i, F) float16 arrays of one model kind's features, each with
    its label and speaker."""

    features: list[np.ndarray]
    labels: list[str]
    speakers: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def to_bytes(self, about: dict, kind: str) -> bytes:
        offsets = np.cumsum([0] + [f.shape[0] for f in self.features])
        tensors = {"features": torch.from_numpy(np.concatenate(self.features).astype(np.float16)),
                   "offsets": torch.from_numpy(offsets.astype(np.int64))}
        info = {**about, "features": FEATURES_BY_KIND[kind], "labels": self.labels,
                "speakers": self.speakers}
        return save_with_metadata(tensors, info)

    @classmethod
    def from_bytes(cls, data: bytes, kind: str) -> "FeatureSet":
        """Refuses a set of other features than a model of `kind` reads."""
        info = read_metadata(data)
        if info.get("features") != FEATURES_BY_KIND[kind]:
            raise BaseSetError(f"base set made from features {info.get('features')!r}, a "
                               f"{kind} model reads {FEATURES_BY_KIND[kind]!r}: rebuild it")
        tensors = load_safetensors(data)
        frames, offsets = tensors["features"].numpy(), tensors["offsets"].numpy()
        return cls(features=[frames[a:b] for a, b in zip(offsets[:-1], offsets[1:])],
                   labels=info["labels"], speakers=info["speakers"])


@lru_cache(maxsize=4)
def load_base_set(name: str, folder: Path | None = None, *, kind: str) -> FeatureSet:
    """A shipped set ("replay" or "gate") for a model of `kind`, from that kind's files (see the
    module docstring), checked against the sha256 in its JSON; from `folder`, by default the
    bundled model's."""
    folder = Path(folder) if folder is not None else DEFAULT_MODEL_DIR
    if name not in SET_NAMES:
        raise ValueError(f"no base set {name!r}")
    set_file, info_file = set_file_name(name, kind), info_file_name(kind)
    try:
        info = json.loads((folder / info_file).read_text())
        data = (folder / set_file).read_bytes()
    except OSError as err:
        raise BaseSetError(f"the {kind} base sets beside the default model are missing ({err}); "
                           f"build them with `emoloop learner build-base-sets`") from err
    if sha256_bytes(data) != info["sets"][name]["sha256"]:
        raise BaseSetError(f"{set_file} does not match its sha256 in {info_file}")
    return FeatureSet.from_bytes(data, kind)


def select_balanced(clips: list[CorpusClip], labels: tuple[str, ...], per_class: int,
                    rng: np.random.Generator) -> dict[str, list[CorpusClip]]:
    """Per label, `per_class` clips spread as evenly as possible over the corpora that have it,
    and within a corpus over its speakers (round-robin, random order inside each speaker)."""
    chosen = {}
    for label in labels:
        by_corpus: dict[str, dict[str, list[CorpusClip]]] = defaultdict(lambda: defaultdict(list))
        for clip in clips:
            if clip.emotion == label:
                by_corpus[clip.corpus][clip.speaker].append(clip)
        queues = [_round_robin(speakers, rng) for _, speakers in sorted(by_corpus.items())]
        picked: list[CorpusClip] = []
        while len(picked) < per_class and any(queues):
            for queue in queues:
                if queue and len(picked) < per_class:
                    picked.append(queue.pop(0))
        chosen[label] = picked
    return chosen


def _round_robin(speakers: dict[str, list[CorpusClip]], rng: np.random.Generator) -> list:
    lists = []
    for _, clips in sorted(speakers.items()):
        clips = list(clips)
        rng.shuffle(clips)
        lists.append(clips)
    order = []
    for i in range(max((len(c) for c in lists), default=0)):
        order += [c[i] for c in lists if i < len(c)]
    return order


def crop_centre(features: np.ndarray, max_frames: int) -> np.ndarray:
    if features.shape[0] <= max_frames:
        return features
    start = (features.shape[0] - max_frames) // 2
    return features[start : start + max_frames]


def build_base_sets(data_dir: Path, config: dict, *, kind: str,
                    replay_per_class: int = REPLAY_PER_CLASS, gate_per_class: int = GATE_PER_CLASS,
                    max_frames: int = 300, out_dir: Path = DEFAULT_MODEL_DIR, workers: int = 2,
                    config_name: str = "the recipe") -> dict:
    """Choose, featurise (as a model of `kind` reads clips: the kind of the model the sets ship
    beside) and write both sets and their JSON, named for `kind`; returns that JSON."""
    from learner.evaluation import clip_features

    seed, labels = int(config["seed"]), tuple(config["labels"])
    clips = [c for c in read_corpora(data_dir, config.get("corpora")) if c.emotion in labels]
    split = split_by_speaker(clips, validation_speakers=config["split"]["validation_speakers"],
                             test_speakers=config["split"]["test_speakers"])
    rng = np.random.default_rng(seed)
    # Training speakers' gate clips first, then the replay set's from the clips left: disjoint,
    # both balanced (and the replay set the same whatever the gate set's recipe).
    gate = select_balanced(split.train, labels, gate_per_class, rng)
    taken = {c.path for chosen in gate.values() for c in chosen}
    replay = select_balanced([c for c in split.train if c.path not in taken], labels,
                             replay_per_class, rng)
    gate_frames, about_gate = max_frames, {
        "speakers": f"training speakers of {config_name} (never the validation or test speakers)"}
    if recipe := config.get("gate_set"):
        gate = unseen_gate(data_dir, recipe, labels, gate, seed, split.validation)
        gate_frames = int(recipe.get("max_frames", max_frames))
        about_gate = {"speakers": f"unseen speakers: {recipe['about']}",
                      "gate_max_frames": gate_frames}
    sets = {"replay": [c for label in labels for c in replay[label]],
            "gate": [c for label in labels for c in gate[label]]}
    feature_sets = {}
    for name, members in sets.items():
        computed = clip_features([str(c.path) for c in members], kind=kind, workers=workers)
        if unreadable := [str(c.path) for c, f in zip(members, computed) if f is None]:
            raise ValueError(f"clips that do not decode: {unreadable[:3]}")
        frames = gate_frames if name == "gate" else max_frames
        features = [crop_centre(f, frames).astype(np.float16) for f in computed]
        feature_sets[name] = FeatureSet(features, [c.emotion for c in members],
                                        [c.speaker for c in members])
    corpus_of = {c.speaker: c.corpus for members in sets.values() for c in members}
    info = write_base_sets(out_dir, feature_sets, kind, {
        "seed": seed, "max_frames": max_frames, **about_gate})
    for name, feature_set in feature_sets.items():
        info["sets"][name]["per_corpus"] = {
            corpus: sum(corpus_of[s] == corpus for s in feature_set.speakers)
            for corpus in sorted(set(corpus_of.values()))}
    _write_info(out_dir, kind, info)
    return info


def unseen_gate(data_dir: Path, recipe: dict, labels: tuple[str, ...],
                trained: dict[str, list[CorpusClip]], seed: int,
                validation: list[CorpusClip]) -> dict[str, list[CorpusClip]]:
    """The gate set of speakers the model never trained on (recipe: config's `gate_set`): per
    label up to `per_class` clips, spread over corpora and speakers, either of the recipe's own
    validation speakers (`speakers: validation`) or of `recipe['corpora']` less the speakers of
    the splits in `recipe['exclude_splits_of']` (other recipes' test and validation speakers:
    the benchmarks' newcomers and measured speakers). A label with fewer than `min_per_class`
    such clips is filled up to that from `trained`, the training speakers' gate clips: the gate
    still sees it, if not on unseen voices."""
    if recipe.get("speakers") == "validation":
        pool = [c for c in validation if c.emotion in labels]
    else:
        excluded: set[str] = set()
        for other in recipe.get("exclude_splits_of", []):
            split = yaml.safe_load((REPO_ROOT / other).read_text())["split"]
            excluded |= set(split["validation_speakers"]) | set(split["test_speakers"])
        pool = [c for c in read_corpora(data_dir, recipe["corpora"])
                if c.emotion in labels and c.speaker not in excluded]
    chosen = select_balanced(pool, labels, int(recipe["per_class"]),
                             np.random.default_rng([seed, 1]))
    floor = int(recipe.get("min_per_class", 0))
    return {label: chosen[label] + trained[label][:max(0, floor - len(chosen[label]))]
            for label in labels}


def write_base_sets(out_dir: Path, sets: dict[str, FeatureSet], kind: str, about: dict) -> dict:
    """Write the sets (features a model of `kind` reads) and their JSON (with their sha256) into
    `out_dir`, under `kind`'s file names; returns the JSON. Another kind's files stay."""
    info = {"features": FEATURES_BY_KIND[kind], **about, "sets": {}}
    for name, feature_set in sets.items():
        data = feature_set.to_bytes({"set": name}, kind)
        write_atomic(Path(out_dir) / set_file_name(name, kind), data)
        info["sets"][name] = {
            "sha256": sha256_bytes(data), "bytes": len(data), "clips": len(feature_set),
            "per_class": {label: feature_set.labels.count(label)
                          for label in dict.fromkeys(feature_set.labels)},
            "speakers": len(set(feature_set.speakers)),
            "seconds": round(sum(f.shape[0] for f in feature_set.features) / 100, 1),
        }
    _write_info(out_dir, kind, info)
    load_base_set.cache_clear()
    return info


def _write_info(out_dir: Path, kind: str, info: dict) -> None:
    write_atomic(Path(out_dir) / info_file_name(kind), (json.dumps(info, indent=2) + "\n").encode())
