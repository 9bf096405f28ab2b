"""Micro-batching: the clips of concurrent requests go through the model in one forward pass.

Per clip, a batch of four costs about three quarters of a forward pass of one (the convs and the
LSTM do more work per weight they load, and the Python between ops is paid once), and padding
never changes a clip's answer. As with group commit, nothing waits on purpose: a request whose
model is idle runs at once, alone; the requests that arrive while a forward pass runs queue up,
and the next pass takes all of them. So batches grow with the load and cost no latency when
there is none.

There is no thread of its own: the first waiting request runs a batch (its own clip and those
queued before it) on its thread, and the others wait for it. When it is done, one of those still
waiting runs the next batch. Clips are grouped by predictor: each version (and each personal
version) runs its own batch.
"""
import threading
from dataclasses import dataclass

import numpy as np

from learner.inference import EmotionPredictor


@dataclass(eq=False)
class _Clip:
    predictor: EmotionPredictor
    features: np.ndarray
    logits: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False


class ModelBatcher:
    def __init__(self, max_batch: int = 16):
        self.max_batch = max_batch
        self._queue: list[_Clip] = []
        self._running = False  # a thread is running a batch now
        self._changed = threading.Condition()

    def logits(self, predictor: EmotionPredictor, features: np.ndarray) -> np.ndarray:
        """(frames, F) features -> (n_labels,) logits, computed in a batch with the clips of
        the requests waiting at the same time. Blocks: call it from a worker thread."""
        clip = _Clip(predictor, features)
        with self._changed:
            self._queue.append(clip)
        while True:
            with self._changed:
                while not clip.done and self._running:
                    self._changed.wait()
                if clip.done:
                    break
                self._running = True  # our turn: run the oldest clips, ours among them or first
                batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            try:
                _run(batch)
            finally:
                for unsettled in (c for c in batch if not c.done):  # interrupted half-way
                    unsettled.error, unsettled.done = RuntimeError("model batch interrupted"), True
                with self._changed:
                    self._running = False
                    self._changed.notify_all()
        if clip.error is not None:
            raise clip.error
        return clip.logits


def _run(batch: list[_Clip]) -> None:
    groups: dict[int, list[_Clip]] = {}
    for clip in batch:
        groups.setdefault(id(clip.predictor), []).append(clip)
    for clips in groups.values():
        _settle(clips)


def _settle(clips: list[_Clip]) -> None:
    """Give each clip of one predictor its logits, or the error that computing them raised."""
    predictor = clips[0].predictor
    try:
        if len(clips) == 1:
            results = [predictor.logits(clips[0].features)]
        else:
            results = predictor.logits_batch([clip.features for clip in clips])
        for clip, logits in zip(clips, results):
            clip.logits = logits
    except Exception as err:  # noqa: BLE001 - the requests of this batch get the model's error
        for clip in clips:
            clip.error = err
    for clip in clips:
        clip.done = True
