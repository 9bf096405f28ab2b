"""What a personal version holds, what it costs on disk, and that it only ever runs on the global
network it was trained on."""
import numpy as np
import pytest
import torch

from learner.checkpoint import LoadedModel, ModelFileError
from learner.inference import EmotionPredictor
from learner.labels import DEFAULT_LABELS
from learner.model import EmotionNet, ModelConfig
from learner.personal.model import PersonalPredictor, personal_head_bytes, personal_head_from_bytes


@pytest.fixture(scope="module")
def global_model() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel(EmotionNet(ModelConfig()).eval(), DEFAULT_LABELS, sha256="a" * 64)


def personal_head(seed: int = 1) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(256, len(DEFAULT_LABELS))


def test_a_personal_version_of_the_full_size_model_is_a_few_kilobytes(global_model):
    data = personal_head_bytes(personal_head(), DEFAULT_LABELS, parent_version=3,
                               parent_sha256=global_model.sha256, parent_kind=global_model.kind)
    assert len(data) <= 16_000  # the issue allows 1 MB; the head and its metadata need ~9 KB
    head = personal_head_from_bytes(data)
    assert (head.parent_version, head.parent_sha256, head.labels) == (
        3, global_model.sha256, DEFAULT_LABELS)


def test_a_damaged_or_foreign_file_is_refused(global_model):
    data = personal_head_bytes(personal_head(), DEFAULT_LABELS, parent_version=3,
                               parent_sha256=global_model.sha256, parent_kind=global_model.kind)
    from storage.files import sha256_bytes

    with pytest.raises(ModelFileError, match="checksum"):
        personal_head_from_bytes(data[:-1] + b"\x00", expected_sha256=sha256_bytes(data))
    with pytest.raises(ModelFileError):
        personal_head_from_bytes(b"not safetensors at all")
    from learner.checkpoint import model_bytes

    with pytest.raises(ModelFileError, match="not a personal model"):
        personal_head_from_bytes(model_bytes(global_model.net, DEFAULT_LABELS))


def test_the_head_runs_on_its_own_global_network_only(global_model):
    head_layer = personal_head()
    head = personal_head_from_bytes(personal_head_bytes(
        head_layer, DEFAULT_LABELS, parent_version=3, parent_sha256=global_model.sha256,
        parent_kind=global_model.kind))
    predictor = PersonalPredictor(EmotionPredictor(global_model), head)
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal((frames, 64)).astype(np.float32) for frames in (90, 160, 230)]
    with torch.no_grad():
        expected = [head_layer(global_model.net.embed(torch.from_numpy(c)[None],
                                                      torch.tensor([len(c)])))[0].numpy()
                    for c in clips]
    assert np.allclose(predictor.logits_batch(clips), np.stack(expected), atol=1e-5)
    assert np.allclose(predictor.logits(clips[0]), expected[0], atol=1e-5)

    other = LoadedModel(global_model.net, DEFAULT_LABELS, sha256="b" * 64, kind=global_model.kind)
    with pytest.raises(ModelFileError, match="trained on a global model"):
        PersonalPredictor(EmotionPredictor(other), head)

