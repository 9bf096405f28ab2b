"""/health, /ready after warm-up, /metrics, and the engine's swap rules."""
import threading

from fastapi.testclient import TestClient

from learner.inference import EmotionPredictor
from learner.labels import DEFAULT_LABELS
from storage.registry import ModelRegistry
from tests.service.conftest import bearer, predict, wait_ready


def test_ready_only_after_the_model_is_warm(app, keys, wav_clip, monkeypatch):
    release, warming = threading.Event(), threading.Event()
    real_warm_up = EmotionPredictor.warm_up

    def slow_warm_up(self):
        warming.set()
        assert release.wait(30)
        real_warm_up(self)

    monkeypatch.setattr(EmotionPredictor, "warm_up", slow_warm_up)
    with TestClient(app) as client:
        try:
            assert warming.wait(30)
            assert client.get("/health").json() == {"status": "ok"}
            not_ready = client.get("/ready")
            assert not_ready.status_code == 503 and not_ready.json()["error"] == "not_ready"
            early = client.post("/v1/predictions", headers=bearer(keys.app),
                                files={"file": ("a.wav", wav_clip, "audio/wav")})
            assert early.status_code == 503 and early.json()["error"] == "not_ready"
        finally:
            release.set()
        wait_ready(client)
        assert client.get("/ready").json() == {"status": "ready", "model_version": 1,
                                               "active_version": 1}


def test_metrics_expose_requests_predictions_feedback_and_version(client, keys, wav_clip):
    answer = predict(client, keys.app, wav_clip)
    client.post(f"/v1/predictions/{answer['prediction_id']}/feedback",
                json={"label": answer["emotion"]}, headers=bearer(keys.app))
    client.get("/v1/predictions/not-a-uuid", headers=bearer(keys.app))
    text = client.get("/metrics").text
    assert ('emoloop_http_requests_total{method="POST",route="/v1/predictions",status="201"}'
            in text)
    # Ids never become labels: the route template does.
    assert 'route="/v1/predictions/{prediction_id}",status="422"' in text
    assert "not-a-uuid" not in text
    assert 'emoloop_http_request_duration_seconds_bucket{le="0.025",method="POST",' in text
    assert f'emoloop_predictions_total{{emotion="{answer["emotion"]}",model_version="1"}}' in text
    assert f'emoloop_feedback_total{{confirmed="true",label="{answer["emotion"]}"}}' in text
    assert "emoloop_active_model_version 1.0" in text


def test_a_request_finishes_on_the_model_it_started_with(client, db, artifacts, random_model,
                                                         wav_clip):
    engine = client.app.state.engine
    with db() as session:
        ModelRegistry(session, artifacts).register(random_model, labels=list(DEFAULT_LABELS),
                                                   parent_version=1)
        session.commit()
    started, swapped = threading.Event(), threading.Event()
    real_logits = EmotionPredictor.logits
    results = {}

    def logits_slowly(self, features):
        started.set()
        assert swapped.wait(30)  # version 2 becomes active while this request runs
        return real_logits(self, features)

    def in_flight():
        results["inference"] = engine.predict(wav_clip)

    EmotionPredictor.logits = logits_slowly
    try:
        thread = threading.Thread(target=in_flight)
        thread.start()
        assert started.wait(30)
        EmotionPredictor.logits = real_logits
        engine.activate(2)
        swapped.set()
        thread.join(30)
    finally:
        EmotionPredictor.logits = real_logits
    assert results["inference"].model.version == 1
    assert engine.predict(wav_clip).model.version == 2
