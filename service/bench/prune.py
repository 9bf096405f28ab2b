"""`emoloop bench prune`: retention on a store the bench fills, timed, then checked.

A fresh store (a SQLite file and a local artifact folder in a temporary directory, or the empty
PostgreSQL database `database_url` names, with either artifact store) gets `predictions`
predictions spread over the last 60 days, each with a clip of its own (CLIP_BYTES; one in twenty
shares the clip of another), a tenth of them with feedback (half of that consumed by a round
whose held-out share is the gate set), replay exemplars on some answered clips, rejected and
retired versions and finished runs. Filling is not timed: rows go in by bulk inserts, files
without fsync.

Timed: `storage.retention.prune` with predictions_days 30, clips_days 7, rejected_versions_days
30 and run_details_days 30. Then a scan reads back every artifact a row still needs (every clip
a prediction or exemplar uses whose bytes were not removed, every model and state file of a
version not deleted), checks each sha256, and compares what the store holds before and after
with what prune reported it freed.
"""
import os
import random
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, insert, select

CLIP_BYTES = 1024
DAYS = 60
RETENTION = {"predictions_days": 30, "clips_days": 7, "rejected_versions_days": 30,
             "run_details_days": 30}
_ROWS = 5000  # rows per bulk insert


def run_prune_bench(predictions: int = 100_000, database_url: str | None = None,
                    artifacts: str = "local") -> dict:
    from storage.artifacts import open_artifact_store
    from storage.db import create_db_engine, make_session_factory
    from storage.migrate import upgrade_to_head
    from storage.retention import prune
    from storage.settings import RetentionSettings, Settings

    with tempfile.TemporaryDirectory(prefix="emoloop-prune-bench-") as folder:
        url = database_url or f"sqlite:///{Path(folder) / 'emoloop.db'}"
        settings = Settings(database={"url": url},
                            storage={"data_dir": folder, "artifacts": artifacts})
        upgrade_to_head(url)
        engine = create_db_engine(url)
        try:
            sessions = make_session_factory(engine)
            store = open_artifact_store(settings, engine)
            started = time.perf_counter()
            made = _fill(sessions, store, predictions)
            os.sync()  # the fill's writes on disk before the clock starts, as old data would be
            fill_s = time.perf_counter() - started
            before = store.stats()
            report = prune(sessions, store, RetentionSettings(**RETENTION))
            after = store.stats()
            started = time.perf_counter()
            scan = _scan(sessions, store)
            scan["seconds"] = time.perf_counter() - started
        finally:
            engine.dispose()
    result = {"predictions": predictions, "database": engine.dialect.name,
              "artifact_store": artifacts, "made": made, "fill_s": fill_s,
              "retention_days": RETENTION, "prune": report.as_dict(),
              "store_before": {"artifacts": before.artifacts, "bytes": before.bytes},
              "store_after": {"artifacts": after.artifacts, "bytes": after.bytes},
              "freed_bytes_measured": before.bytes - after.bytes, "scan": scan}
    result["lines"] = _lines(result)
    return result


def _fill(sessions, store, n: int) -> dict:
    from storage.api_keys import ApiKeyRepository
    from storage.artifacts import clip_path
    from storage.files import sha256_bytes
    from storage.models import (Clip, Feedback, ModelVersion, Prediction, ReplayExemplar,
                                TrainingRun, utcnow)
    from storage.registry import ModelRegistry

    rng = random.Random(0)
    now = utcnow()
    with sessions() as session:
        key = ApiKeyRepository(session).create("bench", "app")[0].id
        registry = ModelRegistry(session, store)
        model = rng.randbytes(1 << 20)  # storage never parses it
        v1 = registry.bootstrap_default(model, sha256_bytes(model), labels=["sad", "happy"])
        versions = {"retired": [], "rejected": []}
        for i, status in enumerate(["rejected"] * 4 + ["retired"] * 2):
            data = rng.randbytes(1 << 18)
            row = registry.register(data, labels=["sad", "happy"], parent_version=v1.version)
            row.state_sha256, row.state_path = store.put_state(row.version, data[::-1], session)
            row.status = status
            row.created_at = now - timedelta(days=10 + 20 * (i % 2))
            versions[status].append(row.version)
        runs = []
        for i in range(20):
            run = TrainingRun(trigger="schedule", status="accepted" if i % 2 else "rejected",
                              counts={"feedback": 50, "seconds": {"total_s": 12.5}},
                              gate_report={"decision": "accepted", "classes": list(range(50))},
                              started_at=now - timedelta(days=2 * i),
                              finished_at=now - timedelta(days=2 * i))
            session.add(run)
            runs.append(run)
        session.flush()
        consuming_run = runs[-1].id
        session.commit()

    clip_rows, prediction_rows, feedback_rows, pending = [], [], [], []
    for i in range(n):
        created = now - timedelta(seconds=rng.uniform(0, DAYS * 86400))
        if i % 20 == 19 and clip_rows:  # the same bytes sent again
            clip_id = rng.randrange(len(clip_rows)) + 1
        else:
            data = i.to_bytes(8, "little") + rng.randbytes(CLIP_BYTES - 8)
            sha256 = sha256_bytes(data)
            path = clip_path(sha256, ".wav")
            pending.append((path, sha256, data))
            clip_rows.append({"id": len(clip_rows) + 1, "sha256": sha256, "duration_s": 3.0,
                              "sample_rate": 16000, "artifact_path": path,
                              "size_bytes": len(data), "created_at": created})
            clip_id = len(clip_rows)
        prediction = uuid.uuid4()
        prediction_rows.append({
            "id": prediction, "api_key_id": key, "user_id": f"user-{i % 500}",
            "clip_id": clip_id, "model_version": v1.version, "label": "sad", "confidence": 0.6,
            "probabilities": {"sad": 0.6, "happy": 0.4}, "latency_ms": 15.0,
            "personal": False, "created_at": created})
        if i % 10 == 0:
            consumed = i % 20 == 0
            feedback_rows.append({
                "id": len(feedback_rows) + 1, "prediction_id": prediction, "api_key_id": key,
                "user_id": f"user-{i % 500}", "label": "happy", "created_at": created,
                "consumed_by_run_id": consuming_run if consumed else None,
                "held_out": consumed and i % 100 == 0, "rejections": 0})
    _store_clips(store, sessions, pending)
    exemplars = [{"model_version": v1.version, "clip_id": prediction_rows[f["id"] * 10 - 10][
        "clip_id"], "feedback_id": f["id"], "label": "happy", "source": "feedback",
        "weight": rng.random(), "created_at": now} for f in feedback_rows[::25]]
    with sessions() as session:
        for model, rows in ((Clip, clip_rows), (Prediction, prediction_rows),
                            (Feedback, feedback_rows), (ReplayExemplar, exemplars)):
            for start in range(0, len(rows), _ROWS):
                session.execute(insert(model), rows[start:start + _ROWS])
        if engine_is_postgres(session):  # explicit ids: move the sequences past them
            for table, rows in (("clips", clip_rows), ("feedback", feedback_rows)):
                session.execute(select(func.setval(f"{table}_id_seq", len(rows))))
        session.commit()
    return {"clips": len(clip_rows), "predictions": len(prediction_rows),
            "feedback": len(feedback_rows), "replay_exemplars": len(exemplars),
            "rejected_versions": len(versions["rejected"]), "runs": len(runs)}


def engine_is_postgres(session) -> bool:
    return session.connection().dialect.name == "postgresql"


def _store_clips(store, sessions, pending: list[tuple[str, str, bytes]]) -> None:
    """The fill's clip bytes in bulk: files without fsync, blobs by bulk inserts (each of one
    chunk). The timed prune and the scan go through the store's own code."""
    from storage.artifacts import LocalArtifactStore
    from storage.models import ArtifactBlob, ArtifactChunk, utcnow

    if isinstance(store, LocalArtifactStore):
        for path, _, data in pending:
            target = store.path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return
    now = utcnow()
    with sessions() as session:
        for start in range(0, len(pending), _ROWS):
            batch = pending[start:start + _ROWS]
            session.execute(insert(ArtifactBlob), [
                {"sha256": sha, "size_bytes": len(data), "created_at": now, "touched_at": now}
                for _, sha, data in batch])
            session.execute(insert(ArtifactChunk), [
                {"sha256": sha, "seq": 0, "data": data} for _, sha, data in batch])
        session.commit()


def _scan(sessions, store) -> dict:
    """Every artifact a remaining row needs, read back and checked."""
    from storage.artifacts import ArtifactError
    from storage.models import Clip, ModelVersion, Prediction, ReplayExemplar

    with sessions() as session:
        used = select(Prediction.clip_id).union(select(ReplayExemplar.clip_id).where(
            ReplayExemplar.clip_id.is_not(None)))
        clips = session.execute(select(Clip.artifact_path, Clip.sha256).where(
            Clip.id.in_(used), Clip.removed_at.is_(None))).all()
        files = []
        for v in session.scalars(select(ModelVersion).where(ModelVersion.status != "deleted")):
            files.append((v.artifact_path, v.sha256))
            if v.state_path:
                files.append((v.state_path, v.state_sha256))
        orphans = session.scalar(select(func.count()).select_from(Clip).where(
            Clip.id.not_in(used)))
        session.rollback()
    missing = 0
    for path, sha256 in clips + files:
        try:
            store.read_checked(path, sha256)
        except ArtifactError:
            missing += 1
    return {"checked": len(clips) + len(files), "missing_or_corrupt": missing,
            "clip_rows_no_row_uses": orphans}


def _lines(r: dict) -> list[str]:
    p, scan = r["prune"], r["scan"]
    return [
        f"bench prune: {r['predictions']:,} predictions on {r['database']} with the "
        f"{r['artifact_store']} artifact store (filled in {r['fill_s']:.0f} s, not timed)",
        f"  made: {r['made']}",
        f"  retention (days): {r['retention_days']}",
        f"  prune: {p['seconds']:.1f} s (target < 60 s): {p['predictions']:,} predictions and "
        f"{p['clips']:,} clips removed, bytes of {p['clip_bytes_removed']:,} more clips, "
        f"{p['rejected_versions']} rejected versions ({p['replay_exemplars']} exemplars), "
        f"details of {p['run_details']} runs",
        f"  freed: reported {p['freed_bytes']:,} bytes, measured {r['freed_bytes_measured']:,} "
        f"(store {r['store_before']['bytes']:,} -> {r['store_after']['bytes']:,} bytes, "
        f"{r['store_before']['artifacts']:,} -> {r['store_after']['artifacts']:,} artifacts)",
        f"  scan after: {scan['checked']:,} referenced artifacts read and checked, "
        f"{scan['missing_or_corrupt']} missing or corrupt (target 0), "
        f"{scan['clip_rows_no_row_uses']} clip rows nothing uses; {scan['seconds']:.1f} s",
    ]
