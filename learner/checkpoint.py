"""Model files: safetensors weights plus the metadata needed to rebuild the model.

Two kinds of model: the log-mel CNN-BiLSTM (`EmotionNet`, files without a `kind`) and the
CNN-BiLSTM on Whisper's frozen encoder (`SpeechEmotionModel`). The second kind's file holds only
the trained downstream and names its encoder file by sha256: one of the `*_encoder.safetensors`
files beside the default model (the default's own, or one a maintainer re-imported for versions
trained on an earlier default's encoder). Each is loaded once per process and shared by every
version that reads it.

Files are written atomically (temp file + rename) and their sha256 is checked on load, so a
half-written or tampered file is never served. Nothing is ever unpickled.
"""
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from safetensors.torch import load as load_safetensors
from torch import nn

from learner.file_metadata import read_metadata, save_with_metadata
from learner.model import EmotionNet, ModelConfig
from learner.speech_model import DownstreamConfig, SpeechEmotionModel, build_downstream
from storage.files import sha256_bytes, write_atomic

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
DEFAULT_MODEL_FILE = DEFAULT_MODEL_DIR / "model.safetensors"
DEFAULT_MODEL_INFO = DEFAULT_MODEL_FILE.with_suffix(".json")
# Where models find the `*_encoder.safetensors` file they name: the default's own, and any a
# maintainer imported again for older versions (`emoloop encoder import` writes here).
ENCODER_DIR = DEFAULT_MODEL_DIR
FEATURES_VERSION = "logmel64-v1"  # bump when learner.features changes what it computes

LOGMEL_KIND = "logmel-cnn-bilstm"
WHISPER_KIND = "whisper-cnn-bilstm"
# What each kind's feature function computes; bump when it changes.
FEATURES_BY_KIND = {LOGMEL_KIND: FEATURES_VERSION, WHISPER_KIND: "whisper-mel80-v1"}


class ModelFileError(RuntimeError):
    """A model file that is missing, corrupt, or does not match its recorded checksum."""


@dataclass(frozen=True)
class LoadedModel:
    net: nn.Module  # EmotionNet or SpeechEmotionModel (or their serving forms)
    labels: tuple[str, ...]
    sha256: str
    kind: str = LOGMEL_KIND

    def features(self, wave: np.ndarray) -> np.ndarray:
        """A validated 16 kHz clip -> what this model's network reads."""
        return features_for(self.kind)(wave)


def features_for(kind: str) -> Callable[[np.ndarray], np.ndarray]:
    if kind == WHISPER_KIND:
        from learner.speech_encoder.whisper_mel import extract_speech_features
        return extract_speech_features
    from learner.features import extract_features
    return extract_features


def model_kind(net: nn.Module) -> str:
    return WHISPER_KIND if isinstance(net, SpeechEmotionModel) else LOGMEL_KIND


def model_bytes(net: nn.Module, labels: tuple[str, ...]) -> bytes:
    kind = model_kind(net)
    metadata = {
        "config": json.dumps(net.config.to_dict()),
        "labels": json.dumps(list(labels)),
        "features": FEATURES_BY_KIND[kind],
    }
    if kind == WHISPER_KIND:  # the downstream only: the encoder is the bundled file
        metadata.update(kind=kind, encoder_sha256=net.encoder_sha256)
        net = net.downstream
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    return save_with_metadata(state, metadata)


def save_model(net: EmotionNet, labels: tuple[str, ...], path: Path) -> str:
    """Write the model atomically; returns the file's sha256."""
    data = model_bytes(net, tuple(labels))
    write_atomic(path, data)
    return sha256_bytes(data)


def model_from_bytes(data: bytes, expected_sha256: str | None = None) -> LoadedModel:
    digest = sha256_bytes(data)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelFileError(f"model checksum mismatch: expected {expected_sha256}, got {digest}")
    try:
        metadata = read_metadata(data)
        kind = metadata.get("kind", LOGMEL_KIND)
        if kind not in FEATURES_BY_KIND:
            raise ModelFileError(f"unknown model kind {kind!r}")
        labels = tuple(json.loads(metadata["labels"]))
        if metadata.get("features") != FEATURES_BY_KIND[kind]:
            raise ModelFileError(f"model was trained on features {metadata.get('features')!r}, "
                                 f"this code computes {FEATURES_BY_KIND[kind]!r}")
        config = json.loads(metadata["config"])
        if kind == WHISPER_KIND:
            downstream = build_downstream(DownstreamConfig.from_dict(config))
            downstream.load_state_dict(load_safetensors(data), strict=True)
            sha = metadata["encoder_sha256"]
            net = SpeechEmotionModel(bundled_encoder(sha), downstream, sha)
        else:
            net = EmotionNet(ModelConfig.from_dict(config))
            net.load_state_dict(load_safetensors(data), strict=True)
    except ModelFileError:
        raise
    except Exception as err:  # any parse or shape error means the file is not a usable model
        raise ModelFileError(f"not a valid emoloop model file: {err}") from err
    net.eval()
    return LoadedModel(net=net, labels=labels, sha256=digest, kind=kind)


@lru_cache(maxsize=2)
def bundled_encoder(sha256: str) -> nn.Module:
    """The encoder file of ENCODER_DIR whose sha256 a model names, checked and loaded once."""
    from learner.speech_encoder.weights import EncoderFileError, encoder_from_bytes

    path, data = _encoder_with(sha256)
    try:
        return encoder_from_bytes(data, path)  # the bytes whose sha256 was just matched
    except EncoderFileError as err:
        raise ModelFileError(str(err)) from err


def with_encoder(model: LoadedModel, path: Path) -> LoadedModel:
    """The model's downstream on another encoder file of the same shape, instead of the one it
    names: e.g. the float32 import of the encoder under a downstream shipped on its bfloat16
    one, which is how a precision's cost is measured (`emoloop evaluate --encoder`). The file is
    whatever the caller names, so no pinned checksum; the answer's encoder_sha256 is its own."""
    from learner.speech_encoder.weights import EncoderFileError, encoder_from_bytes

    if model.kind != WHISPER_KIND:
        raise ModelFileError(f"a {model.kind} model reads no speech encoder: --encoder applies "
                             f"to {WHISPER_KIND} models only")
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ModelFileError(f"cannot read encoder file {path}: {err.strerror}") from err
    try:
        encoder = encoder_from_bytes(data, Path(path))
    except EncoderFileError as err:
        raise ModelFileError(str(err)) from err
    wants, has = model.net.downstream.config, encoder.config
    if has.width != wants.width or has.n_blocks < wants.n_blocks:
        raise ModelFileError(
            f"encoder file {path} has {has.n_blocks} blocks of width {has.width}; the model's "
            f"downstream reads {wants.n_blocks} blocks of width {wants.width}")
    net = SpeechEmotionModel(encoder, model.net.downstream, sha256_bytes(data)).eval()
    return LoadedModel(net=net, labels=model.labels, sha256=model.sha256, kind=model.kind)


def encoder_file_for(sha256: str) -> Path:
    """The encoder file of ENCODER_DIR with this sha256 (see _encoder_with)."""
    return _encoder_with(sha256)[0]


def _encoder_with(sha256: str) -> tuple[Path, bytes]:
    """By content among the `*_encoder.safetensors` files, not by one fixed name: the default's
    encoder and any re-imported one sit side by side."""
    for path in sorted(ENCODER_DIR.glob("*_encoder.safetensors")):
        data = path.read_bytes()
        if sha256_bytes(data) == sha256:
            return path, data
    raise ModelFileError(
        f"the model reads encoder sha256 {sha256}, and no encoder file in {ENCODER_DIR} has "
        f"that checksum: a version trained on an earlier default's encoder needs that encoder "
        f"imported again (`emoloop encoder import`, README \"Upgrading\")")


def load_model(path: Path, expected_sha256: str | None = None) -> LoadedModel:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ModelFileError(f"cannot read model file {path}: {err.strerror}") from err
    return model_from_bytes(data, expected_sha256)


def bundled_model_info() -> dict | None:
    """The bundled default's model.json (its sha256, labels and figures); None where it is
    missing or unreadable."""
    try:
        info = json.loads(DEFAULT_MODEL_INFO.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "sha256" in info else None


def load_default_model() -> LoadedModel:
    """The bundled default, checked against the sha256 recorded beside it."""
    if (info := bundled_model_info()) is None:
        raise ModelFileError(f"the bundled model's {DEFAULT_MODEL_INFO} is missing or unreadable")
    return load_model(DEFAULT_MODEL_FILE, expected_sha256=info["sha256"])
