"""Long recordings, analysed off the event loop: one `RecordingJob` per POST /v1/recordings.

The route starts a job and waits `api.recording_wait_s` for it. A job done by then is answered
at once (201, or the 4xx of its bad input, with nothing stored). One that is not is *detached*:
its row is written as `running`, the route answers 202, and the job updates the row with its
progress and, at the end, its answer or its error. A lock orders the two, so a job that ends
while the route detaches it is stored exactly once.

Jobs run on `RecordingJobs.executor`, one at a time per process: a recording's model work keeps
one core busy for seconds to minutes, and the predictions of other requests need the rest. A
queued job is detached like a slow one; the heartbeat keeps the rows of waiting jobs fresh, so
that a row nobody updates for `STALE_AFTER_S` is known to belong to a process that died.
"""
import hashlib
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.orm import Session, sessionmaker

from learner.audio import SAMPLE_RATE, AudioError
from learner.audio_chunks import AudioChunks
from learner.timeline import Timeline, analyse_recording
from service.engine import InferenceEngine, ModelLoadError, ServingModel
from service.errors import ApiError, audio_error
from storage.artifacts import ArtifactStore
from storage.recordings import RecordingRepository
from storage.repositories import ClipRepository
from storage.settings import Settings

log = logging.getLogger("emoloop.recordings")

HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0
PROGRESS_EVERY_S = 1.0  # how often a detached job writes its progress


@dataclass(frozen=True)
class Upload:
    """A received recording: a file in the artifact store's incoming folder."""
    path: Path
    sha256: str
    size_bytes: int
    extension: str


def receive_upload(source: BinaryIO, artifacts: ArtifactStore, extension_of) -> Upload:
    """Copy the upload into the store's incoming folder, hashing it on the way (never the whole
    file in memory). The caller deletes the file unless a job takes it."""
    path = artifacts.incoming_file()
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, "wb") as out:
            while block := source.read(1 << 20):
                out.write(block)
                digest.update(block)
                size += len(block)
        with open(path, "rb") as written:
            first = written.read(64)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return Upload(path, digest.hexdigest(), size, extension_of(first))


class Stopping(Exception):
    """The process is shutting down: a running job ends at its next batch."""


class RecordingJob:
    def __init__(self, jobs: "RecordingJobs", upload: Upload, api_key_id: int,
                 user_id: str | None):
        self.jobs = jobs
        self.id = uuid.uuid4()
        self.upload = upload
        self.api_key_id = api_key_id
        self.user_id = user_id
        self.progress = 0.0
        self.error: ApiError | None = None  # set when it ended without an answer
        self.finished = threading.Event()  # set once its outcome is stored (or refused)
        self._lock = threading.Lock()
        self._detached = False
        self._last_report = 0.0

    def detach(self) -> bool:
        """Make this a job the client polls: write its running row. False when it has finished
        already (the route answers with its outcome instead)."""
        with self._lock:
            if self.finished.is_set():
                return False
            timeline = self.jobs.settings.timeline
            with self.jobs.session_factory() as session:
                RecordingRepository(session).start(
                    recording_id=self.id, api_key_id=self.api_key_id, user_id=self.user_id,
                    window_s=timeline.window_s, hop_s=timeline.hop_s, progress=self.progress)
                session.commit()
            self._detached = True
            return True

    def run(self) -> None:
        start = time.perf_counter()
        try:
            # With personal models off, every user gets the global model.
            personal = self.user_id if self.jobs.settings.personal.enabled else None
            model = self.jobs.engine.model_for(personal)
            chunks = AudioChunks(self.upload.path,
                                 max_seconds=self.jobs.settings.api.max_recording_seconds)
            timeline = analyse_recording(chunks, model.predictor, self.jobs.settings.timeline,
                                         on_batch=lambda: self._report(chunks.fraction_read))
        except AudioError as err:
            self._end(error=audio_error(err))
        except Stopping:
            self._end(error=ApiError(503, "interrupted", "the server stopped while analysing "
                                                         "this recording; send it again"))
        except ModelLoadError:
            self._end(error=ApiError(503, "not_ready", "the model is still loading; retry"))
        except Exception:
            log.exception("recording %s failed", self.id)
            self._end(error=ApiError(500, "internal_error",
                                     "the server failed to analyse the recording; see its log"))
        else:
            self._end(answer=(model, timeline, (time.perf_counter() - start) * 1000))

    def _report(self, fraction: float) -> None:
        if self.jobs.stopping.is_set():
            raise Stopping
        self.progress = round(min(fraction, 0.99), 3)
        now = time.monotonic()
        if self._detached and now - self._last_report >= PROGRESS_EVERY_S:
            self._last_report = now
            self.jobs.write(lambda s: RecordingRepository(s).report_progress(self.id,
                                                                             self.progress))

    def _end(self, *, error: ApiError | None = None,
             answer: tuple[ServingModel, Timeline, float] | None = None) -> None:
        with self._lock:
            try:
                if answer is not None:
                    self._store(*answer)
                    self.progress = 1.0
                else:
                    self.error = error
                    # Gone before the failure shows: whoever sees it finds nothing of the upload.
                    self.upload.path.unlink(missing_ok=True)
                    if self._detached:
                        self.jobs.write(lambda s: RecordingRepository(s).fail(
                            self.id, {"error": error.error, "detail": error.detail}))
            except Exception:
                log.exception("could not store recording %s", self.id)
                self.error = ApiError(500, "internal_error", "the server failed to store the "
                                      "recording; see its log")
            finally:
                self.upload.path.unlink(missing_ok=True)  # moved in, or not wanted
                self.finished.set()
                self.jobs.forget(self)

    def _store(self, model: ServingModel, timeline: Timeline, processing_ms: float) -> None:
        """The clip's bytes (a row never points at a missing file), then the clip row and the
        recording row in one transaction."""
        artifacts = self.jobs.artifacts
        settings = self.jobs.settings.timeline

        def insert(session: Session) -> None:
            # In the same transaction as the rows for the database store; a file renamed into
            # place before them for the local one.
            relative = artifacts.move_clip_in(self.upload.path, self.upload.sha256,
                                              self.upload.extension, session)
            clip_id = ClipRepository(session).store(
                sha256=self.upload.sha256, duration_s=timeline.duration_s,
                sample_rate=SAMPLE_RATE, artifact_path=relative,
                size_bytes=self.upload.size_bytes)
            RecordingRepository(session).save_done(
                recording_id=self.id, api_key_id=self.api_key_id, user_id=self.user_id,
                clip_id=clip_id, model_version=model.version, personal=model.personal,
                duration_s=timeline.duration_s, window_s=settings.window_s,
                hop_s=settings.hop_s, processing_ms=round(processing_ms, 1),
                windows=[{"start": w.start, "end": w.end, "probabilities": w.probabilities,
                          "raw": w.raw, "smoothed": w.smoothed} for w in timeline.windows],
                segments=[{"start": s.start, "end": s.end, "emotion": s.emotion,
                           "confidence": s.confidence} for s in timeline.segments])

        self.jobs.write(insert)


class RecordingJobs:
    """The jobs of this process: run them, and keep the rows of detached ones alive."""

    def __init__(self, session_factory: sessionmaker[Session], artifacts: ArtifactStore,
                 engine: InferenceEngine, settings: Settings):
        self.session_factory = session_factory
        self.artifacts = artifacts
        self.engine = engine
        self.settings = settings
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recording")
        self._jobs: dict[uuid.UUID, RecordingJob] = {}
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, daemon=True,
                                           name="recording-heartbeat")

    def start(self) -> None:
        self._heartbeat.start()

    def stop(self) -> None:
        """End the running job at its next batch and drop the queued ones: their rows read
        `failed` once stale, their uploads go with the sweep."""
        self.stopping.set()
        self.executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, upload: Upload, api_key_id: int, user_id: str | None) -> RecordingJob:
        job = RecordingJob(self, upload, api_key_id, user_id)
        with self._lock:
            self._jobs[job.id] = job
        try:
            self.executor.submit(job.run)
        except RuntimeError:  # shutting down
            self.forget(job)
            upload.path.unlink(missing_ok=True)
            raise ApiError(503, "shutting_down", "the server is stopping; send it again") \
                from None
        return job

    def get(self, recording_id: uuid.UUID) -> RecordingJob | None:
        return self._jobs.get(recording_id)

    def forget(self, job: RecordingJob) -> None:
        with self._lock:
            self._jobs.pop(job.id, None)

    def write(self, work) -> None:
        with self.session_factory() as session:
            work(session)
            session.commit()

    def _beat(self) -> None:
        while not self.stopping.wait(HEARTBEAT_S):
            with self._lock:
                waiting = [job for job in self._jobs.values() if job._detached]
            for job in waiting:
                try:
                    self.write(lambda s, job=job: RecordingRepository(s).report_progress(
                        job.id, job.progress))
                except Exception:  # the database may be away for a moment; try next beat
                    log.exception("could not refresh recording %s", job.id)
