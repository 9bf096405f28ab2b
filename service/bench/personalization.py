"""`emoloop bench personalization`: what a personal model gives its user, and what it costs.

Accuracy. Every speaker the default model never trained on (the validation and test speakers of
configs/base-training.yaml) plays a user. For k = 5, 10 and 20 corrections a class, each user
sends k of their clips a class through the real inference engine with their user id and corrects
every answer to the true label (the rows go in with the service's repositories); personal rounds
run (learner.personal.rounds: training, gate, registry); then every clip of theirs that was not
corrected is sent through the engine again, once as the user (their personal model if the gate
accepted one) and once without a user id (the global model). A speaker has only 8 or 9 clips a
class (RAVDESS neutral: 4), so corrections a class are capped to leave at least
`MIN_UNSEEN` clips a class unseen: k = 10 and 20 both give "all but two". The report says the
corrections each user really gave. Accuracy is the service's answer (argmax over every label).
The global model's test accuracy (test speakers, the model card's per-corpus protocol) is
measured before and after, with the active global version's number and sha256.

Cost. In a second temporary store, `versions` personal versions (one user each) are registered
and activated; then a fresh engine serves first requests of random users (each one loads that
user's head from disk on demand) and memory is read after far more users than the cache holds.
"""
import os
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from storage.settings import REPO_ROOT

KS = (5, 10, 20)
MIN_UNSEEN = 2
TARGETS = {"gain_points_at_k10": 15.0, "bytes_per_version": 1_000_000, "first_request_ms": 50.0}
BENCH_USER_SEED = 5


def run_personalization_bench(data_dir: Path, *, ks: tuple[int, ...] = KS, versions: int = 10_000,
                              probes: int = 200) -> dict:
    from learner.inference import limit_threads

    limit_threads(1)
    with tempfile.TemporaryDirectory(prefix="emoloop-bench-personal-") as tmp:
        accuracy = _accuracy_bench(Path(data_dir), Path(tmp) / "accuracy", ks)
    with tempfile.TemporaryDirectory(prefix="emoloop-bench-personal-") as tmp:
        cost = _cost_bench(Path(tmp) / "cost", versions, probes)
    report = {"accuracy": accuracy, "cost": cost, "targets": TARGETS}
    report["lines"] = _lines(report)
    return report


# ----------------------------------------------------------------------------------------------
# Accuracy

class _Store:
    """A fresh SQLite store and artifact folder with the bundled model active, one app key, and
    the real inference engine on it."""

    def __init__(self, root: Path, **personal):
        from service.bootstrap import register_bundled_model
        from service.engine import InferenceEngine
        from storage.api_keys import ApiKeyRepository
        from storage.artifacts import LocalArtifactStore
        from storage.db import create_db_engine, make_read_session_factory, make_session_factory
        from storage.migrate import upgrade_to_head
        from storage.settings import Settings

        # Its own SQLite file whatever the environment names: the bench never touches a real store.
        self.settings = Settings(storage={"data_dir": root}, personal=personal,
                                 database={"url": f"sqlite:///{root / 'emoloop.db'}"})
        upgrade_to_head(self.settings.database.url)
        self.db = create_db_engine(self.settings.database.url)
        self.sessions = make_session_factory(self.db)
        self.artifacts = LocalArtifactStore(self.settings.storage.artifacts_dir)
        register_bundled_model(self.sessions, self.artifacts)
        with self.sessions() as session:
            self.app_key = ApiKeyRepository(session).create("bench", "app")[0].id
            session.commit()
        self.engine = InferenceEngine(make_read_session_factory(self.db), self.artifacts,
                                      max_audio_seconds=60.0,
                                      personal_cache_size=self.settings.personal.cache_size,
                                      global_cache_size=self.settings.personal.global_cache_size,
                                      personal_ttl_s=3600.0)
        self.engine.refresh()

    def correct(self, user_id: str, clips: list, audio: dict) -> None:
        """Each clip through the engine as this user, then its true label as feedback."""
        from learner.audio import SAMPLE_RATE
        from storage.repositories import ClipRepository, FeedbackRepository, PredictionRepository

        with self.sessions() as session:
            for clip in clips:
                data = audio[clip.path]
                inference = self.engine.predict(data, user_id)
                sha256, path = self.artifacts.put_clip(data, ".flac")
                row = ClipRepository(session).get_or_create(
                    sha256=sha256, duration_s=len(inference.wave) / SAMPLE_RATE,
                    sample_rate=SAMPLE_RATE, artifact_path=path, size_bytes=len(data))
                prediction = PredictionRepository(session).create(
                    api_key_id=self.app_key, clip_id=row.id, model_version=inference.model.version,
                    label=inference.prediction.emotion, confidence=inference.prediction.confidence,
                    probabilities=inference.prediction.probabilities,
                    latency_ms=inference.latency_ms, user_id=user_id,
                    personal=inference.model.personal)
                FeedbackRepository(session).add(prediction, clip.emotion)
            session.commit()

    def active_global(self) -> tuple[int, str]:
        from storage.registry import ModelRegistry

        with self.sessions() as session:
            row = ModelRegistry(session, self.artifacts).active_global()
            return row.version, row.sha256

    def close(self) -> None:
        self.db.dispose()


def _accuracy_bench(data_dir: Path, root: Path, ks: tuple[int, ...]) -> dict:
    from learner.corpora import read_corpora
    from learner.personal.rounds import run_personal_rounds

    config = yaml.safe_load((REPO_ROOT / "configs" / "base-training.yaml").read_text())
    speakers = config["split"]["validation_speakers"] + config["split"]["test_speakers"]
    labels = set(config["labels"])
    clips = [c for c in read_corpora(data_dir) if c.speaker in speakers and c.emotion in labels]
    audio = {c.path: c.path.read_bytes() for c in clips}
    by_speaker = defaultdict(list)
    for clip in clips:
        by_speaker[clip.speaker].append(clip)

    store = _Store(root)
    try:
        started = time.perf_counter()
        global_answers = {c.path: store.engine.predict(audio[c.path]).prediction for c in clips}
        test = [c for c in clips if c.speaker in config["split"]["test_speakers"]]
        before = {"version_sha256": store.active_global(),
                  **_test_accuracy(test, global_answers)}
        plan = {}  # user id -> (speaker, k, corrected clips, unseen clips)
        for speaker in speakers:
            for k in ks:
                corrected, unseen = _choose(by_speaker[speaker], k, speaker)
                plan[f"{speaker}/k{k}"] = (speaker, k, corrected, unseen)
        for user_id, (_, _, corrected, _) in plan.items():
            store.correct(user_id, corrected, audio)
        mark = time.perf_counter()
        outcomes = run_personal_rounds(store.sessions, store.artifacts, store.settings.learner,
                                       store.settings.personal, trigger="bench",
                                       user_ids=list(plan),
                                       on_activated=store.engine.personal.forget)
        rounds_s = time.perf_counter() - mark
        by_user = {}
        for (user_id, (speaker, k, corrected, unseen)), outcome in zip(plan.items(), outcomes):
            answers = [store.engine.predict(audio[c.path], user_id) for c in unseen]
            by_user[user_id] = {
                "speaker": speaker, "k": k,
                "corrections_per_class": _per_class(corrected),
                "corrections": len(corrected), "unseen": len(unseen),
                "global_accuracy": _accuracy(unseen, [global_answers[c.path] for c in unseen]),
                "personal_accuracy": _accuracy(unseen, [a.prediction for a in answers]),
                "served_personal": all(a.model.personal for a in answers),
                "gate": outcome.status, "reason": (outcome.gate_report or {}).get(
                    "reason", outcome.error),
                "round_seconds": (outcome.counts.get("seconds") or {}).get("total_s"),
                "train_seconds": (outcome.counts.get("seconds") or {}).get("train_s"),
            }
        after_answers = {c.path: store.engine.predict(audio[c.path]).prediction for c in test}
        after = {"version_sha256": store.active_global(), **_test_accuracy(test, after_answers)}
        per_k = {}
        for k in ks:
            rows = [r for r in by_user.values() if r["k"] == k]
            g = statistics.mean(r["global_accuracy"] for r in rows)
            p = statistics.mean(r["personal_accuracy"] for r in rows)
            per_k[str(k)] = {
                "users": len(rows), "global_accuracy": g, "personal_accuracy": p,
                "gain_points": 100 * (p - g),
                "accepted": sum(r["gate"] == "accepted" for r in rows),
                "mean_corrections": statistics.mean(r["corrections"] for r in rows),
                "median_round_s": statistics.median(r["round_seconds"] or 0.0 for r in rows),
                "median_train_s": statistics.median(r["train_seconds"] or 0.0 for r in rows)}
        return {"users": by_user, "per_k": per_k, "global_test_before": before,
                "global_test_after": after, "rounds_seconds": rounds_s,
                "total_seconds": time.perf_counter() - started,
                "min_feedback": store.settings.personal.min_feedback,
                "folds": store.settings.personal.folds}
    finally:
        store.close()


def _choose(clips: list, k: int, speaker: str) -> tuple[list, list]:
    """k clips a class to correct (at most all but MIN_UNSEEN), the rest unseen. The same
    shuffle for every k, so a larger k adds corrections to a smaller one's."""
    rng = random.Random(f"{BENCH_USER_SEED}/{speaker}")
    corrected, unseen = [], []
    for label in sorted({c.emotion for c in clips}):
        group = sorted((c for c in clips if c.emotion == label), key=lambda c: str(c.path))
        rng.shuffle(group)
        n = max(0, min(k, len(group) - MIN_UNSEEN))
        corrected += group[:n]
        unseen += group[n:]
    return corrected, unseen


def _per_class(clips: list) -> dict[str, int]:
    counts = defaultdict(int)
    for clip in clips:
        counts[clip.emotion] += 1
    return dict(sorted(counts.items()))


def _accuracy(clips: list, predictions: list) -> float:
    return float(np.mean([p.emotion == c.emotion for c, p in zip(clips, predictions)]))


def _test_accuracy(test: list, answers: dict) -> dict:
    """The model card's protocol: per corpus, the answer restricted to that corpus's labels."""
    corpus_labels = defaultdict(set)
    for clip in test:
        corpus_labels[clip.corpus].add(clip.emotion)
    right = defaultdict(list)
    for clip in test:
        probabilities = answers[clip.path].probabilities
        allowed = {k: v for k, v in probabilities.items() if k in corpus_labels[clip.corpus]}
        right[clip.corpus].append(max(allowed, key=allowed.get) == clip.emotion)
    return {"accuracy": float(np.mean([r for rs in right.values() for r in rs])),
            "per_corpus": {corpus: float(np.mean(rs)) for corpus, rs in sorted(right.items())},
            "clips": len(test)}


# ----------------------------------------------------------------------------------------------
# Cost

def _cost_bench(root: Path, versions: int, probes: int) -> dict:
    import torch

    from learner.personal.model import CorrectionMemory, memory_width, personal_head_bytes
    from learner.speech_model import SpeechEmotionModel
    from service.bench.clips import to_wav, voiced_clip
    from storage.registry import ModelRegistry

    store = _Store(root)
    try:
        global_version, global_sha = store.active_global()
        base_net = store.engine.serving.predictor.model.net
        base_head = base_net.head
        labels = store.engine.serving.predictor.labels
        kind = store.engine.serving.predictor.model.kind
        personal = store.settings.personal
        generator = torch.Generator().manual_seed(0)

        def personal_file() -> bytes:
            """A head near the global one, input layers on a speech-encoder model, and a full
            memory (`personal.memory_size` corrections: the largest a version gets, so sizes and
            cache figures are bounds)."""
            head = torch.nn.Linear(base_head.in_features, base_head.out_features)
            with torch.no_grad():
                head.weight.copy_(base_head.weight + 0.05 * torch.randn(
                    head.weight.shape, generator=generator))
                head.bias.copy_(base_head.bias)
            n = personal.memory_size
            memory = CorrectionMemory.of(
                torch.randn(n, base_head.in_features, generator=generator),
                torch.randint(len(labels), (n,), generator=generator),
                weight=personal.memory_weight, threshold=personal.memory_threshold,
                neighbours=personal.memory_neighbours, size=n, width=memory_width(base_net))
            adapter = None
            if isinstance(base_net, SpeechEmotionModel):
                own = dict(base_net.downstream.named_parameters())
                adapter = {k: own[k].detach() + 0.01 * torch.randn(own[k].shape,
                                                                   generator=generator)
                           for k in base_net.downstream.adaptable}
            return personal_head_bytes(head, labels, parent_version=global_version,
                                       parent_sha256=global_sha, parent_kind=kind,
                                       memory=memory, adapter=adapter)

        # The first ones through the registry as a round registers them (file fsynced, row,
        # activation with its audit entry): that is the throughput figure. The rest in bulk,
        # the same files and rows, so the store holds `versions` of them in minutes, not hours.
        through_registry = min(versions, 300)
        mark = time.perf_counter()
        with store.sessions() as session:
            registry = ModelRegistry(session, store.artifacts)
            for i in range(through_registry):
                row = registry.register(personal_file(), labels=list(labels),
                                        parent_version=global_version, scope="user",
                                        user_id=f"user-{i:05d}")
                registry.activate(row.version, reason="bench")
            session.commit()
        register_ms = (time.perf_counter() - mark) * 1000 / through_registry
        _bulk_register(store, range(through_registry, versions), personal_file,
                       global_version, labels)
        sizes = [f.stat().st_size for f in (root / "artifacts" / "models").glob("*.safetensors")
                 if f.name != f"{global_version}.safetensors"]

        clip = to_wav(voiced_clip(3.0, 16_000), 16_000)
        engine = store.engine
        serving = engine.serving
        cache_size = engine.personal.heads.max_items
        order = random.Random(1).sample(range(versions), versions)
        # Memory: resolve users as the engine does for a request, first enough to fill the
        # cache, then twice as many more; what the cache holds must stop growing at its bound.
        filling, beyond = order[:cache_size], order[cache_size:3 * cache_size]
        rss = [_rss_bytes()]
        for users in (filling, beyond):
            for i in users:
                engine.personal.model_for(f"user-{i:05d}", serving.version, serving.predictor)
            rss.append(_rss_bytes())
        heads_cached, head_bytes = len(engine.personal.heads), engine.personal.cached_head_bytes()

        # Latency: first requests of users never asked for before (their head is on disk only).
        probe_users = order[3 * cache_size:3 * cache_size + probes] or order[:probes]
        for _ in range(10):
            engine.predict(clip)  # warm
        global_ms = [_timed(engine.predict, clip) for _ in range(probes)]
        first_ms, personal = [], []
        for i in probe_users:
            ms, inference = _timed_with(engine.predict, clip, f"user-{i:05d}")
            first_ms.append(ms)
            personal.append(inference.model.personal)
        again_ms = [_timed(engine.predict, clip, f"user-{i:05d}") for i in probe_users]
        files = sorted((root / "artifacts" / "models").glob("*.safetensors"))
        return {
            "versions": versions, "register_and_activate_ms_each": register_ms,
            "registered_through_registry": through_registry,
            "bytes_per_version_median": statistics.median(sizes),
            "bytes_per_version_max": max(sizes),
            "model_files": len(files), "model_files_bytes": sum(f.stat().st_size for f in files),
            "global_request_ms_median": statistics.median(global_ms),
            "first_request_ms_median": statistics.median(first_ms),
            "first_request_ms_p95": float(np.percentile(first_ms, 95)),
            "first_request_ms_max": max(first_ms),
            "cached_request_ms_median": statistics.median(again_ms),
            "first_requests_served_personal": all(personal), "probes": len(probe_users),
            "cache_size": cache_size, "users_resolved_for_memory": len(filling) + len(beyond),
            "heads_cached": heads_cached, "cached_head_bytes": head_bytes,
            "rss_growth_filling_bytes": rss[1] - rss[0],
            "rss_growth_beyond_bytes": rss[2] - rss[1],
        }
    finally:
        store.close()


def _bulk_register(store: "_Store", numbers: range, personal_file, global_version: int,
                   labels: tuple[str, ...]) -> None:
    """Active personal versions for users `numbers`: files in the artifact store, rows as the
    registry writes them, the version counter moved past them."""
    from sqlalchemy import insert, select, update

    from storage.files import sha256_bytes
    from storage.models import ModelVersion, ModelVersionCounter, utcnow

    with store.sessions() as session:
        last = session.scalar(select(ModelVersionCounter.last_version))
        rows = []
        for offset, i in enumerate(numbers, start=1):
            data = personal_file()
            path = f"models/{last + offset}.safetensors"
            store.artifacts.path(path).write_bytes(data)
            rows.append({"version": last + offset, "parent_version": global_version,
                         "scope": "user", "user_id": f"user-{i:05d}", "labels": list(labels),
                         "artifact_path": path, "sha256": sha256_bytes(data), "metrics": {},
                         "status": "active", "created_at": utcnow(), "activated_at": utcnow()})
        for start in range(0, len(rows), 1000):
            session.execute(insert(ModelVersion), rows[start:start + 1000])
        session.execute(update(ModelVersionCounter).values(last_version=last + len(rows)))
        session.commit()


def _timed(fn, *args) -> float:
    return _timed_with(fn, *args)[0]


def _timed_with(fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    return (time.perf_counter() - t0) * 1000, result


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------------------------

def _lines(report: dict) -> list[str]:
    acc, cost = report["accuracy"], report["cost"]
    lines = [("accuracy on each user's unseen clips: global model -> their personal model "
              "(the service's answer; a user whose round the gate rejected keeps the global one)")]
    ks = sorted(int(k) for k in acc["per_k"])
    lines.append(f"  {'user':<16}" + "".join(f"  k={k:<2} (given) global -> personal  "
                                             for k in ks))
    for speaker in sorted({u["speaker"] for u in acc["users"].values()}):
        row = f"  {speaker:<16}"
        for k in ks:
            u = acc["users"][f"{speaker}/k{k}"]
            mark = "" if u["gate"] == "accepted" else " (rejected)"
            row += (f"  ({u['corrections']:>2})   {u['global_accuracy']:.2f} -> "
                    f"{u['personal_accuracy']:.2f}{mark:<11}")
        lines.append(row)
    for k in ks:
        s = acc["per_k"][str(k)]
        lines.append(f"  average k={k}: {s['global_accuracy']:.3f} -> {s['personal_accuracy']:.3f} "
                     f"({s['gain_points']:+.1f} points; {s['accepted']}/{s['users']} personal "
                     f"models accepted; median round {s['median_round_s']:.2f} s, of which "
                     f"{s['median_train_s']:.2f} s training: once a fold, once on all)")
    gain10 = acc["per_k"].get("10", {}).get("gain_points")
    if gain10 is not None:
        goal = TARGETS["gain_points_at_k10"]
        lines.append(f"  target: >= +{goal:.0f} points at k=10: "
                     f"{'met' if gain10 >= goal else 'NOT met'} ({gain10:+.1f})")
    b, a = acc["global_test_before"], acc["global_test_after"]
    lines.append(f"global model on the test speakers (model card protocol): {b['accuracy']:.3f} "
                 f"before, {a['accuracy']:.3f} after; version/sha256 "
                 f"{'unchanged' if b['version_sha256'] == a['version_sha256'] else 'CHANGED'}")
    lines.append(f"cost: {cost['versions']} personal versions stored, {cost['model_files']} "
                 f"files; {cost['bytes_per_version_median']:.0f} bytes each on disk (max "
                 f"{cost['bytes_per_version_max']}, target <= 1 MB); registering and activating "
                 f"one takes {cost['register_and_activate_ms_each']:.1f} ms")
    lines.append(f"  first request of a random user (loads their version): median "
                 f"{cost['first_request_ms_median']:.1f} ms, p95 "
                 f"{cost['first_request_ms_p95']:.1f} "
                 f"ms, max {cost['first_request_ms_max']:.1f} ms (target <= 50 ms); the same user "
                 f"again {cost['cached_request_ms_median']:.1f} ms; global model "
                 f"{cost['global_request_ms_median']:.1f} ms (3 s clip, decode + features + model)")
    lines.append(f"  memory: after {cost['users_resolved_for_memory']} users, "
                 f"{cost['heads_cached']} personal versions cached (bound {cost['cache_size']}), "
                 f"{cost['cached_head_bytes'] / 1e6:.1f} MB of weights; process RSS grew "
                 f"{cost['rss_growth_filling_bytes'] / 1e6:.1f} MB while the cache filled and "
                 f"{cost['rss_growth_beyond_bytes'] / 1e6:.1f} MB over the "
                 f"{2 * cost['cache_size']} users after")
    return lines
