"""Model files: safetensors weights plus the metadata needed to rebuild the model.

Files are written atomically (temp file + rename) and their sha256 is checked on load, so a
half-written or tampered file is never served. Nothing is ever unpickled.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load as load_safetensors

from learner.file_metadata import read_metadata, save_with_metadata
from learner.model import EmotionNet, ModelConfig
from storage.files import sha256_bytes, write_atomic

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
DEFAULT_MODEL_FILE = DEFAULT_MODEL_DIR / "model.safetensors"
DEFAULT_MODEL_INFO = DEFAULT_MODEL_FILE.with_suffix(".json")
FEATURES_VERSION = "logmel64-v1"  # bump when learner.features changes what it computes


class ModelFileError(RuntimeError):
    """A model file that is missing, corrupt, or does not match its recorded checksum."""


@dataclass(frozen=True)
class LoadedModel:
    net: EmotionNet
    labels: tuple[str, ...]
    sha256: str


def model_bytes(net: EmotionNet, labels: tuple[str, ...]) -> bytes:
    metadata = {
        "config": json.dumps(net.config.to_dict()),
        "labels": json.dumps(list(labels)),
        "features": FEATURES_VERSION,
    }
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
        config = ModelConfig.from_dict(json.loads(metadata["config"]))
        labels = tuple(json.loads(metadata["labels"]))
        if metadata.get("features") != FEATURES_VERSION:
            raise ModelFileError(f"model was trained on features {metadata.get('features')!r}, "
                                 f"this code computes {FEATURES_VERSION!r}")
        net = EmotionNet(config)
        net.load_state_dict(load_safetensors(data), strict=True)
    except ModelFileError:
        raise
    except Exception as err:  # any parse or shape error means the file is not a usable model
        raise ModelFileError(f"not a valid emoloop model file: {err}") from err
    net.eval()
    return LoadedModel(net=net, labels=labels, sha256=digest)


def load_model(path: Path, expected_sha256: str | None = None) -> LoadedModel:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ModelFileError(f"cannot read model file {path}: {err.strerror}") from err
    return model_from_bytes(data, expected_sha256)


def load_default_model() -> LoadedModel:
    """The bundled default, checked against the sha256 recorded beside it."""
    info = json.loads(DEFAULT_MODEL_INFO.read_text())
    return load_model(DEFAULT_MODEL_FILE, expected_sha256=info["sha256"])
