"""What a personal version holds, what it costs on disk, and that it only ever runs on the global
network it was trained on."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from learner.checkpoint import FEATURES_BY_KIND, LoadedModel, ModelFileError
from learner.inference import EmotionPredictor
from learner.labels import DEFAULT_LABELS
from learner.model import EmotionNet, ModelConfig
from learner.file_metadata import save_with_metadata
from learner.personal.model import (CorrectionMemory, PersonalPredictor, personal_head_bytes,
                                    personal_head_from_bytes)


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



def memory_of(embeddings: torch.Tensor, labels: list[int], size: int = 200) -> CorrectionMemory:
    return CorrectionMemory.of(embeddings, torch.tensor(labels), weight=0.5, threshold=0.7,
                               neighbours=3, size=size)


def test_the_memory_answers_clips_like_a_correction_and_leaves_other_clips_to_the_head():
    torch.manual_seed(3)
    head = personal_head()
    corrected = torch.randn(6, 256)
    memory = memory_of(corrected, [2] * 3 + [5] * 3)
    with torch.no_grad():
        own = head(corrected)
    # A clip that is (nearly) one of the corrected ones: half the answer is the memory's vote.
    near = corrected[:1] + 0.01 * torch.randn(1, 256)
    probabilities = torch.exp(memory.blend(head(near).detach(), near))
    assert probabilities[0, 2] >= 0.5 and torch.isclose(probabilities.sum(), torch.tensor(1.0))
    # A clip unlike every correction (cosine similarity below 0.7): the head's answer alone.
    far = torch.randn(1, 256)
    assert float((nn_cosine(far, corrected)).max()) < 0.7
    assert torch.allclose(memory.blend(head(far).detach(), far),
                          torch.log_softmax(head(far).detach(), dim=1), atol=1e-6)
    # Each corrected clip itself is answered with the label it was given, whatever the head says.
    assert memory.blend(own, corrected).argmax(dim=1).tolist() == [2] * 3 + [5] * 3


def nn_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T


def test_a_version_with_its_memory_round_trips_and_stays_small(global_model):
    torch.manual_seed(4)
    memory = memory_of(torch.randn(300, 256), [i % 8 for i in range(300)], size=200)
    assert len(memory.labels) == 200 and memory.labels[0] == 100 % 8  # the newest 200
    data = personal_head_bytes(personal_head(), DEFAULT_LABELS, parent_version=3,
                               parent_sha256=global_model.sha256,
                               parent_kind=global_model.kind, memory=memory)
    assert len(data) <= 120_000  # 200 corrections of 512 bytes, the head, the metadata
    loaded = personal_head_from_bytes(data).memory
    assert torch.equal(loaded.labels, memory.labels)
    assert torch.allclose(loaded.embeddings, memory.embeddings, atol=1e-3)  # float16 on disk
    assert (loaded.weight, loaded.threshold, loaded.neighbours) == (0.5, 0.7, 3)


@pytest.mark.parametrize("kind", ["personal-head-v1", "personal-head-v2"])
def test_a_version_written_by_an_earlier_release_still_serves_as_a_head(global_model, kind):
    head_layer = personal_head()
    state = {"weight": head_layer.weight.detach().clone(),
             "bias": head_layer.bias.detach().clone()}
    data = save_with_metadata(state, {
        "kind": kind, "labels": json.dumps(list(DEFAULT_LABELS)),
        "parent_version": "3", "parent_sha256": global_model.sha256,
        "features": FEATURES_BY_KIND[global_model.kind]})
    head = personal_head_from_bytes(data)
    assert head.memory is None and head.adapter is None
    clip = np.random.default_rng(0).standard_normal((120, 64)).astype(np.float32)
    with torch.no_grad():
        expected = head_layer(global_model.net.embed(torch.from_numpy(clip)[None],
                                                     torch.tensor([120])))[0].numpy()
    assert np.allclose(PersonalPredictor(EmotionPredictor(global_model), head).logits(clip),
                       expected, atol=1e-5)


def test_a_memory_that_does_not_fit_its_head_is_refused(global_model):
    memory = memory_of(torch.randn(4, 256), [0, 1, 2, 9])  # label 9: the head has 8
    data = personal_head_bytes(personal_head(), DEFAULT_LABELS, parent_version=3,
                               parent_sha256=global_model.sha256,
                               parent_kind=global_model.kind, memory=memory)
    with pytest.raises(ModelFileError, match="memory"):
        personal_head_from_bytes(data)


def test_on_a_parent_with_a_probe_the_memory_keeps_and_compares_the_branches_part_alone():
    """The probe's block statistics follow the branches' embedding in what the head reads; the
    memory keeps the branches' part only, so a clip said the same way is recognised whatever
    its statistics do, and a full memory stays within the 1 MB a version may take."""
    from learner.personal.model import memory_width
    from learner.speech_model import DownstreamConfig, build_downstream

    config = DownstreamConfig(n_blocks=2, width=96, channels=8, conv_layers=1, lstm_hidden=8,
                              branches=2, block_mix="concat", probe_blocks=2, probe_std=True,
                              probe_deltas=True)
    net = build_downstream(config)
    branches = 2 * 2 * 8
    assert net.head.in_features == branches + 3 * 2 * 96
    assert memory_width(net) == branches
    # A network probe's hidden units, in place of the statistics: still the branches' part.
    network = build_downstream(replace(config, probe_hidden=16))
    assert network.head.in_features == branches + 16 and memory_width(network) == branches
    torch.manual_seed(5)
    corrected = torch.randn(4, net.head.in_features)
    memory = CorrectionMemory.of(corrected, torch.tensor([3, 3, 6, 6]), weight=0.5,
                                 threshold=0.7, neighbours=3, size=100,
                                 width=memory_width(net))
    assert memory.embeddings.shape == (4, branches)
    # The first correction's voice, its statistics elsewhere: the memory still speaks.
    again = torch.cat([corrected[:1, :branches], torch.randn(1, net.head.in_features - branches)],
                      dim=1)
    assert float(torch.exp(memory.blend(torch.zeros(1, 8), again))[0, 3]) >= 0.5
    head = torch.nn.Linear(net.head.in_features, 8)
    full = CorrectionMemory.of(torch.randn(100, net.head.in_features),
                               torch.arange(100) % 8, weight=0.5, threshold=0.7,
                               neighbours=3, size=100, width=memory_width(net))
    data = personal_head_bytes(head, DEFAULT_LABELS, parent_version=3, parent_sha256="c" * 64,
                               parent_kind="whisper-cnn-bilstm", memory=full)
    assert len(data) < 100 * branches * 2 + head.weight.numel() * 4 + 4_000
    loaded = personal_head_from_bytes(data).memory
    assert loaded.width == branches
    assert torch.allclose(loaded.embeddings, full.embeddings, atol=1e-3)
