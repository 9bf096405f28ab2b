"""`emoloop bench stream`: emotion over time on recordings with known changes, and the cost of
analysing a long one.

Accuracy. For each speaker the bundled model never trained on (its test speakers; `--speakers
validation` for the speakers the smoothing was tuned on), the benchmark joins that speaker's
corpus clips into recordings: runs of 3-8 clips of one emotion, then another emotion (clips of
a run drawn without repeats; the recording is made in memory and never written). Every window
(3 s, 1 s hop, as served) is scored against the emotion at its centre:
- raw: the model's own answer per window;
- filtered: the HMM's causal answer (what a live view shows; uses the past only);
- segments: the Viterbi segments of the finished recording.
Boundaries: a true change counts as found when a segment boundary (as served:
`learner.timeline.segments`) lies within 1.5 s of it; segment boundaries with no true change
within 1.5 s are reported too (a timeline that cut everywhere would find every change), and
so are the changes found with every boundary half-way between the two windows' centres (what
`learner.timeline.boundary` improves on). Label changes per minute: raw windows, filtered windows
and segments, beside the true rate. The model's posteriors are computed once per recording;
the HMM is then rerun for a few self-transition values (the sweep the setting was chosen on).

Capacity (`--streams 4,8,16`): concurrent real-time streams against `emoloop serve` on loopback
(service/bench/stream_capacity.py).

Cost. A 10-minute recording (clips of the test speakers, joined, written as 48 kHz 16-bit WAV
like a recorder's file) is analysed from the file with one torch thread, as a service worker
does, in a fresh process each run; the median wall time against the target of 1/20 of the
duration, and the process's peak RSS beside that of a 1-minute recording (bounded memory: the
two should be close).
"""
import json
import random
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from learner.smoothing import SILENCE, EmotionHmm, ForwardFilter, viterbi
from learner.timeline import segments

TARGETS = {"boundaries_within_1_5s": 0.80, "label_change_reduction": 0.50,
           "seconds_per_audio_second": 1 / 20}
BOUNDARY_TOLERANCE_S = 1.5
SWEEP = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
SEED = 15


def run_stream_bench(data_dir: Path, *, speakers: str = "test", recordings: int = 2,
                     runs: int = 8, cost_runs: int = 3, streams: list[int] | None = None,
                     stream_seconds: float = 20.0, workers: int = 2) -> dict:
    from learner.checkpoint import load_default_model
    from learner.inference import EmotionPredictor, limit_threads
    from storage.settings import get_settings

    limit_threads(1)
    settings = get_settings().timeline
    predictor = EmotionPredictor(load_default_model())
    made = _recordings(Path(data_dir), predictor, speakers, recordings, runs)
    report = {"speakers": speakers, "recordings": len(made),
              "clips": sum(r["clips"] for r in made),
              "audio_minutes": round(sum(r["duration_s"] for r in made) / 60, 1),
              "changes": sum(len(r["changes"]) for r in made),
              "windows": sum(len(r["observations"]) for r in made),
              "self_transition": settings.self_transition,
              "window_s": settings.window_s, "hop_s": settings.hop_s,
              "accuracy": {str(p): _score(made, predictor.labels, p) for p in
                           sorted(set(SWEEP) | {settings.self_transition})},
              "cost": _cost(Path(data_dir), cost_runs) if cost_runs else None,
              "streams": _capacity(streams, stream_seconds, workers) if streams else None,
              "targets": TARGETS}
    report["lines"] = _lines(report)
    return report


def _recordings(data_dir: Path, predictor, which: str, per_speaker: int, runs: int) -> list:
    """Run the served analysis on each joined recording; keep the window observations (the
    model's posteriors, computed once here and reused by every setting `_score` tries) and
    the truth."""
    from learner.timeline import analyse_recording
    from storage.settings import get_settings

    made = []
    for joined in _joined(data_dir, which, per_speaker, runs):
        timeline = analyse_recording([np.concatenate(joined["waves"])], predictor,
                                     get_settings().timeline)
        made.append({"speaker": joined["speaker"], "duration_s": timeline.duration_s,
                     "clips": len(joined["waves"]), "changes": joined["changes"],
                     "windows": timeline.windows,
                     "observations": [None if w.probabilities is None else
                                      np.array([w.probabilities[k] for k in predictor.labels])
                                      for w in timeline.windows],
                     "truth": [_emotion_at((w.start + w.end) / 2, joined["truth"])
                               for w in timeline.windows]})
    return made


def _joined(data_dir: Path, which: str, per_speaker: int, runs: int) -> Iterator[dict]:
    """Each speaker's clips joined into recordings (seeded): the decoded clips in order, what
    emotion each spans, and the times of the changes."""
    from learner.audio import decode_audio
    from learner.corpora import read_corpora

    info = json.loads((Path(__file__).resolve().parents[2] / "learner" / "default_model"
                       / "model.json").read_text())
    wanted = set(info["split"][f"{which}_speakers"])
    by_speaker: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for clip in read_corpora(data_dir):
        if clip.speaker in wanted:
            by_speaker[clip.speaker][clip.emotion].append(clip)
    rng = random.Random(SEED)
    for speaker in sorted(by_speaker):
        pools = {e: c for e, c in by_speaker[speaker].items() if len(c) >= 3}
        for _ in range(per_speaker):
            waves, truth, changes, t, previous = [], [], [], 0.0, None
            for _ in range(runs):
                emotion = rng.choice(sorted(set(pools) - {previous}))
                run = rng.sample(pools[emotion], min(len(pools[emotion]), rng.randint(3, 8)))
                if previous is not None:
                    changes.append(t)
                for clip in run:
                    wave = decode_audio(clip.path)
                    waves.append(wave)
                    truth.append((t, t + len(wave) / 16_000, emotion))
                    t += len(wave) / 16_000
                previous = emotion
            yield {"speaker": speaker, "waves": waves, "truth": truth, "changes": changes}


def _emotion_at(t: float, truth: list[tuple[float, float, str]]) -> str:
    return next((e for start, end, e in truth if start <= t < end), truth[-1][2])


def _score(made: list, labels: tuple[str, ...], self_transition: float) -> dict:
    hmm = EmotionHmm.sticky(labels, self_transition)
    hits = {"raw": 0, "filtered": 0, "segments": 0}
    switches = {"raw": 0, "filtered": 0, "segments": 0, "true": 0}
    found = found_half_way = spurious = boundaries = n = invisible = found_visible = 0
    minutes = sum(r["duration_s"] for r in made) / 60
    for r in made:
        raw = [SILENCE if o is None else labels[int(np.argmax(o))] for o in r["observations"]]
        live = ForwardFilter(hmm)
        filtered = [live.label(o) for o in r["observations"]]
        path = viterbi(hmm, r["observations"])
        centres = [(w.start + w.end) / 2 for w in r["windows"]]
        cuts = [s.start for s in segments(r["windows"], path, r["duration_s"])[1:]]
        half_way = [(a + b) / 2 for a, b, x, y in zip(centres, centres[1:], path, path[1:])
                    if x != y]
        for name, answers in (("raw", raw), ("filtered", filtered), ("segments", path)):
            hits[name] += sum(a == t for a, t in zip(answers, r["truth"]))
            switches[name] += sum(a != b for a, b in zip(answers, answers[1:]))
        switches["true"] += len(r["changes"])
        for c in r["changes"]:
            hit = any(abs(c - cut) <= BOUNDARY_TOLERANCE_S for cut in cuts)
            found += hit
            found_half_way += any(abs(c - cut) <= BOUNDARY_TOLERANCE_S for cut in half_way)
            if _model_sees_no_change(r, c, labels):
                invisible += 1
            else:
                found_visible += hit
        spurious += sum(not any(abs(c - cut) <= BOUNDARY_TOLERANCE_S for c in r["changes"])
                        for cut in cuts)
        boundaries += len(cuts)
        n += len(raw)
    changes = sum(len(r["changes"]) for r in made)
    return {"window_accuracy": {k: round(v / n, 4) for k, v in hits.items()},
            "changes_per_minute": {k: round(v / minutes, 2) for k, v in switches.items()},
            "boundaries_within_1_5s": round(found / max(changes, 1), 4),
            "half_way_boundaries_within_1_5s": round(found_half_way / max(changes, 1), 4),
            # Changes where the model's own answer does not change (the same label has the
            # highest mean probability over the 3 windows before and the 3 after): no HMM over
            # its labels can place those; the rest is what smoothing can be judged on.
            "changes_the_model_does_not_see": invisible,
            "visible_boundaries_within_1_5s": round(found_visible / max(changes - invisible, 1),
                                                    4),
            "segment_boundaries": boundaries, "spurious_boundaries": spurious}


_COST_SCRIPT = """
import json, resource, sys, time
from learner.audio_chunks import AudioChunks
from learner.checkpoint import load_default_model
from learner.inference import EmotionPredictor, limit_threads
from learner.timeline import analyse_recording
from storage.settings import get_settings
limit_threads(1)
settings = get_settings()
predictor = EmotionPredictor(load_default_model())
predictor.warm_up()
loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
timeline = analyse_recording(AudioChunks(sys.argv[1], max_seconds=3600), predictor,
                             settings.timeline)
print(json.dumps({"seconds": time.perf_counter() - start, "duration_s": timeline.duration_s,
                  "loaded_rss_mb": loaded_mb,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _cost(data_dir: Path, runs: int) -> dict:
    """Analyse a 10-minute and a 1-minute file, each in fresh processes; medians."""
    import soundfile as sf
    import soxr

    from learner.audio import decode_audio
    from learner.corpora import read_corpora

    info = json.loads((Path(__file__).resolve().parents[2] / "learner" / "default_model"
                       / "model.json").read_text())
    clips = [c for c in read_corpora(data_dir) if c.speaker in set(info["split"]["test_speakers"])]
    random.Random(SEED).shuffle(clips)
    out = {}
    with tempfile.TemporaryDirectory(prefix="emoloop-bench-stream-") as tmp:
        for minutes in (10, 1):
            path = Path(tmp) / f"{minutes}min.wav"
            with sf.SoundFile(path, "w", samplerate=48_000, channels=1, subtype="PCM_16") as f:
                written = 0.0
                for clip in clips:
                    if written >= minutes * 60:
                        break
                    wave = decode_audio(clip.path)[: int((minutes * 60 - written) * 16_000)]
                    f.write(soxr.resample(wave, 16_000, 48_000))
                    written += len(wave) / 16_000
            results = [json.loads(subprocess.run(
                [sys.executable, "-c", _COST_SCRIPT, str(path)], capture_output=True, text=True,
                check=True, cwd=Path(__file__).resolve().parents[2]).stdout)
                for _ in range(runs)]
            seconds = statistics.median(r["seconds"] for r in results)
            out[f"{minutes}min"] = {
                "duration_s": results[0]["duration_s"], "runs": runs,
                "median_seconds": round(seconds, 2),
                "seconds_per_audio_second": round(seconds / results[0]["duration_s"], 4),
                "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in results), 1),
                "loaded_rss_mb": round(statistics.median(r["loaded_rss_mb"] for r in results), 1)}
    return out


def _capacity(levels: list[int], seconds: float, workers: int) -> dict:
    from service.bench.stream_capacity import run_capacity

    return run_capacity(levels, seconds=seconds, workers=workers)


def _model_sees_no_change(recording: dict, change_s: float, labels: tuple[str, ...]) -> bool:
    pairs = list(zip(recording["windows"], recording["observations"]))
    before = [o for w, o in pairs if w.end <= change_s and o is not None][-3:]
    after = [o for w, o in pairs if w.start >= change_s and o is not None][:3]
    if not before or not after:
        return False
    return int(np.argmax(np.mean(before, axis=0))) == int(np.argmax(np.mean(after, axis=0)))


def _lines(report: dict) -> list[str]:
    lines = [f"emoloop bench stream: {report['recordings']} recordings of "
             f"{report['speakers']} speakers ({report['clips']} clips), "
             f"{report['audio_minutes']} min, {report['windows']} windows "
             f"({report['window_s']:g} s, hop {report['hop_s']:g} s), "
             f"{report['changes']} true changes",
             f"{'self-transition':>16} {'raw acc':>8} {'filtered':>9} {'segments':>9} "
             f"{'within 1.5 s (half-way)':>23} {'spurious':>9} {'changes/min raw':>16} "
             f"{'filtered':>9} {'segments':>9} {'true':>6}"]
    for p, a in report["accuracy"].items():
        acc, cpm = a["window_accuracy"], a["changes_per_minute"]
        mark = " (setting)" if float(p) == report["self_transition"] else ""
        lines.append(f"{p + mark:>16} {acc['raw']:>8.3f} {acc['filtered']:>9.3f} "
                     f"{acc['segments']:>9.3f} {a['boundaries_within_1_5s']:>16.3f} "
                     f"({a['half_way_boundaries_within_1_5s']:.3f}) "
                     f"{a['spurious_boundaries']:>4}/{a['segment_boundaries']:<4} "
                     f"{cpm['raw']:>16.2f} {cpm['filtered']:>9.2f} {cpm['segments']:>9.2f} "
                     f"{cpm['true']:>6.2f}")
    chosen = report["accuracy"][str(report["self_transition"])]
    cpm = chosen["changes_per_minute"]
    lines.append(
        f"targets at the setting: smoothed >= raw accuracy: filtered "
        f"{chosen['window_accuracy']['filtered'] >= chosen['window_accuracy']['raw']}, "
        f"segments {chosen['window_accuracy']['segments'] >= chosen['window_accuracy']['raw']}; "
        f"boundaries within 1.5 s {chosen['boundaries_within_1_5s']:.0%} (target 80%; "
        f"{chosen['visible_boundaries_within_1_5s']:.0%} of the "
        f"{report['changes'] - chosen['changes_the_model_does_not_see']} changes the model's own "
        f"answer shows); "
        f"fewer changes/min: filtered {1 - cpm['filtered'] / cpm['raw']:.0%}, segments "
        f"{1 - cpm['segments'] / cpm['raw']:.0%} (target 50%)")
    for name, c in (report["cost"] or {}).items():
        lines.append(f"cost {name}: {c['duration_s']:.0f} s analysed in {c['median_seconds']} s "
                     f"(median of {c['runs']} fresh processes, 1 torch thread) = "
                     f"{c['seconds_per_audio_second']:.4f} of its duration (target <= "
                     f"{TARGETS['seconds_per_audio_second']:.3f}); peak RSS {c['peak_rss_mb']} MB "
                     f"({c['loaded_rss_mb']} MB with the model loaded, before the recording)")
    if report["streams"]:
        capacity = report["streams"]
        for n, level in capacity["levels"].items():
            lines.append(f"streams {n:>3}: {level['answers']} answers, p50 {level['p50_ms']} ms, "
                         f"p99 {level['p99_ms']} ms after the hop, {level['dropped']} dropped, "
                         f"load average {level['load_average']}: "
                         f"{'holds' if level['holds'] else 'does not hold'}")
        lines.append(f"capacity: {capacity['capacity']} concurrent real-time streams "
                     f"(p99 <= {capacity['max_p99_ms']:.0f} ms, 0 dropped), emoloop serve "
                     f"--workers {capacity['workers']}, bundled model, clients on the same "
                     f"machine")
    return lines
