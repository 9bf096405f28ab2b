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
    if "encoder" not in config and args.linear_probe:
        print("emoloop train: --linear-probe needs a recipe with an encoder", file=sys.stderr)
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
    from learner.corpora import CorpusError
    from learner.evaluation import evaluate_folder

    try:
        report = evaluate_folder(Path(args.data), Path(args.model) if args.model else None,
                                 report_dir=Path(args.report_dir) if args.report_dir else None,
                                 speakers=args.speakers.split(",") if args.speakers else None)
    except CorpusError as err:
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


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "serve":
        from service.bench.serve import run_serve_bench

        report = run_serve_bench(Path(args.model) if args.model else None,
                                 requests=args.requests, floor=args.floor,
                                 repeats=args.repeats)
    if args.what == "abuse":
        from service.bench.abuse import run_abuse_bench

        report = run_abuse_bench(Path(args.model) if args.model else None,
                                 workers=args.workers, scale=args.scale)
    if args.what == "latency":
        from service.bench.latency import run_latency_bench

        report = run_latency_bench(Path(args.model) if args.model else None, runs=args.runs,
                                   cold_starts=args.cold_starts)
    if args.what == "personalization":
        from service.bench.personalization import run_personalization_bench

        report = run_personalization_bench(args.data or REPO_ROOT.parent / "shared" / "data",
                                           versions=args.versions)
    if args.what == "continual":
        from service.bench.continual import run_continual_bench

        report = run_continual_bench(
            args.data or REPO_ROOT.parent / "shared" / "data", rounds=args.rounds,
            strategies=args.strategies.split(",") if args.strategies else None,
            timing_corrections=args.timing_corrections, threads=args.threads)
    if args.json:
        print(json.dumps(report))
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


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import shutil
    import tempfile

    import uvicorn

    from service.bootstrap import BundledModelMissing, create_first_keys, register_bundled_model
    from service.connections import connection_cap, raise_open_file_limit
    from service.fair_accept import LOAD_FILE_ENV, create_load_file
    from storage.artifacts import ArtifactStore
    from storage.db import create_db_engine, make_session_factory
    from storage.migrate import current_revision, head_revision
    from storage.settings import get_settings

    settings = get_settings()
    url = settings.database.url
    current, head = current_revision(url), head_revision()
    if current != head:
        print(f"emoloop serve: the database {_safe_url(url)} is at revision {current or 'none'}, "
              f"not {head}: run `emoloop migrate` first", file=sys.stderr)
        return 2
    # First-run set-up happens here, once, before the workers start.
    engine = create_db_engine(url, busy_timeout_s=settings.database.busy_timeout_s)
    try:
        session_factory = make_session_factory(engine)
        register_bundled_model(session_factory, ArtifactStore(settings.storage.artifacts_dir))
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


def cmd_encoder(args: argparse.Namespace) -> int:
    from learner.speech_encoder.ct2_file import CT2FormatError
    from learner.speech_encoder.weights import EncoderFileError, import_encoder_file

    from learner.checkpoint import ENCODER_FILE

    if args.blocks < 1:
        print("emoloop encoder import: --blocks must be at least 1", file=sys.stderr)
        return 2
    out = args.out or ENCODER_FILE
    try:
        digest = import_encoder_file(args.path, out, args.blocks)
    except (EncoderFileError, CT2FormatError, OSError) as err:
        print(f"emoloop encoder import: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}  sha256 {digest}  {out.stat().st_size:,} bytes")
    return 0


def _session_factory():
    from storage.db import create_db_engine, make_session_factory
    from storage.settings import get_settings

    settings = get_settings()
    return make_session_factory(create_db_engine(
        settings.database.url, busy_timeout_s=settings.database.busy_timeout_s))


def _session():
    return _session_factory()()


def _artifacts():
    from storage.artifacts import ArtifactStore
    from storage.settings import get_settings

    return ArtifactStore(get_settings().storage.artifacts_dir)


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
    p.add_argument("--linear-probe", metavar="BLOCKS",
                   help="instead of training: the linear probe on the mean of these encoder "
                        "blocks (counted from 1, e.g. 2 or 1,2,3,4), C chosen on validation")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy, macro-F1 and per-class figures on a data folder")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--model", type=Path, help="a model file (default: the bundled model)")
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

    p = sub.add_parser("bench", help="benchmarks that print medians")
    p.add_argument("what", choices=["latency", "serve", "abuse", "personalization",
                                    "continual"])
    p.add_argument("--model", type=Path)
    p.add_argument("--runs", type=int, default=200, help="timed runs after warm-up")
    p.add_argument("--cold-starts", type=int, default=3, help="fresh interpreters timed")
    p.add_argument("--requests", type=int, default=400,
                   help="serve: timed predictions per server configuration")
    p.add_argument("--floor", action="store_true", help="serve: also time the inference floor "
                   "(the model work alone, behind a bare ASGI app) with the same clients")
    p.add_argument("--repeats", type=int, default=1, help="serve: run 1 and 2 workers this many "
                   "times in turn (medians, and each repeat's worker shares and 2/1 ratio)")
    p.add_argument("--workers", type=int, default=1, help="abuse: server worker processes")
    p.add_argument("--scale", type=float, default=1.0, help="abuse: share of the stalled "
                   "connections opened (1: 2,000, 2,000, 200 and 2,000)")
    p.add_argument("--data", type=Path, help="personalization, continual: the corpora (default "
                   "../shared/data)")
    p.add_argument("--versions", type=int, default=10_000,
                   help="personalization: personal versions stored for the cost figures")
    p.add_argument("--rounds", type=int, default=3, help="continual: learning rounds")
    p.add_argument("--strategies", help="continual: comma-separated (default: ewc+replay, "
                   "replay, naive, joint)")
    p.add_argument("--timing-corrections", type=int, default=500,
                   help="continual: corrections in the timed round (0: skip it)")
    p.add_argument("--threads", type=int, default=1,
                   help="continual: torch threads (1, as in a service worker)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="run the HTTP API (the database must be migrated)")
    p.add_argument("--host", help="default: the settings' api.host (127.0.0.1)")
    p.add_argument("--port", type=int, help="default: the settings' api.port (8000)")
    p.add_argument("--workers", type=int, help="worker processes (default: api.workers)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

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

    p = sub.add_parser("encoder", help="the frozen speech encoder's weights")
    encoder = p.add_subparsers(dest="action", required=True)
    e = encoder.add_parser("import", help="keep the first blocks of Whisper base's encoder from "
                           "its CTranslate2 model.bin (checked against the pinned sha256)")
    e.add_argument("path", type=Path, help="faster-whisper-base's model.bin")
    e.add_argument("--blocks", type=int, default=4, help="encoder blocks kept (default 4 of 6)")
    e.add_argument("--out", type=Path,
                   help="default: learner/default_model/whisper_base_encoder.safetensors")
    p.set_defaults(func=cmd_encoder)

    from service.learner_commands import add_parser as add_learner_parser

    add_learner_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
