"""What a round computes once on the frozen encoder and shares: the gate's two models read one
pass of the encoder over the gate set and the held-out feedback, training reads each clip's
states computed once a round, and a round's second candidate (learner.bolder refused) reads
the states its first one computed. Both change only the time a round takes: on the bundled int8
encoder and real speech (clips of the shipped base sets, seeded), the gate's answers are bit for
bit those of each model run whole, and what training reads is what serving computes."""
import copy
import math

import numpy as np
import torch

from learner.checkpoint import WHISPER_KIND, LoadedModel, load_default_model
from learner.continual.avalanche_model import (MaskedInputNet, as_float_tensor,
                                               copy_for_training, pad_with_mask)
from learner.continual.base_sets import load_base_set
from learner.continual.gate import Answers
from learner.continual.replay import Sample
from learner.continual.strategies import cut_inputs
from learner.inference import EmotionPredictor, logits_batches, pad_batch
from learner.model import EmotionNet, ModelConfig
from learner.speech_encoder.whisper_mel import extract_speech_features
from learner.speech_model import SpeechEmotionModel
from service.bench.clips import voiced_clip
from storage.runs import ExemplarRow
from tests.learner.tiny_speech import tiny_encoder_file, tiny_speech_model  # noqa: F401
from tests.learner.toy_learning import TOY_LABELS, toy_features


def _whisper_pair() -> tuple[EmotionPredictor, EmotionPredictor]:
    """The bundled model and a candidate on the same encoder whose downstream is the bundled
    one moved by seeded noise, so the two answer differently (noise as large as each weight's
    mean size: the probe's part of the head answers the same through a smaller move, 0.3 of it
    left every one of the 30 gate clips' answers as they were)."""
    active = EmotionPredictor(load_default_model())
    net = active.model.net
    downstream = copy.deepcopy(net.downstream)
    torch.manual_seed(14)
    with torch.no_grad():
        for p in downstream.parameters():
            p.add_(torch.randn_like(p) * p.abs().mean())
    candidate = SpeechEmotionModel(net.encoder, downstream.eval(), net.encoder_sha256)
    return active, EmotionPredictor(LoadedModel(candidate, active.labels, "", WHISPER_KIND))


def _shipped(name: str, n: int) -> list[Sample]:
    clips = load_base_set(name, kind=WHISPER_KIND)
    rows = np.random.default_rng(14).choice(len(clips), n, replace=False)
    return [Sample(clips.features[i], clips.labels[i],
                   ExemplarRow("base", clips.labels[i], 0.0, base_index=int(i))) for i in rows]


def test_gate_answers_from_shared_encoder_states_are_each_models_answers_run_whole():
    active, candidate = _whisper_pair()
    samples = _shipped("gate", 40)
    gate, holdout = samples[:30], samples[30:]

    answers = Answers.of(active, candidate, gate, holdout)

    def alone(predictor, group):  # each model whole, each clip on its own
        return [predictor.predict_features(np.asarray(s.features, np.float32)).emotion
                for s in group]

    assert answers.truth == [s.label for s in gate]
    assert (answers.before, answers.after) == (alone(active, gate), alone(candidate, gate))
    assert (answers.holdout_before, answers.holdout_after) == (alone(active, holdout),
                                                               alone(candidate, holdout))
    assert answers.before != answers.after  # the two models do differ on these clips
    # Logits too, bit for bit, against each model run whole on the same batches.
    features = [s.features for s in samples]
    shared = logits_batches([active, candidate], features, batch_size=8)
    np.testing.assert_array_equal(shared[0], active.logits_batch(features, batch_size=8))
    np.testing.assert_array_equal(shared[1], candidate.logits_batch(features, batch_size=8))


def test_models_without_a_shared_encoder_answer_each_on_their_own():
    torch.manual_seed(0)
    logmel = [EmotionPredictor(LoadedModel(EmotionNet(ModelConfig(n_classes=2)).eval(),
                                           TOY_LABELS, "")) for _ in range(2)]
    features = [toy_features(label, 20 + k) for k, label in enumerate(TOY_LABELS * 3)]
    for predictor, logits in zip(logmel, logits_batches(logmel, features)):
        np.testing.assert_array_equal(logits, predictor.logits_batch(features))


def test_a_model_reading_fewer_blocks_of_an_encoder_file_runs_only_those(tiny_encoder_file):
    """A downstream reading the first block of the two-block encoder runs one block, reads what
    the first block of a full run holds, and beside a model reading both gets its own answers."""
    first = tiny_speech_model(tiny_encoder_file, branches=2, block_mix="concat", n_blocks=1)
    both = tiny_speech_model(tiny_encoder_file, branches=2, block_mix="concat", seed=1)
    assert first.encoder_sha256 == both.encoder_sha256
    features = [extract_speech_features(voiced_clip(s, seed=i))
                for i, s in enumerate((1.0, 2.5, 0.6))]
    x, lengths = pad_batch(features)
    with torch.inference_mode():
        states, _ = first.encoder(x, lengths, blocks=1)
        assert states.shape[0] == 1
        torch.testing.assert_close(first.encode(x, lengths)[0], both.encode(x, lengths)[0][:, :1])
    predictors = [EmotionPredictor(LoadedModel(net.eval(), ("a", "b"), "", WHISPER_KIND))
                  for net in (first, both)]
    for predictor, logits in zip(predictors, logits_batches(predictors, features, batch_size=2)):
        np.testing.assert_array_equal(logits, predictor.logits_batch(features, batch_size=2))


def test_a_round_reads_each_clips_encoder_states_as_serving_computes_them():
    start = load_default_model()
    samples = _shipped("replay", 12)
    model = MaskedInputNet(copy_for_training(start.net)).eval()
    inputs = model.inputs([s.features for s in samples], batch_size=5)  # batches of mixed length
    x = pad_with_mask([as_float_tensor(row) for row in inputs])

    served = EmotionPredictor(start).logits_batch([s.features for s in samples], batch_size=1)
    with torch.no_grad():
        read = model(x).numpy()
    # The same downstream on the same states, stored as float16 in between.
    np.testing.assert_allclose(read, served, atol=2e-3, rtol=0)
    assert (read.argmax(1) == served.argmax(1)).all()
    # A crop of 3 s of features is 75 of those rows; each clip keeps its own length.
    assert model.input_frames(300) == 75
    width = start.net.config.n_blocks * start.net.config.width
    for row, sample in zip(inputs, samples):
        assert row.shape == (math.ceil(sample.features.shape[0] / 4), width)


def test_a_second_candidate_reads_the_states_the_first_computed(monkeypatch):
    active, candidate = _whisper_pair()
    samples = _shipped("replay", 24)
    features = [s.features for s in samples]
    model = MaskedInputNet(copy_for_training(active.model.net)).eval()
    crop = 10  # rows of states: clips longer than three crops (1.2 s) are cut
    fresh = cut_inputs(model, features, crop, np.random.default_rng(3))
    answers = Answers.of(active, candidate, samples[:16], samples[16:])

    memo: dict = {}
    first = cut_inputs(model, features, crop, np.random.default_rng(3), memo)
    first_answers = Answers.of(active, candidate, samples[:16], samples[16:], memo)
    read_again, read = [], MaskedInputNet.inputs

    def counted(self, part, *args, **kwargs):
        read_again.extend(part)
        return read(self, part, *args, **kwargs)

    def never(*args, **kwargs):
        raise AssertionError("the gate's clips were encoded again")

    monkeypatch.setattr(MaskedInputNet, "inputs", counted)
    second = cut_inputs(model, features, crop, np.random.default_rng(3), memo)
    monkeypatch.setattr(SpeechEmotionModel, "encode", never)
    second_answers = Answers.of(active, candidate, samples[:16], samples[16:], memo)

    # Only the long clips are read again: what a round keeps of them is cut, not whole.
    long = [f for f in features if math.ceil(f.shape[0] / 4) > 3 * crop]
    assert 0 < len(long) < len(features)
    assert [id(f) for f in read_again] == [id(f) for f in long]
    # The same inputs and answers as computed afresh: only the time differs.
    for a, b, c in zip(fresh, first, second):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert answers == first_answers == second_answers
