"""`emoloop bench continual`: the learning loop on real speech, strategy against strategy.

Newcomers, in the bundled model's recipe (configs/speech-training.yaml for the Whisper-encoder
model), are either one corpus's test speakers (`--newcomers ased`, the default, or `nemo`): it
never trained on them, and its shipped gate set (its validation speakers) holds none of their
clips; or its validation speakers of the corpora whose sentences are spoken in several emotions
(`--newcomers validation`: RAVDESS, BanglaSER, nEMO; NEWCOMER_CORPORA). It never trained on those
either, but its shipped gate set holds them all, so for them the rounds are gated by the set the
recipe builds when they are not among its validation speakers (`emoloop learner build-base-sets`
with them moved to the test speakers: the other validation speakers' clips, filled up from
training speakers' where a class has fewer than the recipe's minimum), as if they were voices the
gate never heard. Newcomers' clips are split by sentence: within each emotion, each sentence (the
manifest's `text_id`), with every newcomer's clips of it, goes either to the corrections or to
the measured side, about half each way, so no measured clip's words were ever corrected with its
label (in ASED a sentence carries its emotion: the same sentence on both sides would measure
memorised words, not a learnt voice). The old test speakers are the recipe's other test speakers
(with validation newcomers, those of every corpus but ASED: the ASED run's, the same clips), which
no round and no gate set sees.

For each strategy and learner seed (same rounds, same clips; the seed changes the training order,
crops and held-out share) a fresh service (SQLite in a temporary folder, the bundled model as
version 1, the configured learner with only the strategy and seed changed) runs in-process; every
round sends its share of the corrections as predictions (POST /v1/predictions, the clip as it is)
and corrects each with its true label (POST .../feedback; a right answer is confirmed, which
counts too), then starts a round with POST /v1/admin/learner/run and waits for it on
GET /v1/admin/runs/{id}. After each round it measures, with the project's evaluation protocol
(learner.evaluation: per corpus, answers restricted to the corpus's labels), the candidate the
round trained and the version then served, on the newcomers' measured clips and on the old test
speakers. The summary is the served model's change from round 0 to the last round, the median
over seeds, with a 95% interval from a bootstrap over the clips (the same resampled clips for
every seed, so the interval is the median's).

Then, timing alone: one ewc+replay round over `timing_corrections` corrections of other clips
(training speakers; their content does not matter there), on a fresh service, with the shipped
sets.
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
SEEDS = (20261121, 1, 2)  # learner seeds: the default one and two more
VALIDATION = "validation"  # --newcomers: the recipe's validation speakers of NEWCOMER_CORPORA
# Sentences spoken in several emotions: split by sentence, both sides hold every emotion (ASED's
# and BanglaSER-Extended's each carry one emotion, so a sentence split cannot hold words apart).
NEWCOMER_CORPORA = ("ravdess", "banglaser", "nemo")
# The first newcomers (a language the log-mel model never heard): with validation
# newcomers the old test speakers are those of its run, every corpus's but its own.
UNHEARD_CORPUS = "ased"
BOOTSTRAP = 2000  # resamples of the clips for the 95% intervals


def run_continual_bench(data_dir: Path, *, newcomers: str = "ased", rounds: int = 3,
                        strategies: list[str] | None = None, seeds: list[int] | None = None,
                        split_seed: int = 20261121, timing_corrections: int = 500,
                        threads: int = 1, progress: bool = True) -> dict:
    from learner.continual.base_sets import load_base_set
    from learner.inference import limit_threads
    from learner.training import load_training_config
    from service.learner_commands import recipe_for_kind

    # One thread, as a service worker runs (service.app): the round shares the process with
    # the API, and the second core stays for requests.
    limit_threads(threads)
    strategies = strategies or list(STRATEGIES)
    seeds = list(seeds or SEEDS)
    kind = _bundled_kind()
    config = load_training_config(recipe_for_kind(kind))
    clips = [c for c in read_corpora(data_dir, config.get("corpora"))
             if c.emotion in config["labels"]]
    new, old = newcomers_and_old(clips, config["split"], newcomers)
    if not new:
        raise ValueError(f"no newcomers {newcomers!r} in {recipe_for_kind(kind)}")
    in_gate = {c.speaker for c in new} & set(load_base_set("gate", None, kind=kind).speakers)
    if in_gate and newcomers != VALIDATION:
        raise ValueError(f"newcomers {sorted(in_gate)} are in the shipped gate set")
    say = _printer(progress)
    if not rounds:  # `--rounds 0`: the timed round alone
        strategies, chunks, measured, features = [], [], [], None
    else:
        chunks, measured = split_newcomers(new, rounds, np.random.default_rng(split_seed))
        say(f"newcomers {len(new)} clips: {sum(map(len, chunks))} corrected over {rounds} "
            f"rounds, {len(measured)} measured; old test speakers {len(old)} clips; seeds "
            f"{seeds}")
        features = _features({c.path: c for c in measured + old}.values(), kind)
    report = {"data": str(data_dir), "model_kind": kind, "rounds": rounds,
              "split_seed": split_seed, "seeds": seeds, "threads": threads,
              "newcomers": sorted({c.speaker for c in new}),
              "old_test_speakers": sorted({c.speaker for c in old}), "old_test_clips": len(old),
              "corrections_per_round": [len(c) for c in chunks], "measured_clips": len(measured),
              "targets": TARGETS, "strategies": {}}
    with tempfile.TemporaryDirectory(prefix="emoloop-bench-sets-") as sets_dir:
        learner = {}
        if newcomers == VALIDATION and strategies:
            learner["base_sets_dir"] = Path(sets_dir)
            report["gate_set"] = _sets_without(data_dir, config, {c.speaker for c in new}, kind,
                                               Path(sets_dir), say)
        for strategy in strategies:
            runs = {seed: _run_strategy(strategy, seed, chunks, measured, old, features, say,
                                        learner)
                    for seed in seeds}
            report["strategies"][strategy] = {
                "summary": _summary(runs, np.random.default_rng(split_seed)),
                "seeds": {str(seed): {k: v for k, v in run.items() if k != "right"}
                          for seed, run in runs.items()}}
    if timing_corrections:
        timing_clips = _timing_clips(clips, config, timing_corrections, split_seed)
        report["timing"] = _timing_round(timing_clips, say)
    report["lines"] = _lines(report)
    return report


def newcomers_and_old(clips: list[CorpusClip], split: dict, newcomers: str,
                      ) -> tuple[list[CorpusClip], list[CorpusClip]]:
    """The newcomers' clips and the old test speakers' (module docstring), by the recipe's
    `split`: one corpus's test speakers and the other test speakers, or (VALIDATION) the
    validation speakers of NEWCOMER_CORPORA and the test speakers of every corpus but
    UNHEARD_CORPUS."""
    test = set(split["test_speakers"])
    if newcomers == VALIDATION:
        validation = set(split["validation_speakers"])
        return ([c for c in clips if c.speaker in validation and c.corpus in NEWCOMER_CORPORA],
                [c for c in clips if c.speaker in test and c.corpus != UNHEARD_CORPUS])
    return ([c for c in clips if c.speaker in test and c.corpus == newcomers],
            [c for c in clips if c.speaker in test and c.corpus != newcomers])


def split_without(split: dict, speakers: set[str]) -> dict:
    """The recipe's speaker split with `speakers` moved from validation to test: what the base
    sets are built from when they are newcomers (neither trained on, nor in the gate set)."""
    return {**split,
            "validation_speakers": [s for s in split["validation_speakers"] if s not in speakers],
            "test_speakers": list(split["test_speakers"]) + sorted(
                set(speakers) - set(split["test_speakers"]))}


def _sets_without(data_dir: Path, config: dict, speakers: set[str], kind: str, out_dir: Path,
                  say) -> dict:
    """Builds the bundled model's base sets into `out_dir` by its recipe as if `speakers` were
    not its validation speakers; returns their JSON's gate part (sizes)."""
    from learner.continual.base_sets import build_base_sets, load_base_set

    say(f"building the gate set without the newcomers {sorted(speakers)}")
    info = build_base_sets(data_dir, {**config, "split": split_without(config["split"], speakers)},
                           kind=kind, out_dir=out_dir)
    gate = load_base_set("gate", out_dir, kind=kind)
    assert not set(gate.speakers) & speakers  # what this folder is for
    say(f"gate set without them: {len(gate)} clips {info['sets']['gate']['per_class']}")
    return info["sets"]["gate"]


def split_newcomers(newcomers: list[CorpusClip], rounds: int,
                    rng: np.random.Generator) -> tuple[list[list[CorpusClip]], list[CorpusClip]]:
    """Per emotion, whole sentences (`text_id`, all speakers' clips of it) to correct or to
    measure: the sentences in a random order, each to the side with fewer of the emotion's clips
    so far, so each side holds about half (a tie goes to corrections for every other emotion, to
    the measured side for the rest: ASED has 5 sentences an emotion). The corrections are
    shuffled and dealt into `rounds` equal shares."""
    sentences: dict[tuple[str, str, str], list[CorpusClip]] = defaultdict(list)
    for clip in sorted(newcomers, key=lambda c: str(c.path)):
        sentences[(clip.emotion, clip.corpus, clip.text_id)].append(clip)
    corrected, measured = [], []
    for n, emotion in enumerate(sorted({key[0] for key in sentences})):
        keys = sorted(key for key in sentences if key[0] == emotion)
        sides: tuple[list, list] = ([], [])
        for i in rng.permutation(len(keys)):
            fewer = len(sides[0]) - len(sides[1])
            sides[fewer > 0 or (fewer == 0 and n % 2 == 1)].extend(sentences[keys[i]])
        corrected += sides[0]
        measured += sides[1]
    corrected = [corrected[i] for i in rng.permutation(len(corrected))]
    return [list(share) for share in np.array_split(np.array(corrected, dtype=object),
                                                    rounds)], measured


def _summary(runs: dict[int, dict], rng: np.random.Generator) -> dict:
    """The served model's change from round 0 to the last round on each clip set, in points
    (change_summary), and how many rounds each seed's gate accepted."""
    out = {"accepted": [sum(r["status"] == "accepted" for r in run["rounds"][1:])
                        for run in runs.values()]}
    out.update(change_summary([(run["right"][0], run["right"][-1]) for run in runs.values()],
                              rng, ("newcomers", "old_test")))
    return out


def change_summary(outcomes: list[tuple[dict, dict]], rng: np.random.Generator,
                   names: tuple[str, ...]) -> dict:
    """Per clip set in `names`, the change from a start to an end in points, given each seed's
    (start, end) per-clip outcomes: the median over seeds, each seed's, and a 95% interval of
    the median from a bootstrap over the clips (one resampling shared by the seeds: they were
    measured on the same clips)."""
    out = {}
    for name in names:
        start = outcomes[0][0][name]  # the same for every seed
        change = np.stack([end[name].astype(float) - begin[name]
                           for begin, end in outcomes])  # seeds x clips
        per_seed = 100 * change.mean(axis=1)
        picks = rng.integers(0, change.shape[1], size=(BOOTSTRAP, change.shape[1]))
        medians = np.median(100 * change[:, picks].mean(axis=2), axis=0)
        low, high = np.percentile(medians, [2.5, 97.5])
        out[name] = {"clips": int(change.shape[1]),
                     "start": round(100 * float(start.mean()), 2),
                     "median_change": round(float(np.median(per_seed)), 2),
                     "interval_95": [round(float(low), 2), round(float(high), 2)],
                     "per_seed": [round(float(x), 2) for x in per_seed]}
    return out


def _run_strategy(strategy: str, seed: int, chunks, measured, old, features, say,
                  learner: dict) -> dict:
    """Rounds of one strategy and learner seed (`learner`: settings changed besides); "right":
    per round, the served model's per-clip outcomes (for the summary, not the JSON)."""
    from fastapi.testclient import TestClient

    with tempfile.TemporaryDirectory(prefix="emoloop-bench-continual-") as folder:
        app, keys, settings = _service(Path(folder), strategy=strategy, seed=seed, **learner)
        with TestClient(app) as client:
            _wait_ready(client)
            row, right = _measure(app, None, 1, measured, old, features)
            rows, rights = [{"round": 0, **row}], [right]
            say(_round_line(strategy, seed, rows[0]))
            for number, share in enumerate(chunks, start=1):
                _correct(client, keys, share)
                run, wall_s = _run_round(client, keys)
                served = _active_version(app)
                row, right = _measure(app, run["candidate_version"], served, measured, old,
                                      features)
                rows.append({"round": number, "status": run["status"],
                             "reason": (run["gate_report"] or {}).get("reason") or run["error"],
                             "round_s": run["counts"].get("seconds", {}).get("total_s"),
                             "wall_s": round(wall_s, 2), "counts": run["counts"], **row})
                rights.append(right)
                say(_round_line(strategy, seed, rows[-1]))
    return {"learner": settings.learner.model_dump(mode="json"), "rounds": rows,
            "right": rights}


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


def _measure(app, candidate: int | None, served: int, measured, old,
             features) -> tuple[dict, dict[str, np.ndarray]]:
    """(the figures of the served version and the candidate, the served one's per-clip
    outcomes)."""
    figures, right = _evaluate(app, served, measured, old, features)
    out = {"served_version": served, "served": figures}
    if candidate is not None:
        out["candidate_version"] = candidate
        out["candidate"] = _evaluate(app, candidate, measured, old, features)[0]
    return out, right


def _evaluate(app, version: int, measured, old,
              features) -> tuple[dict, dict[str, np.ndarray]]:
    predictor = _predictor(app, version)
    result, right = {}, {}
    for name, clips in (("newcomers", measured), ("old_test", old)):
        report, right[name] = clip_results(predictor, clips, features)
        result[name] = {"accuracy": round(report["accuracy"], 4),
                        "recall": {k: round(v["recall"], 3)
                                   for k, v in report["per_class"].items()}}
    return result, right


def _predictor(app, version: int):
    """The service's model version `version`, loaded to answer."""
    from learner.continual.rounds import load_version
    from learner.inference import EmotionPredictor

    return EmotionPredictor(load_version(app.state.artifacts, _version(app, version)))


def clip_results(predictor, clips: list[CorpusClip], features) -> tuple[dict, np.ndarray]:
    """The evaluation report on `clips` (learner.evaluation: answers restricted to each clip's
    corpus's labels) and, per clip, whether the answer was right."""
    from learner.evaluation import build_report, feature_outcomes

    outcomes, skipped = feature_outcomes(predictor, clips, [features[c.path] for c in clips])
    return (build_report(outcomes, skipped, predictor.labels),
            np.array([o.truth == o.predicted for o in outcomes], dtype=bool))


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
              "epochs": run["counts"]["epochs"], "candidates": run["counts"]["candidates"]}
    say(f"timing: a round over {len(clips)} corrections took {timing['round_s']:.1f} s "
        f"({json.dumps(timing['seconds'])})")
    return timing


def _round_line(strategy: str, seed: int, row: dict) -> str:
    served = row["served"]
    text = (f"{strategy:<11} seed {seed} round {row['round']}: served v{row['served_version']} "
            f"newcomers {served['newcomers']['accuracy']:.3f} "
            f"old {served['old_test']['accuracy']:.3f}")
    if "candidate" in row:
        cand = row["candidate"]
        bolder = " (the bolder candidate refused first)" * (row["counts"].get("candidates") == 2)
        text += (f" | candidate v{row['candidate_version']} {row['status']}{bolder}: newcomers "
                 f"{cand['newcomers']['accuracy']:.3f} old {cand['old_test']['accuracy']:.3f} "
                 f"in {row['round_s']:.1f} s")
    elif row["round"]:
        text += f" | {row['status']}: {row['reason']}"
    return text


def _lines(report: dict) -> list[str]:
    if not report["rounds"]:
        return _timing_lines(report)
    lines = [f"newcomers {', '.join(report['newcomers'])}: corrections per round "
             f"{report['corrections_per_round']}, {report['measured_clips']} clips measured; "
             f"old test speakers {len(report['old_test_speakers'])} "
             f"({report['old_test_clips']} clips); seeds {report['seeds']}; "
             f"{report['threads']} thread",
             "served model, round 0 -> last, points: median over seeds [95% interval] "
             "(each seed)"]
    for strategy, result in report["strategies"].items():
        summary = result["summary"]
        figures = []
        for name in ("newcomers", "old_test"):
            part = summary[name]
            figures.append(f"{name} {part['start']:.1f}% {part['median_change']:+.1f} "
                           f"[{part['interval_95'][0]:+.1f}, {part['interval_95'][1]:+.1f}] "
                           f"({', '.join(f'{x:+.1f}' for x in part['per_seed'])})")
        rounds = report["rounds"]
        accepted = ", ".join(f"{a}/{rounds}" for a in summary["accepted"])
        lines.append(f"{strategy:<11} {'; '.join(figures)}; accepted {accepted}")
        rows = [r for run in result["seeds"].values() for r in run["rounds"][1:]]
        times = [r["round_s"] for r in rows if r.get("round_s") is not None]
        worst = min((r for r in rows if "candidate" in r),
                    key=lambda r: r["candidate"]["old_test"]["accuracy"], default=None)
        if worst is not None:
            lines.append(f"{'':<11} median round {float(np.median(times)):.1f} s; worst "
                         f"candidate old test {worst['candidate']['old_test']['accuracy']:.3f} "
                         f"({worst['status']}: {worst['reason']})")
    return lines + _timing_lines(report)


def _timing_lines(report: dict) -> list[str]:
    if "timing" not in report:
        return []
    t = report["timing"]
    return [f"a round over {t['corrections']} corrections: {t['round_s']:.1f} s "
            f"(target {TARGETS['round_500_corrections_s']:.0f} s; phases "
            f"{json.dumps(t['seconds'])}; {t['candidates']} candidate(s); {t['status']})"]


def _printer(progress: bool):
    import sys

    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)
    return say
