"""A world small enough for learning rounds in tests: synthetic 'emotions' a tiny model tells
apart (low and slow 'sad', high and fast 'happy', in between 'angry'), a tiny model trained on
them, base sets of their features, and feedback rows pointing at stored WAV clips. The model is
a log-mel EmotionNet; tests/learner/tiny_speech.py makes one of the speech-encoder kind."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from learner.checkpoint import LOGMEL_KIND, features_for, model_bytes
from learner.continual.base_sets import FeatureSet, write_base_sets
from learner.inference import limit_threads, pad_batch
from learner.model import EmotionNet, ModelConfig
from service.bench.clips import to_wav, voiced_clip
from storage.api_keys import ApiKeyRepository
from storage.artifacts import ArtifactStore, LocalArtifactStore
from storage.files import sha256_bytes
from storage.models import Feedback
from storage.registry import ModelRegistry
from storage.repositories import ClipRepository, FeedbackRepository, PredictionRepository
from storage.settings import LearnerSettings

PITCH = {"sad": 0.6, "happy": 1.7, "angry": 1.15}
TOY_LABELS = ("happy", "sad")


def toy_wave(label: str, seed: int) -> np.ndarray:
    return voiced_clip(0.8, 16_000 * PITCH[label], seed=seed)[:12_800]


def toy_features(label: str, seed: int, kind: str = LOGMEL_KIND) -> np.ndarray:
    return features_for(kind)(toy_wave(label, seed))


def toy_wav(label: str, seed: int) -> bytes:
    return to_wav(toy_wave(label, seed), 16_000)


def train_toy_model(seed: int = 0, net: torch.nn.Module | None = None,
                    kind: str = LOGMEL_KIND) -> bytes:
    """A tiny model that tells the toy 'happy' from 'sad' (trained here, in a second): a new
    EmotionNet, or `net`, a model of `kind`."""
    torch.manual_seed(seed)
    if net is None:
        net = EmotionNet(ModelConfig(n_classes=2, channels=(4, 8, 8), lstm_hidden=16,
                                     dropout=0.0))
    data = [(toy_features(label, 1000 + k, kind), i) for i, label in enumerate(TOY_LABELS)
            for k in range(8)]
    x, lengths = pad_batch([f for f, _ in data])
    y = torch.tensor([t for _, t in data])
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=0.01)
    net.train()
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(net(x, lengths), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model_bytes(net.eval(), TOY_LABELS)


def write_toy_base_sets(folder: Path, kind: str = LOGMEL_KIND) -> Path:
    sets = {}
    for name, per_class, offset in (("replay", 4, 2000), ("gate", 8, 3000)):
        items = [(toy_features(label, offset + k, kind).astype(np.float16), label)
                 for label in TOY_LABELS for k in range(per_class)]
        sets[name] = FeatureSet([f for f, _ in items], [label for _, label in items],
                                ["toy"] * len(items))
    write_base_sets(folder, sets, kind, {"about": "toy sets for tests"})
    return folder


def toy_learner_settings(base_sets_dir: Path, **overrides) -> LearnerSettings:
    """Small and quick: a round on the tiny model takes about a second. One candidate a round
    (the default bolder one's settings are the bundled model's; tests/learner/test_rounds.py
    tries a bolder one of its own)."""
    values = dict(enabled=False, base_sets_dir=base_sets_dir, steps=6, batch_size=8,
                  replay_batch_size=4, mem_size=16, crop_frames=100, holdout_share=0.25,
                  lr=3e-3, ewc_lambda=10.0, distill_weight=1.0, lock_ttl_s=30, bolder=None)
    return LearnerSettings(**{**values, **overrides})


def register_active(session_factory, artifacts: ArtifactStore, model: bytes) -> int:
    with session_factory() as session:
        version = ModelRegistry(session, artifacts).bootstrap_default(
            model, sha256_bytes(model), labels=list(TOY_LABELS))
        session.commit()
        return version.version


@dataclass(frozen=True)
class Given:
    feedback_id: int
    label: str


def give_feedback(session_factory, artifacts: ArtifactStore, api_key_id: int,
                  labels: list[str], *, seed: int = 0, truth: list[str] | None = None,
                  user_id: str | None = None) -> list[Given]:
    """Store a toy clip per entry (its true label from `truth`, default the label given), a
    prediction of it and feedback naming `labels[i]`, as the API would."""
    truth = truth or labels
    given = []
    with session_factory() as session:
        for i, (label, true) in enumerate(zip(labels, truth)):
            audio = toy_wav(true, seed * 1000 + i)
            sha256, path = artifacts.put_clip(audio, ".wav", session)
            clip = ClipRepository(session).get_or_create(
                sha256=sha256, duration_s=0.8, sample_rate=16_000, artifact_path=path,
                size_bytes=len(audio))
            prediction = PredictionRepository(session).create(
                api_key_id=api_key_id, clip_id=clip.id, model_version=1, label=true,
                confidence=0.9, probabilities={}, latency_ms=1.0, user_id=user_id)
            feedback: Feedback = FeedbackRepository(session).add(prediction, label)
            given.append(Given(feedback.id, label))
        session.commit()
    return given


# Fixtures; test modules import the ones they use.


@pytest.fixture(scope="session")
def toy_model() -> bytes:
    # One torch thread, as a service worker runs rounds: on a shared 2-core machine two threads
    # spin against each other and make these tiny rounds several times slower.
    limit_threads(1)
    return train_toy_model()


@pytest.fixture(scope="session")
def toy_base_sets(tmp_path_factory) -> Path:
    return write_toy_base_sets(tmp_path_factory.mktemp("base_sets"))


@dataclass
class LearnerWorld:
    session_factory: object
    artifacts: ArtifactStore
    settings: LearnerSettings
    api_key_id: int

    def feedback(self, labels: list[str], **kwargs) -> list[Given]:
        return give_feedback(self.session_factory, self.artifacts, self.api_key_id, labels,
                             **kwargs)


def make_world(session_factory, folder: Path, model: bytes, base_sets: Path,
               artifacts: ArtifactStore | None = None) -> LearnerWorld:
    """A world whose active version 1 is `model`, learning with `base_sets` (of its kind); its
    artifacts in `artifacts`, by default a local folder under `folder`."""
    artifacts = artifacts or LocalArtifactStore(folder / "artifacts")
    register_active(session_factory, artifacts, model)
    with session_factory() as session:
        key, _ = ApiKeyRepository(session).create("app", "app")
        session.commit()
        key_id = key.id
    return LearnerWorld(session_factory, artifacts, toy_learner_settings(base_sets), key_id)


@pytest.fixture
def world(session_factory, tmp_path, toy_model, toy_base_sets) -> LearnerWorld:
    """A migrated database (SQLite and PostgreSQL) whose active version 1 is the toy model."""
    return make_world(session_factory, tmp_path, toy_model, toy_base_sets)
