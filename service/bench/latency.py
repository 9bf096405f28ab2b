"""`emoloop bench latency`: decode + features + model for a 3 s clip on one thread.

Each stage is timed separately after a warm-up; medians and p95 are reported with the
targets of the issue and their ratios. Cold start is measured in a fresh interpreter:
import, load the model (checksum included), warm up.
"""
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# Per model kind: the log-mel model's targets, and the encoder model's (whose frozen encoder has
# no parameter budget: its size on disk is what is bounded).
TARGETS_BY_KIND = {
    "logmel-cnn-bilstm": {"median_ms": 15.0, "parameters": 5_000_000, "cold_start_s": 5.0},
    "whisper-cnn-bilstm": {"median_ms": 25.0, "parameters": None, "cold_start_s": 5.0},
}

_COLD_START = """
import time, sys
t0 = time.perf_counter()
from learner.checkpoint import load_default_model, load_model
from learner.inference import EmotionPredictor
p = EmotionPredictor(load_model(sys.argv[1]) if len(sys.argv) > 1 else load_default_model())
p.warm_up()
print(time.perf_counter() - t0)
"""


def _time_stages(predictor, audio: bytes, runs: int) -> dict[str, list[float]]:
    from learner.audio import decode_audio

    stages = {"decode": [], "features": [], "model": [], "total": []}
    for i in range(runs + 10):
        t0 = time.perf_counter()
        wave = decode_audio(audio)
        t1 = time.perf_counter()
        features = predictor.model.features(wave)  # the model's own kind's
        t2 = time.perf_counter()
        predictor.predict_features(features)
        t3 = time.perf_counter()
        if i >= 10:  # the first runs are warm-up
            for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                stages[name].append(seconds * 1000)
    return stages


def _cold_start_seconds(model_path: Path | None, repeats: int = 3) -> list[float]:
    """Wall time from a new interpreter to a warmed-up model (the interpreter's own start is
    included, as a restarting service pays it too)."""
    samples = []
    for _ in range(repeats):
        args = [sys.executable, "-c", _COLD_START] + ([str(model_path)] if model_path else [])
        t0 = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        samples.append(time.perf_counter() - t0)
    return samples


def run_latency_bench(model_path: Path | None = None, runs: int = 200, cold_starts: int = 3) -> dict:
    from learner.checkpoint import load_default_model, load_model
    from learner.inference import EmotionPredictor, limit_threads
    from learner.model import count_parameters, probe_parameters
    from learner.serving_net import for_serving
    from service.bench.clips import to_wav, to_webm_opus, voiced_clip

    limit_threads(1)
    model = load_model(model_path) if model_path else load_default_model()
    predictor = EmotionPredictor(for_serving(model))  # the form `emoloop serve` runs
    predictor.warm_up()
    clips = {
        "wav-16k": to_wav(voiced_clip(3.0, 16_000), 16_000),
        "webm-opus-48k": to_webm_opus(voiced_clip(3.0, 48_000)),
    }
    results = {}
    for name, audio in clips.items():
        stages = _time_stages(predictor, audio, runs)
        results[name] = {
            stage: {"median_ms": float(np.median(v)), "p95_ms": float(np.percentile(v, 95))}
            for stage, v in stages.items()
        }
    cold = _cold_start_seconds(model_path, cold_starts)
    parameters = count_parameters(model.net)
    trained = count_parameters(model.net, trainable_only=True)  # a frozen encoder's are not
    probe = probe_parameters(model.net)  # fitted by the recipe, never by a round
    headline = results["wav-16k"]["total"]["median_ms"]
    targets = TARGETS_BY_KIND[model.kind]
    lines = [f"emoloop bench latency: 3 s clip, 1 thread, {runs} runs after warm-up"]
    lines.append(f"{'clip':<15}{'stage':<10}{'median ms':>10}{'p95 ms':>9}")
    for name, stages in results.items():
        for stage, s in stages.items():
            lines.append(f"{name:<15}{stage:<10}{s['median_ms']:>10.2f}{s['p95_ms']:>9.2f}")
    lines += [
        f"total median (wav-16k): {headline:.2f} ms   target <= {targets['median_ms']:.0f} ms   "
        f"ratio {headline / targets['median_ms']:.2f}",
        f"cold start (median of {len(cold)}): {np.median(cold):.2f} s   target <= "
        f"{targets['cold_start_s']:.0f} s   ratio {np.median(cold) / targets['cold_start_s']:.2f}",
        f"parameters: {parameters:,} ({parameters - trained - probe:,} in the frozen encoder, "
        f"{trained:,} trained"
        + (f", {probe:,} in the probe's fitted hidden layer" if probe else "") + ")"
        + (f"   target <= {targets['parameters']:,}   ratio "
           f"{parameters / targets['parameters']:.2f}" if targets["parameters"] else ""),
    ]
    return {
        "runs": runs, "threads": 1, "clip_seconds": 3.0, "clips": results,
        "median_ms": headline, "p95_ms": results["wav-16k"]["total"]["p95_ms"],
        "cold_start_s": float(np.median(cold)), "cold_start_samples_s": cold,
        "parameters": parameters, "trained_parameters": trained, "probe_parameters": probe,
        "kind": model.kind,
        "targets": targets, "lines": lines,
    }
