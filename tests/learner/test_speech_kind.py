"""The second kind of model, the CNN-BiLSTM on the frozen speech encoder, through everything the
log-mel kind goes through: its file, inference on its own features, its own base sets beside the
log-mel kind's, a learning round that trains its downstream only, and a personal head on its
embedding. On a tiny encoder
(tests/learner/tiny_speech.py), never the real Whisper file."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

import learner.checkpoint as checkpoint
from learner.checkpoint import (LOGMEL_KIND, WHISPER_KIND, LoadedModel, ModelFileError,
                                bundled_encoder, model_bytes, model_from_bytes)
from learner.continual.base_sets import BaseSetError, load_base_set
from learner.continual.ewc_state import EwcState
from learner.continual.rounds import run_round
from learner.file_metadata import read_metadata
from learner.inference import EmotionPredictor, pad_batch
from learner.personal.model import (PersonalPredictor, as_stored, embed_batch,
                                    personal_head_bytes, personal_head_from_bytes)
from learner.personal.rounds import run_personal_rounds
from learner.serving_net import for_serving
from learner.speech_encoder import weights
from learner.speech_encoder.weights import load_encoder
from learner.speech_encoder.whisper_mel import extract_speech_features
from learner.speech_model import ADAPTABLE, ADAPTABLE_SIDE_BY_SIDE, SpeechEmotionModel
from service import cli
from storage.files import sha256_bytes
from storage.registry import ModelRegistry
from tests.learner.tiny_speech import (TINY_SOURCE_TEXT, bundled_tiny_encoder,  # noqa: F401
                                       speech_world, tiny_ct2, tiny_encoder_file,
                                       tiny_speech_model, toy_speech_base_sets, toy_speech_model)
from tests.learner.test_personal_rounds import PERSONAL, correct
from tests.learner.toy_learning import (TOY_LABELS, make_world, toy_base_sets,  # noqa: F401
                                        toy_features, toy_model, toy_wave, write_toy_base_sets)

sqlite_only = pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)


def _clips() -> list[np.ndarray]:
    return [toy_features(label, 50 + k, WHISPER_KIND) for k, label in enumerate(TOY_LABELS * 2)]


@pytest.mark.parametrize("branches", [1, 2])
def test_its_file_holds_the_downstream_only_and_loads_with_the_same_outputs(
        branches, tiny_encoder_file, bundled_tiny_encoder):
    net = tiny_speech_model(tiny_encoder_file, branches=branches).eval()
    data = model_bytes(net, TOY_LABELS)

    assert set(load_safetensors(data)) == set(net.downstream.state_dict())  # no encoder tensor
    metadata = read_metadata(data)
    assert (metadata["kind"], metadata["encoder_sha256"]) == (WHISPER_KIND, bundled_tiny_encoder)
    loaded = model_from_bytes(data)
    assert (loaded.kind, loaded.labels) == (WHISPER_KIND, TOY_LABELS)
    assert isinstance(loaded.net, SpeechEmotionModel)
    assert loaded.net.downstream.config.branches == branches
    x, lengths = pad_batch(_clips())
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(x, lengths), net(x, lengths))
    # Every version of the kind reads the one loaded encoder.
    assert model_from_bytes(data).net.encoder is loaded.net.encoder

    # It is served as it is, and answers a wave from its own features.
    served = EmotionPredictor(for_serving(loaded))
    assert served.model.kind == WHISPER_KIND
    wave = toy_wave("happy", 7)
    assert served.predict_wave(wave) == served.predict_features(extract_speech_features(wave))


def test_a_model_naming_another_encoder_is_refused_whole(tiny_encoder_file, bundled_tiny_encoder):
    path, sha256 = tiny_encoder_file
    net = tiny_speech_model(tiny_encoder_file)
    foreign = SpeechEmotionModel(net.encoder, net.downstream, encoder_sha256="0" * 64)
    with pytest.raises(ModelFileError, match="no encoder file"):
        model_from_bytes(model_bytes(foreign, TOY_LABELS))
    assert bundled_encoder.cache_info().currsize == 0  # nothing of it kept
    model_from_bytes(model_bytes(net, TOY_LABELS))  # the right one still loads


def test_a_version_on_an_encoder_no_longer_shipped_loads_once_that_encoder_is_imported_again(
        tiny_encoder_file, tmp_path, monkeypatch):
    """An upgrade that ships another default encoder leaves a store's older versions naming the
    earlier one: they are refused, whole, with a message saying what to import, and the import
    (no --out) writes the file where they find it."""
    ct2 = tmp_path / "model.bin"
    ct2.write_bytes(tiny_ct2())
    source = sha256_bytes(ct2.read_bytes())
    monkeypatch.setitem(weights.PINNED_SOURCES, source, TINY_SOURCE_TEXT)
    monkeypatch.setitem(weights.IMPORT_FILE_NAMES, source, "earlier_encoder.safetensors")
    shipped = tmp_path / "default_model"  # this release's files: another encoder only
    shipped.mkdir()
    (shipped / "whisper_tiny_en_encoder.safetensors").write_bytes(b"this release's encoder")
    monkeypatch.setattr(checkpoint, "ENCODER_DIR", shipped)
    bundled_encoder.cache_clear()
    older = model_bytes(tiny_speech_model(tiny_encoder_file), TOY_LABELS)

    with pytest.raises(ModelFileError, match="emoloop encoder import"):
        model_from_bytes(older)
    assert cli.main(["encoder", "import", str(ct2), "--blocks", "2"]) == 0
    assert (shipped / "earlier_encoder.safetensors").read_bytes() == tiny_encoder_file[0].read_bytes()
    assert model_from_bytes(older).net.encoder_sha256 == tiny_encoder_file[1]
    bundled_encoder.cache_clear()


@pytest.fixture(scope="session")
def both_kinds_base_sets(tmp_path_factory) -> Path:
    """One folder with the toy base sets of both kinds, as the default model's folder ships
    them once the default changes kind."""
    folder = tmp_path_factory.mktemp("both_kinds_base_sets")
    write_toy_base_sets(folder, LOGMEL_KIND)
    return write_toy_base_sets(folder, WHISPER_KIND)


def test_base_sets_of_both_kinds_live_side_by_side(both_kinds_base_sets):
    # The log-mel kind's files keep the names the shipped sets always had.
    assert sorted(p.name for p in both_kinds_base_sets.iterdir()) == [
        "base_gate.safetensors", "base_gate.whisper-cnn-bilstm.safetensors",
        "base_replay.safetensors", "base_replay.whisper-cnn-bilstm.safetensors",
        "base_sets.json", "base_sets.whisper-cnn-bilstm.json"]
    for kind in (LOGMEL_KIND, WHISPER_KIND):
        width = toy_features("happy", 0, kind).shape[1]  # 64 log-mel bands, 80 Whisper ones
        for name in ("replay", "gate"):
            loaded = load_base_set(name, both_kinds_base_sets, kind=kind)
            assert len(loaded) > 0 and {f.shape[1] for f in loaded.features} == {width}


def test_base_sets_of_another_kind_are_refused(toy_base_sets, tmp_path):
    with pytest.raises(BaseSetError, match="whisper-cnn-bilstm base sets .* are missing"):
        load_base_set("gate", toy_base_sets, kind=WHISPER_KIND)  # log-mel sets only
    # A file named for the speech kind that holds log-mel features is refused too.
    for theirs, ours in (("base_gate.safetensors", "base_gate.whisper-cnn-bilstm.safetensors"),
                         ("base_sets.json", "base_sets.whisper-cnn-bilstm.json")):
        shutil.copy(toy_base_sets / theirs, tmp_path / ours)
    with pytest.raises(BaseSetError, match="rebuild"):
        load_base_set("gate", tmp_path, kind=WHISPER_KIND)


@sqlite_only
@pytest.mark.parametrize("kind", [LOGMEL_KIND, WHISPER_KIND])
def test_rounds_of_each_kind_read_their_own_base_sets(kind, request, session_factory, tmp_path,
                                                       both_kinds_base_sets):
    if kind == WHISPER_KIND:
        request.getfixturevalue("bundled_tiny_encoder")
    model = request.getfixturevalue("toy_speech_model" if kind == WHISPER_KIND else "toy_model")
    world = make_world(session_factory, tmp_path, model, both_kinds_base_sets)
    world.feedback(["happy", "sad"] * 6)
    outcome = run_round(world.session_factory, world.artifacts, world.settings)

    assert outcome.status in ("accepted", "rejected"), outcome.gate_report
    # All of its kind's toy sets (the first round's gate has no earlier held-out feedback); a
    # set of the other kind's features would have been refused, leaving nothing.
    assert (outcome.counts["gate_set"], outcome.counts["replay_buffer"]) == (16, 8)


@sqlite_only
def test_a_round_trains_the_downstream_only_and_registers_a_version_of_the_kind(
        speech_world, tiny_encoder_file):
    world = speech_world
    world.feedback(["happy", "sad"] * 6)
    outcome = run_round(world.session_factory, world.artifacts, world.settings)

    assert outcome.status == "accepted", outcome.gate_report
    assert outcome.counts["gate_set"] > 0 and outcome.counts["replay_buffer"] > 0  # its base sets
    with world.session_factory() as session:
        registry = ModelRegistry(session, world.artifacts)
        row, active = registry.get(outcome.candidate_version), registry.active_global()
    assert active.version == row.version == 2
    model = model_from_bytes(world.artifacts.read_model(row.artifact_path, row.sha256),
                             expected_sha256=row.sha256)
    assert model.kind == WHISPER_KIND and model.labels == TOY_LABELS
    path, sha256 = tiny_encoder_file
    assert model.net.encoder is bundled_encoder(sha256)
    # The encoder every version shares came out of the round as it was loaded.
    for name, tensor in load_encoder(path, sha256).state_dict().items():
        torch.testing.assert_close(model.net.encoder.state_dict()[name], tensor, msg=name)
    # The EWC state handed to the next round covers the trained downstream, nothing more.
    state = EwcState.from_bytes(world.artifacts.read_checked(row.state_path, row.state_sha256))
    assert all(name.startswith("net.downstream.") for name in state.anchor)
    assert sum(t.numel() for t in state.anchor.values()) == sum(
        p.numel() for p in model.net.downstream.parameters())
    # The probe's scaler and hidden layer, fitted once by the recipe, are read, not trained.
    parent = _net_of(world, 1).downstream.state_dict()
    probe = {k: v for k, v in model.net.downstream.state_dict().items() if k.startswith("probe_")}
    assert set(probe) == {"probe_mean", "probe_scale", "probe_hidden_weight",
                          "probe_hidden_scale", "probe_hidden_bias"}
    for name, tensor in probe.items():
        assert torch.equal(tensor, parent[name]), name
    assert bool((_net_of(world, 1).downstream.probe_hidden_weight != 0).any())


def _net_of(world, version: int) -> SpeechEmotionModel:
    with world.session_factory() as session:
        row = ModelRegistry(session, world.artifacts).get(version)
    return model_from_bytes(world.artifacts.read_model(row.artifact_path, row.sha256),
                            expected_sha256=row.sha256).net


def _is_input_layer(name: str) -> bool:
    return bool({"in_norm", "project", "block_logits"} & set(name.split(".")))


def test_a_round_with_frozen_input_layers_trains_the_rest_and_keeps_the_state_of_the_rest(
        speech_world):
    world = speech_world
    world.settings = world.settings.model_copy(update={"freeze_input_layers": True})
    world.feedback(["happy", "sad"] * 6)
    outcome = run_round(world.session_factory, world.artifacts, world.settings)

    before = _net_of(world, 1).downstream.state_dict()
    after = _net_of(world, outcome.candidate_version).downstream.state_dict()
    inputs = [name for name in before if _is_input_layer(name)]
    assert inputs and all(torch.equal(before[name], after[name]) for name in inputs)
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert any(not torch.equal(before[name], after[name]) for name in before
               if "lstm" in name)
    # The next round's EWC state weighs what rounds train, not the frozen layers.
    with world.session_factory() as session:
        row = ModelRegistry(session, world.artifacts).get(outcome.candidate_version)
    state = EwcState.from_bytes(world.artifacts.read_checked(row.state_path, row.state_sha256))
    assert state.anchor and not any(_is_input_layer(name) for name in state.anchor)


def test_an_ewc_state_of_every_layer_still_anchors_a_round_that_freezes_the_input_layers(
        speech_world):
    from learner.continual.strategies import _fits, trainable_copy

    start = _net_of(speech_world, 1)
    every = trainable_copy(start, speech_world.settings)
    frozen = trainable_copy(start, speech_world.settings.model_copy(
        update={"freeze_input_layers": True}))
    names = [name for name, _ in every.named_parameters()]
    assert {name for name, _ in frozen.named_parameters()} == {
        name for name in names if not _is_input_layer(name)}
    state = EwcState(importances={name: torch.ones(1) for name in names},
                     anchor={name: torch.ones(1) for name in names})
    assert _fits(state, every) and _fits(state, frozen)
    state.importances.pop(names[-1])  # a state lacking a trained layer anchors nothing
    assert not _fits(state, every)


@pytest.mark.parametrize("branches, block_mix", [(1, "sum"), (2, "sum"), (2, "concat")])
def test_a_personal_version_runs_on_its_embedding_through_its_own_input_layers(
        branches, block_mix, tiny_encoder_file, bundled_tiny_encoder):
    net = tiny_speech_model(tiny_encoder_file, branches=branches, block_mix=block_mix).eval()
    global_model = model_from_bytes(model_bytes(net, TOY_LABELS))
    torch.manual_seed(1)
    head_layer = torch.nn.Linear(global_model.net.head.in_features, len(TOY_LABELS))
    own = dict(global_model.net.downstream.named_parameters())
    adaptable = global_model.net.downstream.adaptable  # every branch's input layers
    own_layers = ADAPTABLE if block_mix == "sum" else ADAPTABLE_SIDE_BY_SIDE
    assert adaptable == tuple(f"branches.{k}.{name}" if branches > 1 else name
                              for k in range(branches) for name in own_layers)
    adapter = as_stored({k: own[k].detach() + 0.5 * torch.randn(own[k].shape) for k in adaptable})
    data = personal_head_bytes(head_layer, TOY_LABELS, parent_version=2,
                               parent_sha256=global_model.sha256, parent_kind=global_model.kind,
                               adapter=adapter)
    assert read_metadata(data)["features"] == read_metadata(model_bytes(net, TOY_LABELS))["features"]
    predictor = PersonalPredictor(EmotionPredictor(global_model), personal_head_from_bytes(data))

    clips = _clips()
    with torch.no_grad():
        expected = head_layer(embed_batch(global_model.net, clips, adapter=adapter)).numpy()
        parents_layers = head_layer(embed_batch(global_model.net, clips)).numpy()
    assert np.allclose(predictor.logits_batch(clips), expected, atol=1e-5)
    assert np.allclose(predictor.logits(clips[0]), expected[0], atol=1e-5)
    assert not np.allclose(expected, parents_layers, atol=1e-3)  # its own layers, not the parent's
    # The network other requests share is left as it was.
    for name, tensor in own.items():
        torch.testing.assert_close(global_model.net.downstream.state_dict()[name], tensor)
    wave = toy_wave("sad", 3)
    assert predictor.predict_wave(wave) == predictor.predict_features(extract_speech_features(wave))

    other = LoadedModel(global_model.net, TOY_LABELS, sha256="b" * 64, kind=WHISPER_KIND)
    with pytest.raises(ModelFileError, match="trained on a global model"):
        PersonalPredictor(EmotionPredictor(other), personal_head_from_bytes(data))
    norm = adaptable[own_layers.index("in_norm.weight")]
    misfit = dict(adapter, **{norm: adapter[norm][..., :-1]})
    data = personal_head_bytes(head_layer, TOY_LABELS, parent_version=2,
                               parent_sha256=global_model.sha256, parent_kind=global_model.kind,
                               adapter=misfit)
    with pytest.raises(ModelFileError, match="input layers do not fit"):
        PersonalPredictor(EmotionPredictor(global_model), personal_head_from_bytes(data))


@sqlite_only
def test_a_personal_round_on_the_kind_refits_the_input_layers_and_head_only(speech_world):
    world = speech_world
    correct(world, "alice", [(toy_wave(label, 300 + i), label)
                             for label in ("happy", "sad") for i in range(6)])
    [outcome] = run_personal_rounds(world.session_factory, world.artifacts, world.settings,
                                    PERSONAL, trigger="manual")

    assert outcome.status in ("accepted", "rejected"), outcome.error
    with world.session_factory() as session:
        registry = ModelRegistry(session, world.artifacts)
        row, parent = registry.get(outcome.candidate_version), registry.active_global()
        global_model = model_from_bytes(world.artifacts.read_model(parent.artifact_path,
                                                                   parent.sha256))
        personal = personal_head_from_bytes(world.artifacts.read_model(row.artifact_path,
                                                                       row.sha256))
    own = dict(global_model.net.downstream.named_parameters())
    # The toy model has two branches reading the blocks side by side, as the default.
    branches = global_model.net.downstream.branches
    assert set(personal.adapter) == {f"branches.{k}.{name}" for k in range(len(branches))
                                     for name in ADAPTABLE_SIDE_BY_SIDE}
    for k in range(len(branches)):  # every branch re-fitted to her voice
        assert any(not torch.allclose(personal.adapter[f"branches.{k}.{name}"].float(),
                                      own[f"branches.{k}.{name}"].detach(), atol=1e-3)
                   for name in ADAPTABLE_SIDE_BY_SIDE)
    assert personal.adapter["branches.0.in_norm.weight"].dtype == torch.float16  # as kept
    # Served through its own layers, as stored.
    predictor = PersonalPredictor(EmotionPredictor(global_model), personal)
    clips = [extract_speech_features(toy_wave("happy", 900 + i)) for i in range(3)]
    with torch.no_grad():
        expected = personal.logits(embed_batch(global_model.net, clips,
                                               adapter=personal.input_layers())).numpy()
    assert np.allclose(predictor.logits_batch(clips), expected, atol=1e-5)
