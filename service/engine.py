"""The inference engine: which model answers, and how it is replaced while requests run.

A request takes `engine.serving` once and uses that model to the end, so swapping a version in
(`engine.activate`) never changes a request half-way: in-flight requests finish on the model
they started with and the next ones get the new one. A model is loaded and warmed up completely
before the swap, from the artifact store with its sha256 checked; a file that fails the check or
does not load is never swapped in, and the model serving before keeps serving.

Each worker process has its own engine. A version activated through another process (another
worker, the CLI, the learner) is noticed by `refresh`, which the app runs every
`api.model_poll_interval_s` seconds.

An active version whose file is missing or corrupt never stops the answers: the engine keeps
serving the version it had, or, with none yet (at start), falls back to the newest earlier
version that loads (the retired ones, most recently active first), logged and counted in
/metrics. Each poll tries the active version again once its file changed (restored, rewritten),
and `status` says which version serves and why, for /ready.
"""
import logging
import os
import threading
import time
from dataclasses import dataclass

import anyio
import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from learner.audio import decode_audio
from learner.checkpoint import ModelFileError, bundled_model_info, model_from_bytes
from learner.inference import EmotionPredictor, Prediction
from learner.serving_net import for_serving
from service.batcher import ModelBatcher
from service.metrics import ACTIVE_MODEL_VERSION, MODEL_FALLBACKS, MODEL_LOAD_FAILURES
from service.personal_models import PersonalModels
from storage.artifacts import ArtifactError, ArtifactRef, ArtifactStore
from storage.registry import ModelRegistry

log = logging.getLogger("emoloop.engine")


class ModelLoadError(RuntimeError):
    """A version that cannot be served: unknown, its file missing or corrupt, or not a model."""


@dataclass(frozen=True)
class ServingStatus:
    """What /ready reports: the version serving, the registry's active one, and why they differ
    (None when they do not)."""
    version: int | None
    active_version: int | None
    problem: str | None


@dataclass(frozen=True)
class ServingModel:
    version: int
    predictor: EmotionPredictor
    personal: bool = False  # a user's personal version (on the global version it was built on)


@dataclass(frozen=True)
class Inference:
    model: ServingModel
    wave: np.ndarray  # the decoded clip, 16 kHz mono
    prediction: Prediction
    latency_ms: float


class InferenceEngine:
    def __init__(self, session_factory: sessionmaker[Session], artifacts: ArtifactStore,
                 *, max_audio_seconds: float, personal_cache_size: int = 200,
                 global_cache_size: int = 2, personal_ttl_s: float = 1.0):
        self.session_factory = session_factory
        self.artifacts = artifacts
        self.max_audio_seconds = max_audio_seconds
        self.personal = PersonalModels(
            session_factory, artifacts, load_global=lambda v: self.load(v).predictor,
            cache_size=personal_cache_size, global_cache_size=global_cache_size,
            ttl_s=personal_ttl_s)
        self._serving: ServingModel | None = None
        # Held while deciding and making a swap, so a poll that read the old active version
        # cannot swap it back in after an activation in this process swapped the new one.
        self._swap_lock = threading.Lock()
        # Versions whose file failed, with the file's (inode, size, mtime) then (None: missing):
        # tried again once it changes.
        self._unloadable: dict[int, tuple | None] = {}
        self._active_version: int | None = None  # the registry's, as last seen
        self._problem: str | None = None
        # At most one clip per core in decoding and features at a time: more threads than cores
        # only take turns on the GIL and the caches, costing CPU for every clip and finishing
        # none sooner. The model runs outside these slots, on the clips of all waiting requests
        # at once (service.batcher), so `request_slots` (the worker threads a route may hold in
        # `predict`) must leave room for a full batch.
        self.cpu_slots = threading.BoundedSemaphore(os.cpu_count() or 1)
        self.batcher = ModelBatcher(max_batch=16)
        self.request_slots = anyio.CapacityLimiter(2 * self.batcher.max_batch)

    @property
    def serving(self) -> ServingModel | None:
        """The model new requests use; None until the first one is loaded and warm."""
        return self._serving

    @property
    def status(self) -> ServingStatus:
        serving = self._serving
        return ServingStatus(serving.version if serving else None, self._active_version,
                             self._problem)

    def load(self, version: int) -> ServingModel:
        """Read, verify, build and warm up a version without serving it."""
        with self.session_factory() as session:
            row = ModelRegistry(session, self.artifacts).get(version)
            session.commit()  # end the read transaction now, not after the slow part
        if row is None:
            raise ModelLoadError(f"no model version {version}")
        try:
            data = self.artifacts.read_model(row.artifact_path, row.sha256)
            predictor = EmotionPredictor(
                for_serving(model_from_bytes(data, expected_sha256=row.sha256)))
        except (ArtifactError, ModelFileError) as err:
            raise ModelLoadError(f"model version {version} cannot be loaded: {err}") from err
        predictor.warm_up()  # first-call allocations happen here, not in a user's request
        return ServingModel(version, predictor)

    def serve(self, model: ServingModel) -> None:
        """Swap a loaded model in for the requests that start from now on."""
        with self._swap_lock:
            self._swap(model)

    def activate(self, version: int) -> ServingModel:
        """Load a version and swap it in; raises ModelLoadError and keeps the current model if
        it cannot be loaded. Does not change the registry: the caller records activations."""
        model = self.load(version)
        self.serve(model)
        return model

    def refresh(self) -> int | None:
        """Serve the registry's active global version if this process does not yet; returns the
        version served. A version that fails to load is logged and counted, the one serving
        keeps serving (at start: the newest earlier version that loads), and it is tried again
        on a later poll once its file has changed."""
        with self._swap_lock:
            with self.session_factory() as session:
                active = ModelRegistry(session, self.artifacts).active_global()
                session.commit()
            if active is None:
                return None
            self._active_version = active.version
            current = self._serving.version if self._serving else None
            if active.version == current:
                self._problem = None
                return current
            file = self.artifacts.stamp(ArtifactRef(active.artifact_path, active.sha256))
            if active.version in self._unloadable and self._unloadable[active.version] == file:
                return current  # nothing changed since it failed
            try:
                self._swap(self.load(active.version))
                self._problem = None
            except ModelLoadError as err:
                self._unloadable[active.version] = file
                MODEL_LOAD_FAILURES.inc()
                if self._serving is None:
                    self._fall_back(active.version, str(err))
                else:
                    self._problem = (f"the active version {active.version} cannot be loaded "
                                     f"({err}); still serving version {current}")
                log.error("%s", self._problem)
            return self._serving.version if self._serving else None

    def _fall_back(self, active_version: int, reason: str) -> None:
        """With nothing serving yet: serve the newest earlier version that loads, else this
        release's bundled default where the launcher registered it (an upgrade whose active
        version reads an encoder that no longer ships, in a store with nothing before it)."""
        with self.session_factory() as session:
            versions = [row for row in ModelRegistry(session, self.artifacts)
                        .list_versions(scope="global") if row.version != active_version]
            session.commit()
        earlier = [row for row in versions if row.status == "retired"]
        # Most recently active first: after a rollback that is not the highest number.
        earlier.sort(key=lambda row: (row.activated_at is not None, row.activated_at,
                                      row.version), reverse=True)
        bundled_sha256 = (bundled_model_info() or {}).get("sha256")
        bundled = [row for row in versions
                   if row.status != "retired" and row.sha256 == bundled_sha256]
        for row in earlier + bundled:
            try:
                self._swap(self.load(row.version))
            except ModelLoadError as err:
                log.error("%s", err)
                continue
            MODEL_FALLBACKS.inc()
            which = ("the newest earlier version that loads" if row in earlier else
                     "this release's bundled default, as no earlier version loads")
            self._problem = (f"the active version {active_version} cannot be loaded ({reason}); "
                             f"serving version {row.version}, {which}")
            return
        self._problem = (f"the active version {active_version} cannot be loaded ({reason}), "
                         "and no earlier version loads either")

    def predict(self, audio: bytes, user_id: str | None = None) -> Inference:
        """Decode, compute features and predict, on the model serving when called: the user's
        active personal version if they have one, else the global one. Raises AudioError for a
        clip we refuse. CPU-bound: call it from a worker thread."""
        start = time.perf_counter()
        # The model first: the features are that model's own (a personal version may sit on a
        # global version of another kind than the one serving).
        model = self.model_for(user_id)
        with self.cpu_slots:
            wave = decode_audio(audio, max_seconds=self.max_audio_seconds)
            features = model.predictor.model.features(wave)
        prediction = model.predictor.predict_logits(
            self.batcher.logits(model.predictor, features))
        return Inference(model, wave, prediction, (time.perf_counter() - start) * 1000)

    def model_for(self, user_id: str | None) -> ServingModel:
        """The model that answers this user now: their active personal version, else the global
        one. Raises ModelLoadError before the first model is loaded."""
        model = self._serving
        if model is None:
            raise ModelLoadError("no model is loaded yet")
        personal = self.personal.model_for(user_id, model.version, model.predictor) \
            if user_id is not None else None
        return ServingModel(*personal, personal=True) if personal is not None else model

    def _swap(self, model: ServingModel) -> None:
        previous = self._serving.version if self._serving else None
        self._serving = model  # one reference assignment: atomic for the threads reading it
        self._unloadable.pop(model.version, None)
        ACTIVE_MODEL_VERSION.set(model.version)
        if previous != model.version:
            log.info("serving model version %s (was %s)", model.version, previous)
