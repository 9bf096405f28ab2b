"""A corrupt or missing active model file, on SQLite and PostgreSQL: the engine keeps serving the
version it had (at start: the newest earlier version that loads), /ready says which version
serves and why, /metrics counts it, answers never fail, and a restored file is served again
without a restart. With no earlier version to fall back on (a store of an earlier release whose
only version reads an encoder that no longer ships), this release's bundled default serves."""
import threading
import time

from fastapi.testclient import TestClient

from learner.labels import DEFAULT_LABELS
from storage.registry import ModelRegistry
from tests.service.conftest import bearer, predict, wait_ready


def _add_version(db, artifacts, model: bytes, *, activate: bool) -> tuple[int, str]:
    with db() as session:
        registry = ModelRegistry(session, artifacts)
        row = registry.register(model, labels=list(DEFAULT_LABELS), parent_version=1)
        if activate:
            registry.activate(row.version, reason="test")
        session.commit()
        return row.version, row.artifact_path


def _metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_at_start_a_corrupt_active_version_falls_back_and_is_served_once_restored(
        settings, seeded, keys, db, artifacts, random_model, wav_clip):
    from service.app import create_app

    version, path = _add_version(db, artifacts, random_model, activate=True)
    artifacts.path(path).write_bytes(b"not a model")  # damaged on disk
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        ready = client.get("/ready").json()
        assert (ready["model_version"], ready["active_version"]) == (1, version)
        assert f"active version {version} cannot be loaded" in ready["detail"]
        assert "serving version 1" in ready["detail"]
        assert _metric(client, "emoloop_model_load_failures_total") >= 1
        assert predict(client, keys.app, wav_clip)["model_version"] == 1

        artifacts.path(path).write_bytes(random_model)  # the operator restores the file
        _wait_for(lambda: client.get("/ready").json()["model_version"] == version)
        assert "detail" not in client.get("/ready").json()
        assert predict(client, keys.app, wav_clip)["model_version"] == version


def test_a_fallback_is_counted_in_metrics(settings, seeded, keys, db, artifacts, random_model):
    from service.app import create_app
    from service.metrics import MODEL_FALLBACKS

    before = MODEL_FALLBACKS._value.get()
    _, path = _add_version(db, artifacts, random_model, activate=True)
    artifacts.path(path).unlink()  # missing
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        assert MODEL_FALLBACKS._value.get() == before + 1
        assert _metric(client, "emoloop_model_fallbacks_total") == before + 1


def test_a_corrupt_new_version_never_fails_an_answer(client, keys, db, artifacts, random_model,
                                                    wav_clip):
    """Predictions run on while another process activates a version whose file is corrupt:
    every one is answered, by the version serving before."""
    version, path = _add_version(db, artifacts, random_model, activate=False)
    artifacts.path(path).write_bytes(random_model[:-100] + b"\0" * 100)
    statuses, served, stop = [], set(), threading.Event()

    def keep_predicting():
        while not stop.is_set():
            response = client.post("/v1/predictions", headers=bearer(keys.app),
                                   files={"file": ("clip.wav", wav_clip, "audio/wav")})
            statuses.append(response.status_code)
            if response.status_code == 201:
                served.add(response.json()["model_version"])

    thread = threading.Thread(target=keep_predicting)
    thread.start()
    try:
        time.sleep(0.3)
        with db() as session:  # activated elsewhere (the CLI, another worker)
            ModelRegistry(session, artifacts).activate(version, reason="test")
            session.commit()
        _wait_for(lambda: client.get("/ready").json().get("active_version") == version)
        # Ten more answers (a few more polls): the engine must not keep trying the broken file.
        noticed = len(statuses)
        _wait_for(lambda: len(statuses) >= noticed + 10, timeout_s=60)
    finally:
        stop.set()
        thread.join(30)
    assert statuses and set(statuses) == {201}, statuses
    assert served == {1}
    print(f"\ncorrupt version {version} activated meanwhile: {len(statuses)} predictions, "
          f"{statuses.count(201)} answered by version 1, {len(statuses) - statuses.count(201)} "
          "failed")
    ready = client.get("/ready").json()
    assert ready["model_version"] == 1
    assert ready["detail"].startswith(f"the active version {version} cannot be loaded")
    assert "still serving version 1" in ready["detail"]


def test_with_no_earlier_version_the_bundled_default_registered_beside_it_serves(
        settings, seeded, keys, db, artifacts, wav_clip):
    from service.app import create_app
    from service.bootstrap import register_bundled_model

    with db() as session:
        path = ModelRegistry(session, artifacts).get(1).artifact_path
    artifacts.path(path).write_bytes(b"unloadable")  # as a version whose encoder is gone
    bundled = register_bundled_model(db, artifacts)  # what `emoloop serve` does at start
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        ready = client.get("/ready").json()
        assert (ready["model_version"], ready["active_version"]) == (bundled, 1)
        assert f"serving version {bundled}, this release's bundled default" in ready["detail"]
        assert predict(client, keys.app, wav_clip)["model_version"] == bundled
    with db() as session:  # served, not activated: the admin decides
        assert ModelRegistry(session, artifacts).active_global().version == 1


def test_without_any_loadable_version_ready_says_why(settings, seeded, keys, db, artifacts):
    from service.app import create_app

    with db() as session:
        path = ModelRegistry(session, artifacts).get(1).artifact_path
    artifacts.path(path).write_bytes(b"broken")
    with TestClient(create_app(settings)) as client:
        _wait_for(lambda: "cannot be loaded" in client.get("/ready").json()["detail"])
        response = client.get("/ready")
        assert response.status_code == 503 and response.json()["error"] == "not_ready"
        assert "no earlier version loads" in response.json()["detail"]
        assert response.headers["Retry-After"]
