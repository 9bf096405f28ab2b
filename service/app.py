"""The FastAPI app. `create_app(settings)` builds one; `emoloop serve` runs `app_for_worker` in
every uvicorn worker process.

Start-up does not wait for the model: the process answers /health at once, and loads, checks
and warms up the active model in the background; /ready turns true when that is done. From then
on the same task polls the registry, so a version activated elsewhere is served here too; on
PostgreSQL a listener (storage.version_events) is told of the change at once.
"""
import asyncio
import gc
import logging
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.auth import KeyVerifier
from service.bootstrap import BundledModelMissing, register_bundled_model
from service.dashboard import mount_dashboard
from service.engine import InferenceEngine
from service.errors import install_error_handlers
from service.group_commit import GroupCommitWriter
from service.idempotency import IdempotencyKeys
from service.metrics import RequestMetrics
from service.recording_jobs import RecordingJobs
from service.routes import api_router
from service.scheduler import LearnerService
from service.store_probe import StoreProbe
from service.upload_spool import UploadSpool
from storage.artifacts import open_artifact_store
from storage.db import create_db_engine, make_read_session_factory, make_session_factory
from storage.settings import Settings, get_settings
from storage.version_events import VersionListener, listens

log = logging.getLogger("emoloop.service")


def create_app(settings: Settings, *, freeze_heap_when_ready: bool = False) -> FastAPI:
    """`freeze_heap_when_ready`: for a process that serves this one app (`emoloop serve`), see
    `follow_active_model`. Not for a process that builds many apps (tests)."""
    db_engine = create_db_engine(settings.database.url,
                                 busy_timeout_s=settings.database.busy_timeout_s)
    session_factory = make_session_factory(db_engine)
    read_session_factory = make_read_session_factory(db_engine)
    artifacts = open_artifact_store(settings, db_engine)
    engine = InferenceEngine(read_session_factory, artifacts,
                             max_audio_seconds=settings.api.max_audio_seconds,
                             personal_cache_size=settings.personal.cache_size,
                             global_cache_size=settings.personal.global_cache_size,
                             personal_ttl_s=settings.api.model_poll_interval_s)
    writer = GroupCommitWriter(session_factory)
    store_probe = StoreProbe(settings.database.url, settings.storage.data_dir,
                             settings.storage.min_free_bytes,
                             busy_timeout_s=settings.database.busy_timeout_s)
    key_verifier = KeyVerifier(read_session_factory)
    recording_jobs = RecordingJobs(session_factory, artifacts, engine, settings)
    # Rounds run in this process too (learner.enabled); a version they activate is served here
    # at once, and by every other process within its poll.
    learner = LearnerService(session_factory, artifacts, settings.learner,
                             on_activated=engine.activate, personal=settings.personal,
                             on_personal_activated=engine.personal.forget,
                             sweep_after_s=settings.storage.sweep_after_s,
                             retention=settings.storage.retention)

    # PostgreSQL pushes version changes (an activation, a rollback) to this process at once;
    # the poll below stays as the fallback, and is the only way on SQLite.
    listener = VersionListener(settings.database.url, partial(on_version_change, engine)) \
        if listens(settings.database.url) else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        writer.start()
        if listener is not None:
            listener.start()
        follower = asyncio.create_task(follow_active_model(
            engine, session_factory, settings.api.model_poll_interval_s,
            freeze_heap_when_ready=freeze_heap_when_ready))
        store_watch = asyncio.create_task(store_probe.watch())
        learner.start()
        recording_jobs.start()
        try:
            yield
        finally:
            if listener is not None:
                await run_in_threadpool(listener.stop)
            follower.cancel()
            store_watch.cancel()
            await run_in_threadpool(recording_jobs.stop)
            await run_in_threadpool(learner.stop)
            writer.stop()
            store_probe.close()
            db_engine.dispose()

    app = FastAPI(title="emoloop", version="0.1.0", lifespan=lifespan,
                  description="Speech emotion recognition that learns from its users' "
                              "corrections. Send `Authorization: Bearer KEY` on /v1 routes.")
    app.state.settings = settings
    app.state.session_factory = session_factory
    app.state.read_session_factory = read_session_factory
    app.state.writer = writer
    app.state.store_probe = store_probe
    app.state.key_verifier = key_verifier
    app.state.artifacts = artifacts
    app.state.engine = engine
    app.state.learner = learner
    app.state.recording_jobs = recording_jobs
    app.state.version_listener = listener
    install_error_handlers(app)
    app.include_router(api_router)
    mount_dashboard(app)  # the web page at `/`
    # The last added runs first: metrics see every request, 413s from the size limit included.
    app.add_middleware(IdempotencyKeys, writer=writer,
                       window_s=settings.api.idempotency_window_s)
    app.add_middleware(UploadSpool, max_file_bytes=settings.api.max_upload_bytes,
                       spool_threshold_bytes=settings.api.spool_threshold_bytes,
                       streamed_paths={"/v1/recordings": settings.api.max_recording_bytes})
    app.add_middleware(RequestMetrics)
    return app


def on_version_change(engine: InferenceEngine, notice: dict | None) -> None:
    """A version changed in another process (or may have, after reconnecting): a user's
    personal version is looked up again on their next request; the global one is loaded now."""
    if notice is not None and notice.get("scope") == "user" and notice.get("user_id"):
        engine.personal.forget(notice["user_id"])
        return
    engine.refresh()


async def follow_active_model(engine: InferenceEngine, session_factory: sessionmaker[Session],
                              poll_interval_s: float, *,
                              freeze_heap_when_ready: bool = False) -> None:
    """Load the active model (registering the bundled one on an empty registry), then keep
    following the registry's active version."""
    try:
        # Only on an empty registry: a new release's default joins an existing store's versions
        # when the launching process (`emoloop serve`) starts, once, not in every worker.
        await run_in_threadpool(register_bundled_model, session_factory, engine.artifacts,
                                beside_existing=False)
    except BundledModelMissing as err:
        log.error("%s", err)  # /ready stays false until a version is registered and activated
    frozen = not freeze_heap_when_ready
    while True:
        try:
            await run_in_threadpool(engine.refresh)
        except Exception:  # the database may be away for a moment; keep serving, retry
            log.exception("could not check the active model version")
        if not frozen and engine.serving is not None:
            # Everything alive once the first model is warm (torch, the model, the app) lives
            # as long as the process: frozen, the collector stops rescanning it and scans only
            # what requests allocate (bench serve, six interleaved pairs of runs: 6% less CPU
            # per prediction, p50 9% lower).
            gc.collect()
            gc.freeze()
            frozen = True
        await asyncio.sleep(poll_interval_s)


def app_for_worker() -> FastAPI:
    """The uvicorn factory `emoloop serve` runs in each worker process."""
    from learner.inference import limit_threads

    # One thread per worker (torch and BLAS): N workers on N cores, instead of N workers each
    # starting a thread per core and fighting over them.
    limit_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    return create_app(get_settings(), freeze_heap_when_ready=True)
