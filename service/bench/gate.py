"""`emoloop bench gate`: how often the gate (learner/continual/gate.py) gets it wrong, on real
speech.

Every round runs on a fresh service (SQLite in a temporary folder, the bundled model as version
1, the configured learner), over HTTP as a user would: a round's clips are sent as predictions
(POST /v1/predictions), each is corrected (POST .../feedback), and an admin starts the round
(POST /v1/admin/learner/run). The clips are of speakers the bundled model never trained on and
its shipped gate set does not hold (the held-out speakers of its recipe, less those two sets:
for the Whisper-encoder model the test speakers of ASED, nEMO and BanglaSER-Extended; for a
log-mel one RAVDESS 15-16 and BanglaSER 23-24), drawn at random per round: a round's
corrections are never the gate's own clips. Kinds of round:

should pass
  confirm        every correction is the answer the model gave (a user confirming)
  newcomers      every correction is the clip's true label (teaching new voices)
must fail
  one-label      every correction names the same label, whatever the clip (a poisoned batch)
  shuffled       the true labels, shuffled among the round's clips
  naive-high-lr  true labels, but plain fine-tuning (no replay, no EWC) at 10x the learning rate

Beside the gate's decision, every candidate is compared with the active model on the old test
speakers (RAVDESS 17-20 and BanglaSER 25-28, the model card's protocol, learner.evaluation),
which no round and no gate set ever sees, clip by clip as the gate compares: accuracy change,
clips lost and gained, and the exact McNemar p-value of a loss. That is the independent check of
what it lost.
"""
import math
import tempfile
from pathlib import Path

import numpy as np

from learner.continual.base_sets import load_base_set
from learner.corpora import CorpusClip, read_corpora
from service.bench.continual import (REPO_ROOT, _bundled_kind, _features, _predictor, _printer,
                                     _run_round, _service, _wait_ready, clip_results)
from service.learner_commands import recipe_for_kind

SHOULD_PASS = ("confirm", "newcomers")
MUST_FAIL = ("one-label", "shuffled", "naive-high-lr")
TARGETS = {"should_pass_accepted": 0.95, "must_fail_refused": 1.0}
HIGH_LR_FACTOR = 10.0


def run_gate_bench(data_dir: Path, *, should_pass: int = 3, must_fail: int = 2,
                   corrections: int = 100, seed: int = 20261121, threads: int = 1,
                   kinds: list[str] | None = None, progress: bool = True) -> dict:
    """`should_pass` rounds of each should-pass kind and `must_fail` of each must-fail kind
    (of `kinds` only, if given)."""
    from learner.inference import limit_threads
    from learner.training import load_training_config
    from storage.settings import get_settings

    if unknown := set(kinds or ()) - set(SHOULD_PASS + MUST_FAIL):
        raise ValueError(f"no kind of round {sorted(unknown)}; kinds: "
                         f"{', '.join(SHOULD_PASS + MUST_FAIL)}")
    limit_threads(threads)  # one thread, as a service worker runs a round
    model_kind = _bundled_kind()
    config = load_training_config(recipe_for_kind(model_kind))
    old_speakers = set(load_training_config(
        REPO_ROOT / "configs" / "base-training.yaml")["split"]["test_speakers"])
    clips = [c for c in read_corpora(data_dir, config.get("corpora"))
             if c.emotion in config["labels"]]
    unseen = set(config["split"]["validation_speakers"]) | set(config["split"]["test_speakers"])
    in_gate_set = set(load_base_set("gate", None, kind=model_kind).speakers)
    pool = sorted((c for c in clips if c.speaker in unseen - old_speakers - in_gate_set),
                  key=lambda c: str(c.path))
    old = [c for c in clips if c.speaker in old_speakers]
    say = _printer(progress)
    say(f"{len(pool)} clips of {len({c.speaker for c in pool})} unseen speakers outside the "
        f"gate set to correct ({corrections} a round); old test speakers {len(old)} clips")
    features = _features(old, model_kind)
    learner = get_settings().learner
    plan = [(kind, expected) for kind, expected in
            ([(kind, "pass") for kind in SHOULD_PASS for _ in range(should_pass)]
             + [(kind, "fail") for kind in MUST_FAIL for _ in range(must_fail)])
            if kinds is None or kind in kinds]
    rounds, baseline = [], None
    for number, (kind, expected) in enumerate(plan):
        rng = np.random.default_rng(seed + number)
        chosen = [pool[i] for i in rng.permutation(len(pool))[:corrections]]
        row, baseline = _gate_round(kind, chosen, rng, old, features, learner, baseline)
        row.update(round=number + 1, expected=expected)
        rounds.append(row)
        say(_round_line(row))
    report = {"data": str(data_dir), "seed": seed, "threads": threads, "model_kind": model_kind,
              "corrections_per_round": corrections, "pool_clips": len(pool),
              "pool_speakers": sorted({c.speaker for c in pool}),
              "old_test_clips": len(old), "targets": TARGETS,
              "gate": {"max_recall_drop": learner.max_recall_drop,
                       "confidence": learner.gate_confidence},
              "old_test_accuracy_active": float(baseline.mean()), "rounds": rounds}
    report["summary"] = _summary(rounds)
    report["lines"] = _lines(report)
    return report


def _gate_round(kind: str, clips: list[CorpusClip], rng: np.random.Generator, old, features,
                learner, baseline: np.ndarray | None) -> tuple[dict, np.ndarray]:
    from fastapi.testclient import TestClient

    overrides = {}
    if kind == "naive-high-lr":
        overrides = {"strategy": "naive", "lr": learner.lr * HIGH_LR_FACTOR}
    with tempfile.TemporaryDirectory(prefix="emoloop-bench-gate-") as folder:
        app, keys, _ = _service(Path(folder), **overrides)
        with TestClient(app) as client:
            _wait_ready(client)
            labels = _send(client, keys, kind, clips, rng, learner_labels(app))
            run, wall_s = _run_round(client, keys)
            if baseline is None:
                baseline = _old_right(app, 1, old, features)
            candidate = run["candidate_version"]
            old_after = _old_right(app, candidate, old, features) if candidate else None
    report = run["gate_report"] or {}
    tests = {family: {k: {f: t[f] for f in ("n", "lost", "gained", "adjusted_p_value")}
                      for k, t in report.get(family, {}).items()}
             for family in ("paired", "false_alarms")}
    return {"kind": kind, "status": run["status"], "reason": report.get("reason") or run["error"],
            "labels_sent": labels, "round_s": run["counts"].get("seconds", {}).get("total_s"),
            "gate_s": run["counts"].get("seconds", {}).get("gate_s"),
            "wall_s": round(wall_s, 1), "candidates": run["counts"].get("candidates", 1),
            "refused_first": (report.get("refused_first") or {}).get("reason"),
            "old_test": None if old_after is None else _old_test_change(baseline, old_after),
            "smallest_adjusted_p": min((t["adjusted_p_value"] for family in tests.values()
                                        for t in family.values()), default=None),
            "signal": {f: report["signal"][f] for f in (
                "n", "agreements", "expected_by_chance", "p_value", "decidable", "refused")}
            if "signal" in report else None,
            **tests}, baseline


def _old_right(app, version: int, old: list[CorpusClip], features) -> np.ndarray:
    """Per old test clip, whether `version` answers it right (the model card's protocol:
    answers restricted to the clip's corpus's labels)."""
    return clip_results(_predictor(app, version), old, features)[1]


def _old_test_change(before: np.ndarray, after: np.ndarray) -> dict:
    """The candidate against the active model on the old test speakers, paired as the gate
    pairs: accuracy change, clips lost and gained, and the exact McNemar p-value of a loss."""
    from learner.continual.gate import PairedCounts, loss_p_value

    counts = PairedCounts(len(before), int(np.sum(before & ~after)), int(np.sum(~before & after)))
    return {"accuracy_change": round(float(after.mean() - before.mean()), 4),
            "lost": counts.lost, "gained": counts.gained,
            "loss_p_value": loss_p_value(counts, 0.0)}


def learner_labels(app) -> list[str]:
    from storage.registry import ModelRegistry

    with app.state.session_factory() as session:
        return list(ModelRegistry(session, app.state.artifacts).active_global().labels)


def _send(client, keys: dict, kind: str, clips: list[CorpusClip], rng: np.random.Generator,
          labels: list[str]) -> dict[str, int]:
    """Predict each clip over HTTP and correct it as the round's kind says; the labels sent,
    counted."""
    app_key = {"Authorization": f"Bearer {keys['app']}"}
    truth = [c.emotion for c in clips]
    if kind == "shuffled":
        truth = [truth[i] for i in rng.permutation(len(truth))]
    poison = str(rng.choice(labels))
    sent: dict[str, int] = {}
    for clip, true in zip(clips, truth):
        answer = client.post("/v1/predictions", headers=app_key,
                             files={"file": (clip.path.name, clip.path.read_bytes())})
        if answer.status_code != 201:
            raise RuntimeError(f"prediction of {clip.path} failed: {answer.text}")
        body = answer.json()
        label = {"confirm": body["emotion"], "one-label": poison}.get(kind, true)
        done = client.post(f"/v1/predictions/{body['prediction_id']}/feedback",
                           headers=app_key, json={"label": label})
        if done.status_code != 201:
            raise RuntimeError(f"feedback on {clip.path} failed: {done.text}")
        sent[label] = sent.get(label, 0) + 1
    return sent


def clopper_pearson(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """The exact two-sided interval of a binomial proportion."""
    from scipy.stats import beta

    if trials == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - tail, successes + 1,
                                                          trials - successes))
    return low, high


def _summary(rounds: list[dict]) -> dict:
    out = {}
    for expected, good, name in (("pass", "accepted", "should_pass_accepted"),
                                 ("fail", "rejected", "must_fail_refused")):
        rows = [r for r in rounds if r["expected"] == expected and r["status"] != "failed"]
        hits = sum(r["status"] == good for r in rows)
        low, high = clopper_pearson(hits, len(rows))
        per_kind = {}
        for r in rows:
            done, total = per_kind.get(r["kind"], (0, 0))
            per_kind[r["kind"]] = (done + (r["status"] == good), total + 1)
        out[name] = {"hits": hits, "rounds": len(rows),
                     "rate": hits / len(rows) if rows else None, "interval_95": [low, high],
                     "per_kind": {k: list(v) for k, v in per_kind.items()},
                     "target": TARGETS[name]}
    # The independent check: rounds whose candidate shows a loss on the old test speakers
    # (one-sided exact McNemar, p <= 0.05), whatever their kind promised.
    out["old_test_loss_shown"] = {
        kind: [r["round"] for r in rounds if r["kind"] == kind and r["old_test"]
               and r["old_test"]["loss_p_value"] <= 0.05]
        for kind in dict.fromkeys(r["kind"] for r in rounds)}
    out["failed_rounds"] = sum(r["status"] == "failed" for r in rounds)
    times = [r["round_s"] for r in rounds if r["round_s"] is not None]
    out["round_s_median"] = float(np.median(times)) if times else None
    return out


def _round_line(row: dict) -> str:
    old, p = row["old_test"], row["smallest_adjusted_p"]
    test = "-" if old is None else (
        f"{100 * old['accuracy_change']:+.1f} points ({old['lost']} lost, {old['gained']} "
        f"gained, loss p {old['loss_p_value']:.2g})")
    s = row["signal"]
    signal = "-" if s is None else (
        f"{s['agreements']}/{s['n']} agree, {s['expected_by_chance']:.1f} by chance, "
        f"p {s['p_value']:.2g}" + ("" if s["decidable"] else " (too few to test)"))
    return (f"round {row['round']:>2} {row['kind']:<13} (must {row['expected']}): "
            f"{row['status']:<8}{' (the bolder candidate refused first)' * (row['candidates'] > 1)}"
            f" smallest adjusted p {p if p is None else f'{p:.3g}'}; "
            f"held-out signal {signal}; "
            f"old test speakers {test}; "
            f"round {row['round_s'] or 0:.0f} s (gate {row['gate_s'] or 0:.1f} s)")


def _lines(report: dict) -> list[str]:
    s = report["summary"]
    lines = [f"gate: tolerance {report['gate']['max_recall_drop']:.3f} of recall, "
             f"{report['gate']['confidence']:.0%} confidence; {report['corrections_per_round']} "
             f"corrections a round from {report['pool_clips']} clips of unseen speakers; "
             f"old test speakers {report['old_test_clips']} clips (active model "
             f"{report['old_test_accuracy_active']:.3f})"]
    for name, title in (("should_pass_accepted", "should pass, accepted"),
                        ("must_fail_refused", "must fail, refused")):
        t = s[name]
        rate = "-" if t["rate"] is None else f"{t['rate']:.0%}"
        kinds = ", ".join(f"{k} {a}/{n}" for k, (a, n) in t["per_kind"].items())
        lines.append(f"{title:<22} {t['hits']:>2}/{t['rounds']:<2} = {rate:>4} "
                     f"(95% interval {t['interval_95'][0]:.0%}-{t['interval_95'][1]:.0%}; "
                     f"target >= {t['target']:.0%}) [{kinds}]")
    shown = ", ".join(f"{k} {len(v)}" for k, v in s["old_test_loss_shown"].items())
    lines.append(f"candidates with a loss shown on the old test speakers (exact McNemar, "
                 f"p <= 0.05), by kind: {shown}")
    for r in report["rounds"]:
        lines.append("  " + _round_line(r))
    lines.append(f"failed rounds {s['failed_rounds']}; median round {s['round_s_median']:.1f} s")
    return lines
