"""Model files: round trip, checksum, corrupt files, and the bundled default."""
import json

import numpy as np
import pytest
import torch

from learner.checkpoint import (DEFAULT_MODEL_DIR, DEFAULT_MODEL_FILE, DEFAULT_MODEL_INFO,
                                ModelFileError, encoder_file_for, load_default_model, load_model,
                                model_bytes, model_from_bytes, save_model)
from learner.file_metadata import read_metadata
from learner.inference import EmotionPredictor
from learner.labels import DEFAULT_LABELS
from learner.model import EmotionNet, ModelConfig
from service.bench.clips import voiced_clip


def test_saved_model_loads_with_identical_outputs_and_checksum(tmp_path):
    torch.manual_seed(0)
    net = EmotionNet(ModelConfig()).eval()
    digest = save_model(net, DEFAULT_LABELS, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors", expected_sha256=digest)
    assert loaded.labels == DEFAULT_LABELS and loaded.sha256 == digest
    x, lengths = torch.randn(2, 90, 64), torch.tensor([90, 60])
    torch.testing.assert_close(loaded.net(x, lengths), net(x, lengths))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left


def test_the_same_model_always_gives_the_same_bytes():
    # A retrained identical model must get the same sha256 (safetensors alone writes several
    # metadata entries in no fixed order).
    torch.manual_seed(0)
    net = EmotionNet(ModelConfig()).eval()
    files = {model_bytes(net, DEFAULT_LABELS) for _ in range(8)}
    assert len(files) == 1
    assert model_from_bytes(files.pop()).labels == DEFAULT_LABELS


def test_checksum_mismatch_and_corrupt_files_are_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    digest = save_model(EmotionNet(ModelConfig()), DEFAULT_LABELS, path)
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(path, expected_sha256="0" * 64)
    path.write_bytes(path.read_bytes()[:1000])  # truncated, as after a crash mid-copy
    with pytest.raises(ModelFileError):
        load_model(path)
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(path, expected_sha256=digest)
    with pytest.raises(ModelFileError, match="cannot read"):
        load_model(tmp_path / "missing.safetensors")


def test_bundled_model_files_fit_the_package_bound():
    """Model, encoder, replay and gate sets of every kind shipped: at most 50 MB in all."""
    sizes = {f.name: f.stat().st_size for f in DEFAULT_MODEL_DIR.glob("*.safetensors")}
    encoder = encoder_file_for(read_metadata(DEFAULT_MODEL_FILE.read_bytes())["encoder_sha256"])
    assert {DEFAULT_MODEL_FILE.name, encoder.name} <= set(sizes)
    assert sum(sizes.values()) <= 50 * 1000 * 1000, sizes


def test_bundled_default_model_is_small_checked_and_answers_every_label():
    info = json.loads(DEFAULT_MODEL_INFO.read_text())
    assert DEFAULT_MODEL_FILE.stat().st_size <= 20 * 1024 * 1024
    predictor = EmotionPredictor(load_default_model())
    assert predictor.model.sha256 == info["sha256"]
    assert predictor.labels == DEFAULT_LABELS
    prediction = predictor.predict_wave(voiced_clip(2.0))  # on its own kind's features
    assert set(prediction.probabilities) == set(DEFAULT_LABELS)
    assert abs(sum(prediction.probabilities.values()) - 1.0) < 1e-5
    assert prediction.emotion == max(prediction.probabilities, key=prediction.probabilities.get)
    restricted = predictor.predict_features(predictor.model.features(voiced_clip(2.0)),
                                            allowed=("sad", "angry"))
    assert restricted.emotion in ("sad", "angry")
    assert np.isclose(sum(restricted.probabilities.values()), 1.0)


@pytest.mark.parametrize("text", [None, "{not json", '{"labels": []}'])
def test_a_missing_or_unreadable_model_json_is_no_bundled_model_and_a_clear_error(
        tmp_path, monkeypatch, text):
    from learner import checkpoint

    info = tmp_path / "model.json"
    if text is not None:
        info.write_text(text)
    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL_INFO", info)
    assert checkpoint.bundled_model_info() is None
    with pytest.raises(ModelFileError, match="missing or unreadable"):
        checkpoint.load_default_model()
