"""Base training on the frozen speech encoder: the cache of encoder states (built once, rebuilt
when a build was cut short, one folder per encoder, clips, variant and seed; what it holds is what
the encoder computes), the recipe end to end through `emoloop train --config`, and the linear
probe beside it. On the toy corpus and the tiny encoder (tests/learner/tiny_speech.py), the
recipe cut down to seconds."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from learner import encoder_cache
from learner import speaker_folds as speaker_folds_module
from learner.audio import decode_audio, trim_silence
from learner.checkpoint import WHISPER_KIND, load_model
from learner.corpora import CorpusClip, CorpusError
from learner.encoder_cache import build_or_load_cache, cache_key, encode_wave
from learner.inference import EmotionPredictor
from learner.linear_probe import C_GRID, fit_standardised_regression
from learner.probe_network import fit_probe_network
from learner.speaker_folds import speaker_folds
from learner.speech_encoder.weights import load_encoder
from learner.speech_training import (cached_logits, corpus_mean_ua, load_cached_splits,
                                     train_downstream)
from service import cli
from storage.files import sha256_bytes
from tests.learner.tiny_speech import (BLOCKS, bundled_tiny_encoder,  # noqa: F401
                                       tiny_encoder_bytes, tiny_encoder_file)

REPO = Path(__file__).resolve().parents[2]
LABELS = ["happy", "sad"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_encoder_file) -> dict:
    """configs/speech-training.yaml on the toy corpus and the tiny encoder, cut down to seconds."""
    config = yaml.safe_load((REPO / "configs" / "speech-training.yaml").read_text())
    config["corpora"], config["labels"] = ["toy"], LABELS
    config["split"] = {"validation_speakers": ["toy-a03"], "test_speakers": ["toy-a04"]}
    config["encoder"]["file"] = str(tiny_encoder_file[0])
    config["cache"].update(dir=str(tmp_path_factory.mktemp("encoder-states")), keep_blocks=BLOCKS)
    config["augment"]["variants"] = 2
    config["model"].update(n_blocks=BLOCKS, channels=8, lstm_hidden=8, branches=1)
    config["train"].update(epochs=2, patience=2, batch_size=4, max_frames=20, workers=1,
                           threads=1)
    config["probe"].update(blocks=BLOCKS, C=0.1)
    return config


@pytest.fixture(scope="module")
def splits(recipe, toy_corpus, tiny_encoder_file):
    """Train, validation and test clips with their states: the first build of the caches."""
    return load_cached_splits(recipe, toy_corpus, tiny_encoder_file[0], progress=False)


def _folders(root) -> set[str]:
    return {p.name for p in Path(root).iterdir()}


class EncoderRan(AssertionError):
    pass


def _no_encoder_runs(monkeypatch) -> None:
    """From here on, starting the encoder's worker pool raises EncoderRan."""
    def refuse(*args, **kwargs):
        raise EncoderRan("the encoder ran")

    monkeypatch.setattr(encoder_cache, "get_context", refuse)


def _assert_same_cache(a, b) -> None:
    for name in ("states", "offsets", "lengths", "means"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_the_cache_is_built_once_and_read_back_unchanged(recipe, toy_corpus, tiny_encoder_file,
                                                         splits, monkeypatch):
    root = Path(recipe["cache"]["dir"])
    # Complete: the clean states of every clip, and the training clips' augmented variant.
    assert len(list(root.glob("*/index.json"))) == 2
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    _no_encoder_runs(monkeypatch)

    again = load_cached_splits(recipe, toy_corpus, tiny_encoder_file[0], progress=False)

    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps  # nothing rewritten
    for first, second in zip(splits, again):
        assert [c.path for c in first.clips] == [c.path for c in second.clips]
        assert len(first.variants) == len(second.variants)
        for (cache, rows), (cache_again, rows_again) in zip(first.variants, second.variants):
            np.testing.assert_array_equal(rows, rows_again)
            _assert_same_cache(cache, cache_again)
    train, validation, test = splits
    assert {c.speaker for c in validation.clips} == {"toy-a03"}
    assert {c.speaker for c in test.clips} == {"toy-a04"}
    assert len(train.variants) == 2 and len(validation.variants) == len(test.variants) == 1


def test_another_encoder_file_variant_or_seed_is_never_read_from_the_cache(
        recipe, tiny_encoder_file, splits, tmp_path, monkeypatch):
    path, sha256 = tiny_encoder_file
    root = Path(recipe["cache"]["dir"])
    train_paths = [str(c.path) for c in splits[0].clips]
    seed, augment = int(recipe["seed"]), recipe["augment"]
    other = tmp_path / "other_encoder.safetensors"
    other.write_bytes(tiny_encoder_bytes(seed=1))
    cached = _folders(root)
    _no_encoder_runs(monkeypatch)

    # What is cached loads, also for a recipe that trains on more variants (the same states);
    # each change below runs the encoder again, into a folder of its own.
    for variants in (augment["variants"], augment["variants"] + 2):
        build_or_load_cache(root, path, sha256, train_paths, keep_blocks=BLOCKS, variant=1,
                            seed=seed, augment={**augment, "variants": variants}, workers=1,
                            progress=False)
    changes = [dict(encoder_path=other, encoder_sha256=sha256_bytes(other.read_bytes())),
               dict(variant=2), dict(seed=seed + 1), dict(keep_blocks=BLOCKS - 1),
               dict(augment={**augment, "snr_db": [20, 30]})]
    for change in changes:
        args = dict(encoder_path=path, encoder_sha256=sha256, paths=train_paths,
                    keep_blocks=BLOCKS, variant=1, seed=seed, augment=augment) | change
        before = _folders(root)
        with pytest.raises(EncoderRan):
            build_or_load_cache(root, workers=1, progress=False, **args)
        assert len(_folders(root) - before) == 1, change
    assert len(_folders(root) - cached) == len(changes)


def test_a_build_cut_short_is_rebuilt_and_gives_the_same_states(recipe, tiny_encoder_file,
                                                               splits, tmp_path):
    path, sha256 = tiny_encoder_file
    train_paths = [str(c.path) for c in splits[0].clips]
    seed, augment = int(recipe["seed"]), recipe["augment"]
    augmented = splits[0].variants[1][0]
    # As a build killed before it wrote its index.json: states and means half-written.
    folder = tmp_path / cache_key(sha256, BLOCKS, train_paths, 1, seed, augment)
    folder.mkdir()
    for name in ("states.npy", "means.npy"):
        (folder / name).write_bytes(b"\x93NUMPY half a file")

    # By two workers instead of one: which process encodes a clip cannot change its states.
    rebuilt = build_or_load_cache(tmp_path, path, sha256, train_paths, keep_blocks=BLOCKS,
                                  variant=1, seed=seed, augment=augment, workers=2, progress=False)

    assert (folder / "index.json").is_file() and _folders(tmp_path) == {folder.name}
    _assert_same_cache(rebuilt, augmented)


def test_cached_states_are_what_the_encoder_computes_for_the_trimmed_clip(
        tiny_encoder_file, splits):
    encoder = load_encoder(*tiny_encoder_file)
    test = splits[2]
    cache, rows = test.variants[0]
    assert cache.states.dtype == np.float16 and cache.states.shape[1:] == (BLOCKS, 16)
    assert int(cache.lengths.sum()) == cache.states.shape[0]
    for i in (0, len(test.clips) - 1):
        row = int(rows[i])
        wave = trim_silence(decode_audio(test.clips[i].path, max_seconds=60.0))
        expected, frames = encode_wave(encoder, wave)  # (blocks, frames, D) float32

        assert cache.lengths[row] == frames == expected.shape[1]
        assert frames < 30  # not the 38 frames of the whole 1.5 s file: its silence is trimmed off
        np.testing.assert_allclose(cache.clip(row).astype(np.float32), expected[:BLOCKS],
                                   rtol=2 ** -10, atol=1e-4)
        np.testing.assert_allclose(cache.means[row], expected.mean(axis=1), rtol=1e-4, atol=1e-5)
        # What training reads of the clip: the same states, blocks first, in float32.
        np.testing.assert_array_equal(test.states(i, 0, None, None),
                                      cache.clip(row).astype(np.float32))


def test_an_augmented_variant_differs_from_the_clean_one(splits):
    train = splits[0]
    (clean, clean_rows), (augmented, augmented_rows) = train.variants
    assert len(augmented.lengths) == len(train.clips)  # the training speakers' clips only
    for i in range(len(train.clips)):
        assert not np.array_equal(clean.clip(int(clean_rows[i])),
                                  augmented.clip(int(augmented_rows[i])))


def test_early_stopping_weighs_every_corpus_alike():
    report = {"per_corpus": {"nemo": {"unweighted_accuracy": 1.0, "n": 500},
                             "ravdess": {"unweighted_accuracy": 0.0, "n": 10}}}
    assert corpus_mean_ua(report) == 0.5


def _write_recipe(recipe: dict, folder: Path) -> Path:
    path = folder / "speech.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_emoloop_train_writes_a_model_of_the_speech_kind_the_same_for_the_same_seed(
        recipe, toy_corpus, splits, bundled_tiny_encoder, tmp_path, capsys, monkeypatch):
    # Without the probe, so that the model's validation score is its branch's kept epoch's (a
    # probe's logits join after the epoch is chosen; its own test is below).
    config = _write_recipe({k: v for k, v in recipe.items() if k != "probe"}, tmp_path)
    _no_encoder_runs(monkeypatch)  # every epoch reads the cache
    outs = [tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"]
    summaries = []
    for out in outs:
        out.parent.mkdir()
        assert cli.main(["train", "--config", str(config), "--out", str(out),
                         "--data", str(toy_corpus)]) == 0
        summaries.append(json.loads(capsys.readouterr().out))

    model = load_model(outs[0])
    assert model.kind == WHISPER_KIND and model.labels == tuple(LABELS)
    assert model.net.encoder_sha256 == bundled_tiny_encoder
    info = json.loads(outs[0].with_suffix(".json").read_text())
    assert summaries[0]["sha256"] == info["sha256"] == model.sha256
    assert info["validation"]["n"] == 8 and info["test"]["n"] == 8
    assert set(info["test"]["per_corpus"]) == {"toy"}
    assert 0 < info["trained_parameters"] < info["parameters"]  # the encoder stays frozen
    assert info["trained_parameters"] == sum(p.numel() for p in model.net.downstream.parameters())
    # The epoch kept is the one best on the validation speakers.
    assert len(info["history"]) == 2
    assert round(info["validation"]["unweighted_accuracy"], 4) == max(
        h["val_corpus_mean_ua"] for h in info["history"])
    assert summaries[1]["sha256"] == sha256_bytes(outs[1].read_bytes()) == model.sha256


def _statistics(states: np.ndarray, std: bool, deltas: bool) -> np.ndarray:
    """What a recipe's probe reads of one clip's (blocks, frames, D) states, computed apart
    from learner.linear_probe: the first BLOCKS blocks' means, then (`std`) their deviations,
    then (`deltas`) their mean absolute frame-to-frame changes."""
    states = states[:BLOCKS]
    kept = [states.mean(axis=1)] + ([states.std(axis=1)] if std else [])
    if deltas:
        kept.append(np.abs(states[:, 1:] - states[:, :-1]).mean(axis=1))
    return np.concatenate([k.reshape(-1) for k in kept])


@pytest.mark.parametrize("std,deltas,perturbed", [(False, False, False), (True, False, False),
                                                   (True, True, True)])
def test_a_recipe_with_a_probe_answers_its_branches_plus_the_weighted_probe(
        recipe, toy_corpus, splits, tiny_encoder_file, std, deltas, perturbed):
    """`probe` in the recipe: a logistic regression on the training clips' block means (with
    `std` their standard deviations over the clip, with `deltas` their mean changes from frame
    to frame) joins the branches under the same head, its logits scaled by the probe's weight;
    the branches are the ones trained without it. With `perturbed` it fits on every encoder
    pass of each training clip, not on the clean pass alone."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train, validation, _ = splits
    probe = {"blocks": BLOCKS, "C": 0.1, "weight": 0.5, "std": std, "deltas": deltas,
             "perturbed": perturbed}
    common = dict(data_dir=toy_corpus, encoder_path=tiny_encoder_file[0], progress=False)
    plain = {k: v for k, v in recipe.items() if k != "probe"}
    joined, _ = train_downstream({**plain, "probe": probe}, train, validation, **common)
    plain, _ = train_downstream(plain, train, validation, **common)
    assert (joined.config.probe_blocks, joined.config.probe_std,
            joined.config.probe_deltas) == (BLOCKS, std, deltas)

    passes = train.variants if perturbed else train.variants[:1]
    assert len(passes) == (2 if perturbed else 1)  # the recipe caches one perturbed pass
    x = np.stack([_statistics(cache.clip(int(r)).astype(np.float32), std, deltas)
                  for cache, rows in passes for r in rows])
    scaler = StandardScaler().fit(x)
    regression = LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced")
    regression.fit(scaler.transform(x), np.tile(train.targets, len(passes)))
    held = np.stack([_statistics(validation.states(i, 0, None, None), std, deltas)
                     for i in range(len(validation.clips))])
    odds = regression.decision_function(scaler.transform(held))  # two labels: one log-odds
    expected = cached_logits(plain, validation) + 0.5 * np.stack([-odds / 2, odds / 2], axis=1)
    np.testing.assert_allclose(cached_logits(joined, validation), expected, atol=1e-4)
    with pytest.raises(ValueError, match="probe.blocks"):
        train_downstream({**recipe, "probe": {**probe, "blocks": BLOCKS + 1}}, train, validation,
                         **common)


def test_a_recipe_with_a_network_probe_reads_its_hidden_units_and_fits_the_same_each_time(
        recipe, toy_corpus, splits, tiny_encoder_file):
    """`probe.hidden` in the recipe: a network of that many ReLU units on the standardised
    statistics (by the training rows' own mean and deviation) in place of the regression,
    trained on the recipe's seed: the same file on a rerun, the caller's random streams left
    as they were, and the joined answer the branches' plus the weighted network's."""
    train, validation, _ = splits
    probe = {"blocks": BLOCKS, "weight": 0.5, "std": True, "deltas": True, "perturbed": True,
             "hidden": 8, "dropout": 0.5, "epochs": 3, "batch_size": 4, "lr": 0.001,
             "weight_decay": 0.01}
    common = dict(data_dir=toy_corpus, encoder_path=tiny_encoder_file[0], progress=False)
    plain = {k: v for k, v in recipe.items() if k != "probe"}
    torch.manual_seed(0)
    joined, _ = train_downstream({**plain, "probe": probe}, train, validation, **common)
    after_one_fit = torch.rand(1)
    torch.manual_seed(0)
    again, _ = train_downstream({**plain, "probe": probe}, train, validation, **common)
    assert torch.equal(torch.rand(1), after_one_fit)  # the probe's fit drew on its own streams
    plain, _ = train_downstream(plain, train, validation, **common)
    assert joined.config.probe_hidden == 8 and joined.head.in_features == 2 * 8 + 8
    for (name, a), b in zip(joined.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name

    x = np.stack([_statistics(cache.clip(int(r)).astype(np.float32), True, True)
                  for cache, rows in train.variants for r in rows])
    np.testing.assert_allclose(joined.probe_mean.numpy(), x.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(joined.probe_scale.numpy(), x.std(axis=0), rtol=1e-4, atol=1e-5)
    held = np.stack([_statistics(validation.states(i, 0, None, None), True, True)
                     for i in range(len(validation.clips))])
    standardised = torch.from_numpy((held - x.mean(axis=0)) / x.std(axis=0)).float()
    hidden = joined.probe_hidden_weight.float() * joined.probe_hidden_scale[:, None]
    with torch.no_grad():
        units = torch.relu(standardised @ hidden.T + joined.probe_hidden_bias)
        # The head's columns for the units, and its bias less the branch's: the network's last
        # layer, weighted.
        network = units @ joined.head.weight[:, 2 * 8:].T + joined.head.bias - plain.head.bias
    expected = cached_logits(plain, validation) + network.numpy()
    np.testing.assert_allclose(cached_logits(joined, validation), expected, atol=1e-4)


def test_a_network_probe_learns_what_no_hyperplane_separates():
    """Why a hidden layer: two classes by the sign of the product of two statistics (no
    linear boundary scores above chance) are told apart by the network probe."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 2)) * np.array([1.0, 50.0])  # scales apart: it standardises
    targets = (x[:, 0] * x[:, 1] > 0).astype(np.int64)
    settings = {"hidden": 32, "dropout": 0.0, "epochs": 60, "batch_size": 64, "lr": 0.01,
                "weight_decay": 0.0}
    network = fit_probe_network(x, targets, 2, settings, seed=1)
    held = rng.normal(size=(500, 2)) * np.array([1.0, 50.0])
    with torch.no_grad():
        rows = torch.from_numpy((held - network.mean) / network.scale).float()
        answers = network.out(torch.relu(network.hidden(rows))).argmax(dim=1).numpy()
    assert np.mean(answers == (held[:, 0] * held[:, 1] > 0)) > 0.9
    regression = fit_standardised_regression(x, targets, 1.0)
    assert np.mean(regression.predict(held) == (held[:, 0] * held[:, 1] > 0)) < 0.65
    again = fit_probe_network(x, targets, 2, settings, seed=1)
    assert torch.equal(again.hidden.weight, network.hidden.weight)


def test_the_linear_probe_prints_its_reports_and_trains_nothing(recipe, toy_corpus, splits,
                                                                 tmp_path, capsys, monkeypatch):
    config = _write_recipe(recipe, tmp_path)
    before = _folders(recipe["cache"]["dir"])
    _no_encoder_runs(monkeypatch)  # the same cache as the trained downstream
    out = tmp_path / "model.safetensors"
    assert cli.main(["train", "--config", str(config), "--out", str(out),
                     "--data", str(toy_corpus), "--linear-probe", "1"]) == 0

    result = json.loads(capsys.readouterr().out)
    assert result["blocks"] == [1] and result["C"] in C_GRID
    assert result["validation"]["n"] == result["test"]["n"] == 8
    assert 0.0 <= result["test"]["unweighted_accuracy"] <= 1.0
    assert set(result["test"]["per_corpus"]) == {"toy"}
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert _folders(recipe["cache"]["dir"]) == before


def test_a_recipe_without_its_encoder_file_or_validation_speakers_is_a_clear_error(
        recipe, toy_corpus, splits, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    no_encoder = {**recipe, "encoder": {"file": str(tmp_path / "missing.safetensors")}}
    assert cli.main(["train", "--config", str(_write_recipe(no_encoder, tmp_path)),
                     "--out", str(out), "--data", str(toy_corpus)]) == 2
    assert "emoloop encoder import" in capsys.readouterr().err

    nobody = {**recipe, "split": {"validation_speakers": ["toy-a99"], "test_speakers": ["toy-a04"]}}
    assert cli.main(["train", "--config", str(_write_recipe(nobody, tmp_path)),
                     "--out", str(out), "--data", str(toy_corpus)]) == 2
    assert "0 validation clips" in capsys.readouterr().err
    assert not out.exists()


def test_a_recipe_of_two_branches_answers_the_mean_of_its_two_seeds_models(
        recipe, toy_corpus, splits, bundled_tiny_encoder, tmp_path, capsys):
    """Each branch trains on its own seed (the recipe's, then the next) in its own process: the
    file is the same on a rerun, and its logits are the mean of the one-branch models' on those
    seeds, so an ensemble is exactly what the comparison in the README measured."""
    # Clean states only: augmented variants are drawn with the recipe's seed, which a one-branch
    # run on seed + 1 would change; and no probe, whose network trains on the recipe's seed too.
    one = {**{k: v for k, v in recipe.items() if k != "probe"},
           "augment": {**recipe["augment"], "variants": 1}}
    pair = {**one, "model": {**one["model"], "branches": 2}, "train": {**one["train"], "workers": 2}}
    runs = {"pair": pair, "pair again": pair, "first": one,
            "second": {**one, "seed": one["seed"] + 1}}
    models = {}
    for name, config in runs.items():
        (tmp_path / name).mkdir()
        out = tmp_path / name / "model.safetensors"
        assert cli.main(["train", "--config", str(_write_recipe(config, tmp_path / name)),
                         "--out", str(out), "--data", str(toy_corpus)]) == 0
        capsys.readouterr()
        models[name] = load_model(out)
    assert models["pair"].sha256 == models["pair again"].sha256
    assert models["pair"].net.config.branches == 2
    info = json.loads((tmp_path / "pair" / "model.json").read_text())
    assert sorted({h["seed"] for h in info["history"]}) == [recipe["seed"], recipe["seed"] + 1]

    clips = sorted(toy_corpus.rglob("*.wav"))[:6]
    features = [models["pair"].features(decode_audio(c)) for c in clips]
    logits = {name: EmotionPredictor(m).logits_batch(features) for name, m in models.items()}
    assert not np.allclose(logits["first"], logits["second"], atol=1e-3)  # two different models
    np.testing.assert_allclose(logits["pair"], (logits["first"] + logits["second"]) / 2,
                               atol=1e-5)


def _clips(speakers: dict[str, int]) -> list[CorpusClip]:
    return [CorpusClip(path=Path(f"/{corpus}/{s}.wav"), corpus=corpus, speaker=f"{corpus}-{s}",
                       gender="", language="", emotion="happy", source_label="happy",
                       duration_s=1.0)
            for corpus, n in speakers.items() for s in range(n)]


def test_speaker_folds_hold_each_speaker_once_and_share_every_corpus_out_evenly():
    clips = _clips({"big": 7, "pair": 2, "mid": 5})
    folds = speaker_folds(clips + clips[:3], 3, seed=1)  # a speaker's many clips: still once
    everyone = [s for fold in folds for s in fold]
    assert sorted(everyone) == sorted({c.speaker for c in clips})
    for corpus, n in {"big": 7, "pair": 2, "mid": 5}.items():
        sizes = [sum(s.startswith(corpus + "-") for s in fold) for fold in folds]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert speaker_folds(clips, 3, seed=1) == speaker_folds(clips, 3, seed=1)
    assert speaker_folds(clips, 3, seed=2) != speaker_folds(clips, 3, seed=1)
    with pytest.raises(CorpusError, match="cannot fill 20 folds"):
        speaker_folds(clips, 20, seed=1)


def test_cross_validation_scores_every_training_speaker_by_a_model_that_never_heard_them(
        recipe, toy_corpus, splits, tmp_path, capsys, monkeypatch):
    """`emoloop train --folds K --seeds N` trains a downstream a fold and seed on the other
    training speakers (epoch chosen on the validation speakers; the recipe's probe fitted on
    the same speakers) and scores the fold's: every
    training clip once a seed, the test speakers never, no model file written; the figures are
    the means over the seeds, and worker processes give the same ones."""
    trained_on = []
    original = speaker_folds_module.train_branch

    def spy(config, train, validation, seed, **kwargs):
        trained_on.append((seed, {c.speaker for c in train.clips}))
        return original(config, train, validation, seed, **kwargs)

    monkeypatch.setattr(speaker_folds_module, "train_branch", spy)
    probed_on = []
    original_probe = speaker_folds_module.fit_block_mean_probe

    def probe_spy(train, probe, labels, seed):
        probed_on.append({c.speaker for c in train.clips})
        return original_probe(train, probe, labels, seed)

    monkeypatch.setattr(speaker_folds_module, "fit_block_mean_probe", probe_spy)
    _no_encoder_runs(monkeypatch)  # the recipe's own cache
    out = tmp_path / "model.safetensors"
    results = []
    for workers in (1, 2):
        config = {**recipe, "train": {**recipe["train"], "workers": workers}}
        assert cli.main(["train", "--config", str(_write_recipe(config, tmp_path)),
                         "--out", str(out), "--data", str(toy_corpus), "--folds", "2",
                         "--seeds", "2"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    result = results[0]
    seeds = [recipe["seed"], recipe["seed"] + 1]
    assert result["seeds"] == seeds and [f["seed"] for f in result["per_fold"]] == [
        seeds[0], seeds[0], seeds[1], seeds[1]]
    training = {c.speaker for c in splits[0].clips}
    held_out = [set(f["speakers"]) for f in result["per_fold"]]
    assert held_out[:2] == held_out[2:]  # the same folds for every seed
    assert sorted(s for fold in held_out[:2] for s in fold) == sorted(training)
    # In this process only when workers is 1: each fold's model heard exactly the others.
    assert [(seed, heard) for seed, heard in trained_on] == [
        (f["seed"], training - fold) for f, fold in zip(result["per_fold"], held_out)]
    assert probed_on == [heard for _, heard in trained_on]  # the probe: the same speakers
    assert result["clips"] == len(splits[0].clips) == sum(
        f["clips"] for f in result["per_fold"] if f["seed"] == seeds[0])
    assert result["held_out_per_corpus"]["toy"]["clips"] == len(splits[0].clips)
    per_seed = [s["held_out_corpus_mean_ua"] for s in result["per_seed"]]
    assert result["held_out_corpus_mean_ua"] == pytest.approx(np.mean(per_seed), abs=1e-4)
    assert results[1] == result
    assert not out.exists()

    for bad in (["--folds", "1"], ["--folds", "0"], ["--folds", "2", "--seeds", "0"]):
        code = cli.main(["train", "--config", str(_write_recipe(recipe, tmp_path)),
                         "--out", str(out), "--data", str(toy_corpus), *bad])
        assert code == 2 and "--folds must be at least 2" in capsys.readouterr().err
    alone = cli.main(["train", "--config", str(_write_recipe(recipe, tmp_path)),
                      "--out", str(out), "--data", str(toy_corpus), "--seeds", "2"])
    assert alone == 2 and "--seeds goes with --folds" in capsys.readouterr().err
    too_many = cli.main(["train", "--config", str(_write_recipe(recipe, tmp_path)),
                         "--out", str(out), "--data", str(toy_corpus), "--folds", "3"])
    assert too_many == 2 and "2 training speakers cannot fill 3 folds" in capsys.readouterr().err
    assert not out.exists()


def test_cross_validation_pools_every_seeds_answers(recipe, toy_corpus, splits, monkeypatch):
    """The figures over seeds are their means, each seed's beside them: where one seed's models
    answer every held-out clip right and the other's every one wrong, half are right (the toy
    models above sit at chance on both seeds, so they cannot show this). The training is stood
    in for here; the test above runs it."""
    labels = tuple(recipe["labels"])

    def answers(config, train, validation, fold, seed):
        rows = np.array([i for i, c in enumerate(train.clips) if c.speaker in set(fold)])
        truth = train.targets[rows]
        logits = np.zeros((len(rows), len(labels)), dtype=np.float32)
        logits[np.arange(len(rows)), truth if seed == recipe["seed"] else 1 - truth] = 5.0
        return rows, logits, [{"epoch": 1, "val_corpus_mean_ua": 0.5}]

    monkeypatch.setattr(speaker_folds_module, "_held_out_logits", answers)
    config = {**recipe, "train": {**recipe["train"], "workers": 1}}
    result = speaker_folds_module.cross_validate(config, toy_corpus, Path(recipe["encoder"]["file"]),
                                                 folds=2, seeds=2, progress=False)
    assert [s["held_out_corpus_mean_ua"] for s in result["per_seed"]] == [1.0, 0.0]
    assert [f["held_out_corpus_mean_ua"] for f in result["per_fold"]] == [1.0, 1.0, 0.0, 0.0]
    assert result["held_out_corpus_mean_ua"] == 0.5
    assert result["held_out_per_corpus"] == {
        "toy": {"clips": len(splits[0].clips), "accuracy": 0.5, "unweighted_accuracy": 0.5}}
