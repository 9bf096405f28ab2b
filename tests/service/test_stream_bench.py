"""`emoloop bench stream`, small: recordings joined from the corpus clips of the speakers the
bundled model never trained on, scored window by window and change by change."""
import json

import pytest

from learner.checkpoint import DEFAULT_MODEL_INFO
from service.bench.stream import run_stream_bench


@pytest.mark.corpus
def test_bench_stream_scores_raw_filtered_and_segments_on_joined_clips(shared_data):
    report = run_stream_bench(shared_data, recordings=1, runs=4, cost_runs=0)
    speakers = len(json.loads(DEFAULT_MODEL_INFO.read_text())["split"]["test_speakers"])
    # One recording of 4 runs (3 changes) for each test speaker of the bundled model.
    assert report["recordings"] == speakers and report["changes"] == speakers * 3
    assert report["clips"] >= speakers * 4 * 3  # every run joins at least 3 clips
    at_setting = report["accuracy"][str(report["self_transition"])]
    accuracy = at_setting["window_accuracy"]
    assert set(accuracy) == {"raw", "filtered", "segments"}
    assert all(0.0 <= a <= 1.0 for a in accuracy.values())
    per_minute = at_setting["changes_per_minute"]
    # Smoothing is there to stop the flicker: fewer label changes than the raw windows.
    assert per_minute["segments"] < per_minute["filtered"] < per_minute["raw"]
    assert 0.0 <= at_setting["boundaries_within_1_5s"] <= 1.0
    assert 0.0 <= at_setting["half_way_boundaries_within_1_5s"] <= 1.0
    assert any(line.startswith("targets at the setting") for line in report["lines"])


def test_bench_stream_capacity_streams_in_real_time_against_emoloop_serve():
    from service.bench.stream_capacity import run_capacity

    report = run_capacity([2], seconds=5.0, workers=1)
    level = report["levels"][2]
    # 5 s of audio a stream: windows end at 3, 4 and 5 s.
    assert level["streams"] == 2 and level["answers"] == 6 and level["dropped"] == 0
    assert 0 < level["p50_ms"] <= level["p99_ms"]
    assert report["capacity"] in (0, 2) and report["capacity"] == (2 if level["holds"] else 0)
