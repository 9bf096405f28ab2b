"""`emoloop learner ...`: run one round, run the scheduler in its own process, build base sets."""
import argparse
import json
import logging
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cmd_learner(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    return {"run-once": run_once, "serve": serve, "build-base-sets": build_base_sets,
            "personal": run_personal}[args.action](args)


def run_once(args: argparse.Namespace) -> int:
    """One round now (whatever learner.min_new_feedback says). Exit 0 when it ran (accepted,
    rejected or skipped), 1 when it failed, 3 when another round holds the lock."""
    from learner.continual.rounds import RoundRunning, run_round
    from service.bootstrap import register_bundled_model
    from storage.artifacts import open_artifact_store
    from storage.db import create_db_engine, make_session_factory
    from storage.settings import get_settings

    settings = get_settings()
    engine = create_db_engine(settings.database.url,
                              busy_timeout_s=settings.database.busy_timeout_s)
    artifacts = open_artifact_store(settings, engine)
    try:
        session_factory = make_session_factory(engine)
        # A fresh install learns from it; a new release's default joins an existing store when
        # a launching process (`emoloop serve`, `emoloop learner serve`) starts.
        register_bundled_model(session_factory, artifacts, beside_existing=False)
        outcome = run_round(session_factory, artifacts, settings.learner, trigger=args.trigger)
    except RoundRunning as err:
        print(f"emoloop learner run-once: {err}", file=sys.stderr)
        return 3
    finally:
        engine.dispose()
    print(json.dumps(asdict(outcome), indent=None if args.json else 2))
    return 1 if outcome.status == "failed" else 0


def serve(args: argparse.Namespace) -> int:
    """The scheduler in its own process, for deployments that keep training off the API
    workers (then set learner.enabled: false for them). Stops on SIGINT or SIGTERM."""
    from service.bootstrap import register_bundled_model
    from service.scheduler import LearnerService
    from storage.artifacts import open_artifact_store
    from storage.db import create_db_engine, make_session_factory
    from storage.settings import get_settings

    settings = get_settings()
    learner_settings = settings.learner.model_copy(update={"enabled": True})
    engine = create_db_engine(settings.database.url,
                              busy_timeout_s=settings.database.busy_timeout_s)
    artifacts = open_artifact_store(settings, engine)
    register_bundled_model(make_session_factory(engine), artifacts)  # as `emoloop serve` does
    service = LearnerService(make_session_factory(engine), artifacts, learner_settings,
                             personal=settings.personal,
                             sweep_after_s=settings.storage.sweep_after_s,
                             retention=settings.storage.retention)
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    service.start(first_check_in_s=0)
    logging.getLogger("emoloop.learner").info(
        "checking for new feedback every %.0f s (a round needs %d)", learner_settings.interval_s,
        learner_settings.min_new_feedback)
    done.wait()
    service.stop()
    engine.dispose()
    return 0


def run_personal(args: argparse.Namespace) -> int:
    """Personal rounds now: for the named users, or for every user who is due. Exit 0 when they
    ran, 1 when one failed, 3 when another round holds the lock."""
    from learner.personal.rounds import run_personal_rounds
    from learner.continual.rounds import RoundRunning
    from storage.artifacts import open_artifact_store
    from storage.db import create_db_engine, make_session_factory
    from storage.settings import get_settings

    settings = get_settings()
    engine = create_db_engine(settings.database.url,
                              busy_timeout_s=settings.database.busy_timeout_s)
    try:
        outcomes = run_personal_rounds(make_session_factory(engine),
                                       open_artifact_store(settings, engine),
                                       settings.learner, settings.personal, trigger="manual",
                                       user_ids=args.user or None)
    except RoundRunning as err:
        print(f"emoloop learner personal: {err}", file=sys.stderr)
        return 3
    finally:
        engine.dispose()
    for outcome in outcomes:
        print(json.dumps(asdict(outcome)))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def recipe_for_kind(kind: str) -> Path:
    """The training recipe of a model of `kind`: its speakers' split and its gate set's."""
    from learner.checkpoint import LOGMEL_KIND, WHISPER_KIND

    recipe_by_kind = {LOGMEL_KIND: "base-training.yaml", WHISPER_KIND: "speech-training.yaml"}
    return REPO_ROOT / "configs" / recipe_by_kind[kind]


def build_base_sets(args: argparse.Namespace) -> int:
    from learner.continual.base_sets import build_base_sets as build
    from learner.checkpoint import DEFAULT_MODEL_FILE, load_model
    from learner.training import load_training_config

    # The sets are the features of the model they ship beside; its kind also names their files,
    # so another kind's sets in the same folder stay (learner.continual.base_sets), and picks the
    # recipe whose training speakers they come from.
    kind = load_model(args.model or Path(args.out) / DEFAULT_MODEL_FILE.name).kind
    config_path = args.config or recipe_for_kind(kind)
    per_class = {key: value for key, value in (("replay_per_class", args.replay_per_class),
                                               ("gate_per_class", args.gate_per_class))
                 if value is not None}
    info = build(Path(args.data), load_training_config(config_path), **per_class, kind=kind,
                 max_frames=args.max_frames, out_dir=Path(args.out),
                 config_name=config_path.relative_to(REPO_ROOT).as_posix()
                 if config_path.is_relative_to(REPO_ROOT) else str(config_path))
    print(json.dumps(info, indent=2))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("learner", help="learning rounds: run one, run the scheduler, base sets")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("run-once", help="run one learning round now and print its outcome")
    a.add_argument("--trigger", default="manual", help="recorded on the run (default manual)")
    a.add_argument("--json", action="store_true", help="one line of JSON")
    actions.add_parser("serve", help="run the learner's scheduler in this process")
    a = actions.add_parser("personal", help="personal rounds now: the users due, or those named; "
                                            "one JSON line per round")
    a.add_argument("--user", action="append", help="this user (repeat for more), due or not")
    a = actions.add_parser("build-base-sets",
                           help="write the replay and gate feature sets beside the default model")
    a.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    a.add_argument("--config", type=Path,
                   help="the model's recipe: its labels, seed and speaker split (default: "
                        "configs/speech-training.yaml for a model on the speech encoder, "
                        "configs/base-training.yaml for a log-mel one)")
    a.add_argument("--out", type=Path, default=REPO_ROOT / "learner" / "default_model")
    a.add_argument("--model", type=Path,
                   help="the model the sets are for (default: OUT/model.safetensors); its kind "
                        "picks the features and the file names")
    # Defaults: learner.continual.base_sets.REPLAY_PER_CLASS and GATE_PER_CLASS (16 and 50).
    a.add_argument("--replay-per-class", type=int)
    a.add_argument("--gate-per-class", type=int)
    a.add_argument("--max-frames", type=int, default=300, help="crop to this many 10 ms frames")
    p.set_defaults(func=cmd_learner)
