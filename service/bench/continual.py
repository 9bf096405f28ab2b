"""`emoloop bench continual`: the learning loop on real speech, strategy against strategy.

Newcomers are the default model's validation speakers (configs/base-training.yaml: it never
trained on them). Per newcomer and emotion, half of their clips are for corrections and the other
half only ever measured. For each strategy (same seed, same rounds, same clips) a fresh service
(SQLite in a temporary folder, the bundled model as version 1, the configured learner with only
the strategy changed) runs in-process; every round sends its share of the correction clips as
predictions (POST /v1/predictions, the FLAC file as it is) and corrects each with its true label
(POST .../feedback; a right answer is confirmed, which counts too), then starts a round with
POST /v1/admin/learner/run and waits for it on GET /v1/admin/runs/{id}. After each round it
measures, with the project's evaluation protocol (learner.evaluation: per corpus, answers
restricted to the corpus's labels), the candidate the round trained and the version then served,
on the newcomers' measured clips and on the old test speakers, and it reports per-class recall
and the round's own time.

Then, timing alone: one ewc+replay round over `timing_corrections` corrections of other clips
(training speakers; their content does not matter there), on a fresh service.
"""
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from learner.continual.strategies import STRATEGIES
from learner.corpora import CorpusClip, read_corpora

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
TARGETS = {"newcomer_gain_points": 10.0, "old_test_loss_points_ewc_replay": 1.0,
           "round_500_corrections_s": 60.0}


def run_continual_bench(data_dir: Path, *, rounds: int = 3, strategies: list[str] | None = None,
                        seed: int = 20261121, timing_corrections: int = 500, threads: int = 1,
                        progress: bool = True) -> dict:
    from learner.inference import limit_threads
    from learner.training import load_training_config

    # One thread, as a service worker runs (service.app): the round shares the process with
    # the API, and the second core stays for requests.
    limit_threads(threads)
    strategies = strategies or list(STRATEGIES)
    config = load_training_config(REPO_ROOT / "configs" / "base-training.yaml")
    clips = [c for c in read_corpora(data_dir, config.get("corpora"))
             if c.emotion in config["labels"]]
    newcomers = [c for c in clips if c.speaker in config["split"]["validation_speakers"]]
    old = [c for c in clips if c.speaker in config["split"]["test_speakers"]]
    chunks, measured = split_newcomers(newcomers, rounds, np.random.default_rng(seed))
    say = _printer(progress)
    say(f"newcomers {len(newcomers)} clips: {sum(map(len, chunks))} corrected over {rounds} "
        f"rounds, {len(measured)} measured; old test speakers {len(old)} clips")
    features = _features({c.path: c for c in measured + old}.values(), _bundled_kind())
    report = {"data": str(data_dir), "rounds": rounds, "seed": seed, "threads": threads,
              "newcomers": sorted({c.speaker for c in newcomers}),
              "old_test_speakers": sorted({c.speaker for c in old}),
              "corrections_per_round": [len(c) for c in chunks], "measured_clips": len(measured),
              "targets": TARGETS, "strategies": {}}
    for strategy in strategies:
        report["strategies"][strategy] = _run_strategy(strategy, chunks, measured, old,
                                                       features, say)
    if timing_corrections:
        timing_clips = _timing_clips(clips, config, timing_corrections, seed)
        report["timing"] = _timing_round(timing_clips, say)
    report["lines"] = _lines(report)
    return report


def split_newcomers(newcomers: list[CorpusClip], rounds: int,
                    rng: np.random.Generator) -> tuple[list[list[CorpusClip]], list[CorpusClip]]:
    """Per speaker and emotion, half the clips (rounded down) to correct, the rest to measure;
    the corrections are shuffled and dealt into `rounds` equal shares."""
    groups: dict[tuple[str, str], list[CorpusClip]] = defaultdict(list)
    for clip in sorted(newcomers, key=lambda c: str(c.path)):
        groups[(clip.speaker, clip.emotion)].append(clip)
    corrected, measured = [], []
    for key in sorted(groups):
        group = groups[key]
        order = rng.permutation(len(group))
        half = len(group) // 2
        corrected += [group[i] for i in order[:half]]
        measured += [group[i] for i in order[half:]]
    corrected = [corrected[i] for i in rng.permutation(len(corrected))]
    return [list(share) for share in np.array_split(np.array(corrected, dtype=object),
                                                    rounds)], measured


def _run_strategy(strategy: str, chunks, measured, old, features, say) -> dict:
    from fastapi.testclient import TestClient

    with tempfile.TemporaryDirectory(prefix="emoloop-bench-continual-") as folder:
        app, keys, settings = _service(Path(folder), strategy=strategy)
        with TestClient(app) as client:
            _wait_ready(client)
            rows = [{"round": 0, **_measure(app, None, 1, measured, old, features)}]
            say(_round_line(strategy, rows[0]))
            for number, share in enumerate(chunks, start=1):
                _correct(client, keys, share)
                run, wall_s = _run_round(client, keys)
                served = _active_version(app)
                row = {"round": number, "status": run["status"],
                       "reason": (run["gate_report"] or {}).get("reason") or run["error"],
                       "round_s": run["counts"].get("seconds", {}).get("total_s"),
                       "wall_s": round(wall_s, 2), "counts": run["counts"],
                       **_measure(app, run["candidate_version"], served, measured, old,
                                  features)}
                rows.append(row)
                say(_round_line(strategy, row))
    return {"learner": settings.learner.model_dump(mode="json"), "rounds": rows}


def _service(folder: Path, **learner):
    """A fresh service on SQLite in `folder`: migrated, the bundled model as version 1, keys."""
    from service.app import create_app
    from service.bootstrap import register_bundled_model
    from storage.api_keys import ApiKeyRepository
    from storage.artifacts import open_artifact_store
    from storage.db import create_db_engine, make_session_factory
    from storage.migrate import upgrade_to_head
    from storage.settings import Settings, get_settings

    configured = get_settings()
    settings = Settings(storage={"data_dir": folder},
                        api={"max_audio_seconds": 60.0, "max_upload_bytes": 50 * 2**20},
                        learner={**configured.learner.model_dump(), "enabled": False, **learner},
                        personal={**configured.personal.model_dump(), "enabled": False})
    upgrade_to_head(settings.database.url)
    engine = create_db_engine(settings.database.url)
    try:
        session_factory = make_session_factory(engine)
        register_bundled_model(session_factory, open_artifact_store(settings, engine))
        with session_factory() as session:
            keys = {role: ApiKeyRepository(session).create(f"bench {role}", role)[1]
                    for role in ("app", "admin")}
            session.commit()
    finally:
        engine.dispose()
    return create_app(settings), keys, settings


def _wait_ready(client, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/ready").status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the service did not become ready")
        time.sleep(0.05)


def _correct(client, keys: dict, clips: list[CorpusClip]) -> None:
    app_key = {"Authorization": f"Bearer {keys['app']}"}
    for clip in clips:
        answer = client.post("/v1/predictions", headers=app_key,
                             files={"file": (clip.path.name, clip.path.read_bytes())})
        if answer.status_code != 201:
            raise RuntimeError(f"prediction of {clip.path} failed: {answer.text}")
        done = client.post(f"/v1/predictions/{answer.json()['prediction_id']}/feedback",
                           headers=app_key, json={"label": clip.emotion})
        if done.status_code != 201:
            raise RuntimeError(f"feedback on {clip.path} failed: {done.text}")


def _run_round(client, keys: dict, timeout_s: float = 1800) -> tuple[dict, float]:
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    started = time.perf_counter()
    response = client.post("/v1/admin/learner/run", headers=admin)
    if response.status_code != 202:
        raise RuntimeError(f"could not start a round: {response.text}")
    run_id = response.json()["run_id"]
    while True:
        run = client.get(f"/v1/admin/runs/{run_id}", headers=admin).json()
        if run["status"] != "running":
            return run, time.perf_counter() - started
        if time.perf_counter() - started > timeout_s:
            raise RuntimeError(f"round {run_id} did not finish in {timeout_s} s")
        time.sleep(0.2)


def _measure(app, candidate: int | None, served: int, measured, old, features) -> dict:
    out = {"served_version": served, "served": _evaluate(app, served, measured, old, features)}
    if candidate is not None:
        out["candidate_version"] = candidate
        out["candidate"] = _evaluate(app, candidate, measured, old, features)
    return out


def _evaluate(app, version: int, measured, old, features) -> dict:
    from learner.evaluation import evaluate_features
    from learner.inference import EmotionPredictor
    from learner.continual.rounds import load_version

    predictor = EmotionPredictor(load_version(app.state.artifacts, _version(app, version)))
    result = {}
    for name, clips in (("newcomers", measured), ("old_test", old)):
        report = evaluate_features(predictor, clips, [features[c.path] for c in clips])
        result[name] = {"accuracy": round(report["accuracy"], 4),
                        "recall": {k: round(v["recall"], 3)
                                   for k, v in report["per_class"].items()}}
    return result


def _version(app, number: int):
    from storage.registry import ModelRegistry

    with app.state.session_factory() as session:
        return ModelRegistry(session, app.state.artifacts).get(number)


def _active_version(app) -> int:
    from storage.registry import ModelRegistry

    with app.state.session_factory() as session:
        return ModelRegistry(session, app.state.artifacts).active_global().version


def _bundled_kind() -> str:
    """The bundled model's kind: every version a bench round makes descends from it and reads
    the same features, so they are computed once for all."""
    from learner.checkpoint import load_default_model

    return load_default_model().kind


def _features(clips, kind: str) -> dict[Path, np.ndarray]:
    from learner.evaluation import clip_features

    clips = list(clips)
    computed = clip_features([str(c.path) for c in clips], kind=kind)
    if unreadable := [str(c.path) for c, f in zip(clips, computed) if f is None]:
        raise RuntimeError(f"clips that do not decode: {unreadable[:3]}")
    return {c.path: f for c, f in zip(clips, computed)}


def _timing_clips(clips: list[CorpusClip], config: dict, n: int, seed: int) -> list[CorpusClip]:
    held = set(config["split"]["validation_speakers"]) | set(config["split"]["test_speakers"])
    pool = sorted((c for c in clips if c.speaker not in held), key=lambda c: str(c.path))
    order = np.random.default_rng(seed + 1).permutation(len(pool))[:n]
    return [pool[i] for i in order]


def _timing_round(clips: list[CorpusClip], say) -> dict:
    from fastapi.testclient import TestClient

    with tempfile.TemporaryDirectory(prefix="emoloop-bench-timing-") as folder:
        app, keys, _ = _service(Path(folder), strategy="ewc+replay")
        with TestClient(app) as client:
            _wait_ready(client)
            _correct(client, keys, clips)
            run, wall_s = _run_round(client, keys)
    timing = {"corrections": len(clips), "status": run["status"],
              "round_s": run["counts"]["seconds"]["total_s"], "wall_s": round(wall_s, 2),
              "seconds": run["counts"]["seconds"], "steps": run["counts"]["steps"],
              "epochs": run["counts"]["epochs"]}
    say(f"timing: a round over {len(clips)} corrections took {timing['round_s']:.1f} s "
        f"({json.dumps(timing['seconds'])})")
    return timing


def _round_line(strategy: str, row: dict) -> str:
    served = row["served"]
    text = (f"{strategy:<11} round {row['round']}: served v{row['served_version']} newcomers "
            f"{served['newcomers']['accuracy']:.3f} old {served['old_test']['accuracy']:.3f}")
    if "candidate" in row:
        cand = row["candidate"]
        text += (f" | candidate v{row['candidate_version']} {row['status']}: newcomers "
                 f"{cand['newcomers']['accuracy']:.3f} old {cand['old_test']['accuracy']:.3f} "
                 f"in {row['round_s']:.1f} s")
    elif row["round"]:
        text += f" | {row['status']}: {row['reason']}"
    return text


def _lines(report: dict) -> list[str]:
    lines = [f"newcomers {', '.join(report['newcomers'])}: corrections per round "
             f"{report['corrections_per_round']}, {report['measured_clips']} clips measured; "
             f"old test speakers {len(report['old_test_speakers'])}; {report['threads']} thread",
             f"{'strategy':<11} {'newcomers':>18} {'old test':>18} {'accepted':>9} "
             f"{'round s (median)':>17}   (served model: round 0 -> last; candidates in JSON)"]
    for strategy, result in report["strategies"].items():
        rows = result["rounds"]
        first, last = rows[0]["served"], rows[-1]["served"]
        times = [r["round_s"] for r in rows[1:] if r.get("round_s") is not None]
        accepted = sum(r["status"] == "accepted" for r in rows[1:])
        lines.append(
            f"{strategy:<11} {first['newcomers']['accuracy']:>7.3f} -> "
            f"{last['newcomers']['accuracy']:.3f} {first['old_test']['accuracy']:>7.3f} -> "
            f"{last['old_test']['accuracy']:.3f} {accepted:>5}/{len(rows) - 1:<3} "
            f"{float(np.median(times)) if times else float('nan'):>13.1f}")
        worst = min((r for r in rows[1:] if "candidate" in r),
                    key=lambda r: r["candidate"]["old_test"]["accuracy"], default=None)
        if worst is not None:
            lines.append(f"{'':<11} worst candidate: round {worst['round']} old test "
                         f"{worst['candidate']['old_test']['accuracy']:.3f} "
                         f"({worst['status']}: {worst['reason']})")
    if "timing" in report:
        t = report["timing"]
        lines.append(f"a round over {t['corrections']} corrections: {t['round_s']:.1f} s "
                     f"(target {TARGETS['round_500_corrections_s']:.0f} s; phases "
                     f"{json.dumps(t['seconds'])})")
    return lines


def _printer(progress: bool):
    import sys

    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)
    return say
