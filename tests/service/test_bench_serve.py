"""`emoloop bench serve`: every request sends new bytes, and a short run against the real server
answers every request, stores every answered write and reports what the issue asks for; on
PostgreSQL, with both artifact stores side by side."""
import hashlib

import numpy as np
import pytest

from learner.audio import decode_audio
from service.bench.serve import (
    CLIP_POOL,
    FEEDBACK_PER_PREDICTION,
    WARMUP_REQUESTS,
    clip_pool,
    run_serve_bench,
    unique_clip,
)


def test_every_request_sends_bytes_no_other_request_sent_and_a_valid_clip():
    clips = clip_pool()
    assert len({hashlib.sha256(c).hexdigest() for c in clips}) == CLIP_POOL
    bodies = [unique_clip(clips, i) for i in range(3 * CLIP_POOL)]
    assert len({hashlib.sha256(b).hexdigest() for b in bodies}) == len(bodies)
    original, changed = decode_audio(clips[5]), decode_audio(unique_clip(clips, 5 + CLIP_POOL))
    assert len(original) == len(changed)
    assert np.array_equal(original[:-2], changed[:-2])  # only the last two samples differ


def test_a_short_run_answers_every_request_and_reports_the_targets():
    report = run_serve_bench(requests=16, workers=(1,), floor=True)
    run = report["workers"]["1"]
    assert run["errors"] == 0
    assert run["predictions"] == 16
    assert run["feedback_writes"] == FEEDBACK_PER_PREDICTION * 16
    assert 0 < run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
    assert run["throughput_per_s"] > 0 and run["feedback_per_s"] > 0
    assert run["cpu_ms_per_prediction"] > 0 and run["client_cpu_ms_per_request"] > 0
    assert report["repeats"][0]["local"]["1"]["worker_shares"] == [1.0]  # one worker did all
    assert run["stored_predictions"] == run["answered_predictions"] == WARMUP_REQUESTS + 16
    assert run["stored_feedback"] == run["feedback_writes"]
    floor = report["inference_floor"]  # the model work alone, same clips and clients
    assert floor["errors"] == 0 and floor["predictions"] == 16
    assert 0 < floor["p50_ms"] <= floor["p99_ms"] and floor["cpu_ms_per_prediction"] > 0
    text = "\n".join(report["lines"])
    for figure in ("p50 ms, 1 worker", "p99 ms, 1 worker", "errors, all runs",
                   "feedback writes/s, 1 worker", "p50 ms, inference floor", "1 worker / floor"):
        assert figure in text
    assert "SQLite, artifacts: local" in text


@pytest.mark.postgres
def test_on_postgresql_each_artifact_store_runs_in_turn_side_by_side(postgres_server):
    report = run_serve_bench(requests=8, workers=(1,), database_url=postgres_server,
                             stores=("local", "database"))
    assert report["database"] == "postgresql"
    for store in ("local", "database"):
        run = report["repeats"][0][store]["1"]
        assert run["artifact_store"] == store  # what the server's own settings said
        assert run["errors"] == 0 and run["predictions"] == 8
        assert run["stored_predictions"] == run["answered_predictions"] == WARMUP_REQUESTS + 8
        assert run["stored_feedback"] == run["feedback_writes"] == FEEDBACK_PER_PREDICTION * 8
        assert run["stored_artifacts"] > WARMUP_REQUESTS + 8  # every clip, and the model
    text = "\n".join(report["lines"])
    assert "PostgreSQL, artifacts: database" in text
    assert "database / local pred/s, 1 worker" in text
    assert "stored after the load, all runs" in text and "MISSED" not in text.split(
        "stored after the load")[1]
