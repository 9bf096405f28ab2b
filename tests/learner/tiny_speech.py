"""Models of the speech-encoder kind small enough for any test: a Whisper-shaped encoder with
random float16 weights (width 16, 2 heads, 2 blocks), imported as `emoloop encoder import`
would import the real file, and tiny downstreams on it. The `bundled_tiny_encoder` fixture makes
it the bundled encoder file, so such models save and load like the real ones; the real Whisper
file is never read."""
from pathlib import Path

import numpy as np
import pytest
import torch

import learner.checkpoint as checkpoint
from learner.checkpoint import WHISPER_KIND
from learner.inference import limit_threads
from learner.speech_encoder.ct2_file import write_ct2
from learner.speech_encoder.weights import import_encoder, load_encoder
from learner.speech_encoder.whisper_encoder import EncoderConfig, WhisperEncoder, ct2_names
from learner.speech_model import DownstreamConfig, SpeechEmotionModel, build_downstream
from storage.files import sha256_bytes
from tests.learner.toy_learning import (LearnerWorld, make_world, train_toy_model,
                                        write_toy_base_sets)

WIDTH, HEADS, BLOCKS, N_MELS, MAX_FRAMES = 16, 2, 2, 80, 1500


TINY_SOURCE_TEXT = "a random test encoder, {n} blocks"  # the provenance its import records


def tiny_ct2(seed: int = 0) -> bytes:
    """A CTranslate2 file of random variables of the tiny encoder's shapes (float16)."""
    rng = np.random.default_rng(seed)
    shapes = WhisperEncoder(EncoderConfig(N_MELS, WIDTH, HEADS, BLOCKS, MAX_FRAMES)).state_dict()
    variables = {theirs: ((1.0 if ours.endswith("norm.weight") else 0.0)  # LayerNorm gains
                          + 0.15 * rng.standard_normal(shapes[ours].shape)).astype(np.float16)
                 for ours, theirs in ct2_names(BLOCKS).items()}
    variables["encoder/num_heads"] = np.array(HEADS, np.int16)
    return write_ct2("WhisperSpec", variables)


def tiny_encoder_bytes(seed: int = 0) -> bytes:
    """An encoder file: `tiny_ct2` imported (its file pinned for this import only)."""
    ct2 = tiny_ct2(seed)
    return import_encoder(ct2, BLOCKS, pinned={sha256_bytes(ct2): TINY_SOURCE_TEXT})


def tiny_downstream(n_classes: int = 2, branches: int = 1, block_mix: str = "sum",
                    n_blocks: int = BLOCKS, probe_hidden: int = 0) -> torch.nn.Module:
    """With `probe_hidden`, the head also reads a network probe of that many units on every
    block's means, deviations and changes, as the default ships."""
    probe = dict(probe_blocks=n_blocks, probe_std=True, probe_deltas=True,
                 probe_hidden=probe_hidden) if probe_hidden else {}
    net = build_downstream(DownstreamConfig(n_blocks=n_blocks, width=WIDTH, n_classes=n_classes,
                                            channels=8, conv_layers=1, kernel=3,
                                            lstm_hidden=8, dropout=0.0, branches=branches,
                                            block_mix=block_mix, **probe))
    if probe_hidden:  # a fitted probe's buffers are not trained: random ones, not zeros
        width = net.probe_hidden_weight.shape[1]
        net.probe_hidden_weight.copy_(torch.randint(-127, 128, net.probe_hidden_weight.shape))
        net.probe_hidden_scale.fill_(1 / (127 * width ** 0.5))
        net.probe_hidden_bias.normal_(0, 0.1)
    return net


@pytest.fixture(scope="session")
def tiny_encoder_file(tmp_path_factory) -> tuple[Path, str]:
    """(path, sha256) of the tiny encoder file."""
    data = tiny_encoder_bytes()
    path = tmp_path_factory.mktemp("encoder") / "whisper_base_encoder.safetensors"
    path.write_bytes(data)
    return path, sha256_bytes(data)


@pytest.fixture
def bundled_tiny_encoder(tiny_encoder_file, monkeypatch) -> str:
    """The tiny encoder as the only bundled encoder file, for this test; returns its sha256."""
    path, sha256 = tiny_encoder_file
    monkeypatch.setattr(checkpoint, "ENCODER_DIR", path.parent)
    checkpoint.bundled_encoder.cache_clear()
    yield sha256
    checkpoint.bundled_encoder.cache_clear()


def tiny_speech_model(tiny_encoder_file, n_classes: int = 2, seed: int = 0,
                      branches: int = 1, block_mix: str = "sum",
                      n_blocks: int = BLOCKS, probe_hidden: int = 0) -> SpeechEmotionModel:
    """A random tiny model of the speech kind on (a load of) the tiny encoder file, reading its
    first `n_blocks` blocks."""
    path, sha256 = tiny_encoder_file
    torch.manual_seed(seed)
    return SpeechEmotionModel(load_encoder(path, sha256),
                              tiny_downstream(n_classes, branches, block_mix, n_blocks,
                                              probe_hidden), sha256)


@pytest.fixture(scope="session")
def toy_speech_model(tiny_encoder_file) -> bytes:
    """The toy model (tests/learner/toy_learning.py) of the speech kind: a model file. Two
    branches reading the blocks side by side and a network probe, as the default ships
    (learner.speech_model.SpeechEmotionEnsemble)."""
    limit_threads(1)  # as toy_model: one thread trains these tiny models fastest
    return train_toy_model(net=tiny_speech_model(tiny_encoder_file, branches=2,
                                                 block_mix="concat", probe_hidden=8),
                           kind=WHISPER_KIND)


@pytest.fixture(scope="session")
def toy_speech_base_sets(tmp_path_factory) -> Path:
    return write_toy_base_sets(tmp_path_factory.mktemp("speech_base_sets"), WHISPER_KIND)


@pytest.fixture
def speech_world(session_factory, tmp_path, toy_speech_model, toy_speech_base_sets,
                 bundled_tiny_encoder) -> LearnerWorld:
    """The toy world (a migrated database, its active version 1) on the speech kind."""
    return make_world(session_factory, tmp_path, toy_speech_model, toy_speech_base_sets)
