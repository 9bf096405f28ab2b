"""Micro-batching: concurrent clips share forward passes and each gets its own answer."""
import threading

import numpy as np
import pytest
import torch

from learner.checkpoint import LoadedModel, load_default_model
from learner.inference import EmotionPredictor
from learner.labels import DEFAULT_LABELS
from learner.speech_model import SpeechEmotionModel, SpeechEmotionNet
from learner.serving_net import for_serving
from service.batcher import ModelBatcher
from service.bench.clips import voiced_clip


class RecordingPredictor(EmotionPredictor):
    """The real predictor, remembering the batch sizes it ran; the first forward pass can be
    held until the test lets it go, so that the next requests queue behind it."""

    def __init__(self, model: LoadedModel, hold_first: threading.Event | None = None):
        super().__init__(model)
        self.batches: list[int] = []
        self.hold_first, self.entered = hold_first, threading.Event()

    def logits(self, features):
        self._enter(1)
        return super().logits(features)

    def logits_batch(self, features, batch_size=32):
        self._enter(len(features))
        return super().logits_batch(features, batch_size)

    def _enter(self, n: int) -> None:
        self.batches.append(n)
        self.entered.set()
        if self.hold_first is not None and len(self.batches) == 1:
            assert self.hold_first.wait(30)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return for_serving(load_default_model())


@pytest.fixture(scope="module")
def clips(model) -> list[np.ndarray]:
    # Different lengths, so the shared passes are padded; the bundled model's own features.
    return [model.features(voiced_clip(s, seed=i))
            for i, s in enumerate((3.0, 2.0, 3.0, 1.1, 2.6, 3.0, 0.8, 1.7, 3.0))]


def _concurrently(work, n: int) -> list:
    results: list = [None] * n

    def run(i: int) -> None:
        try:
            results[i] = work(i)
        except Exception as err:  # noqa: BLE001 - the test looks at what each request got
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def _queued(batcher: ModelBatcher, n: int) -> None:
    for _ in range(3000):
        with batcher._changed:
            if len(batcher._queue) >= n:
                return
        threading.Event().wait(0.01)
    raise AssertionError("the requests did not queue")


def test_requests_that_arrive_during_a_pass_share_the_next_one_and_get_their_own_answers(
        model, clips):
    release = threading.Event()
    predictor = RecordingPredictor(model, hold_first=release)
    batcher = ModelBatcher(max_batch=16)
    first = threading.Thread(target=lambda: batcher.logits(predictor, clips[0]))
    first.start()
    assert predictor.entered.wait(30)  # the first clip is in the model, alone
    rest, results = clips[1:], []
    waiting = threading.Thread(target=lambda: results.extend(
        _concurrently(lambda i: batcher.logits(predictor, rest[i]), len(rest))))
    waiting.start()
    _queued(batcher, len(rest))
    release.set()
    first.join(30)
    waiting.join(60)
    assert predictor.batches == [1, len(rest)]
    alone = EmotionPredictor(model)
    for features, logits in zip(rest, results):
        np.testing.assert_allclose(logits, alone.logits(features), atol=1e-5)


def test_a_batch_holds_at_most_max_batch_clips_and_a_lone_request_runs_at_once(model, clips):
    predictor = RecordingPredictor(model)
    batcher = ModelBatcher(max_batch=3)
    batcher.logits(predictor, clips[0])
    assert predictor.batches == [1]
    results = _concurrently(lambda i: batcher.logits(predictor, clips[i % len(clips)]), 12)
    assert max(predictor.batches) <= 3 and sum(predictor.batches) == 13
    assert all(r.shape == (len(DEFAULT_LABELS),) for r in results)


def test_each_version_answers_its_own_clips_and_a_failing_one_fails_only_its_own(model, clips):
    torch.manual_seed(0)  # another version of the bundled model's kind: its own random downstream
    net = SpeechEmotionModel(model.net.encoder, SpeechEmotionNet(model.net.downstream.config), "x")
    other = EmotionPredictor(LoadedModel(net.eval(), DEFAULT_LABELS, sha256="other", kind=model.kind))
    real = EmotionPredictor(model)

    class Broken(EmotionPredictor):
        def logits(self, features):
            raise RuntimeError("model failed")

        logits_batch = logits

    broken = Broken(model)
    batcher = ModelBatcher()
    predictors = [real, other, broken]
    results = _concurrently(
        lambda i: batcher.logits(predictors[i % 3], clips[i % len(clips)]), 12)
    for i, result in enumerate(results):
        if predictors[i % 3] is broken:
            assert isinstance(result, RuntimeError)
        else:
            expected = predictors[i % 3].logits(clips[i % len(clips)])
            np.testing.assert_allclose(result, expected, atol=1e-5)
    # The failure left the batcher working.
    np.testing.assert_allclose(batcher.logits(real, clips[0]), real.logits(clips[0]), atol=1e-5)
