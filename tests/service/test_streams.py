"""Live streams: POST /v1/streams for a single-use token, then WebSocket /v1/stream with 16-bit
PCM; windows answered every hop, corrections stored then and only then, and every misuse closed
with a code and a reason. Real app, real model (random weights), SQLite and PostgreSQL."""
import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from service.bench.clips import voiced_clip
from tests.service.conftest import bearer, files_under, row_counts

RATE = 16_000


def pcm(wave: np.ndarray) -> bytes:
    return (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()


def ticket(client: TestClient, key: str, **body) -> dict:
    response = client.post("/v1/streams", json={"sample_rate": RATE, **body},
                           headers=bearer(key))
    assert response.status_code == 201, response.text
    return response.json()


def closed_with(ws) -> tuple[int, str]:
    with pytest.raises(WebSocketDisconnect) as closed:
        while True:
            ws.receive_text()
    return closed.value.code, closed.value.reason


def send_in_real_time(ws, wave: np.ndarray, chunk_s: float = 0.25) -> None:
    step = int(chunk_s * RATE)
    for i in range(0, len(wave), step):
        ws.send_bytes(pcm(wave[i:i + step]))
        time.sleep(chunk_s / 4)  # a little faster than real time: within the allowed lead


def test_a_stream_answers_every_hop_and_stores_only_a_corrected_window(make_client, keys, db,
                                                                        artifacts):
    client = make_client(stream_max_ahead_s=10.0)
    token = ticket(client, keys.app, user_id="dana")
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps({"token": token["token"]}))
        ready = ws.receive_json()
        assert ready["type"] == "ready" and ready["model_version"] == 1
        send_in_real_time(ws, voiced_clip(6.0, RATE))
        windows = [ws.receive_json() for _ in range(4)]  # windows ending at 3, 4, 5, 6 s
        assert [w["index"] for w in windows] == [0, 1, 2, 3]
        assert [(w["start"], w["end"]) for w in windows] == [(0, 3), (1, 4), (2, 5), (3, 6)]
        assert all(w["raw"] in w["probabilities"] and w["smoothed"] for w in windows)
        assert row_counts(db)["predictions"] == 0 and row_counts(db)["clips"] == 0
        ws.send_text(json.dumps({"type": "correct", "index": 2, "label": "sad"}))
        corrected = ws.receive_json()
        assert corrected["type"] == "corrected" and corrected["index"] == 2
        ws.send_text(json.dumps({"type": "correct", "index": 99, "label": "sad"}))
        assert ws.receive_json()["error"] == "window_gone"
        ws.send_text(json.dumps({"type": "correct", "index": 1, "label": "bored-ish"}))
        assert ws.receive_json()["error"] == "unknown_label"
    counts = row_counts(db)
    assert (counts["clips"], counts["predictions"], counts["feedback"]) == (1, 1, 1)
    stored = client.get(f"/v1/predictions/{corrected['prediction_id']}", headers=bearer(keys.app))
    assert stored.status_code == 200
    assert stored.json()["user_id"] == "dana" and stored.json()["emotion"] == windows[2]["raw"]
    assert len(files_under(artifacts.root / "clips")) == 1


def test_tokens_are_single_use_short_lived_and_needed(make_client, keys):
    client = make_client(stream_token_ttl_s=2.0)
    token = ticket(client, keys.app)["token"]
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps({"token": token}))
        assert ws.receive_json()["type"] == "ready"
    for first in ({"token": token}, {"token": "emst_made-up"}, {"key": keys.app}):
        with client.websocket_connect("/v1/stream") as ws:  # reused, unknown, no token
            ws.send_text(json.dumps(first))
            code, reason = closed_with(ws)
            assert code == 1008 and "token" in reason
    expired = ticket(client, keys.app)["token"]
    time.sleep(2.2)
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps({"token": expired}))
        assert closed_with(ws)[0] == 1008
    assert client.post("/v1/streams", json={"sample_rate": RATE}).status_code == 401
    assert client.post("/v1/streams", json={"sample_rate": 1000},
                       headers=bearer(keys.app)).status_code == 422


@pytest.mark.parametrize("send, code, words", [
    (lambda ws: ws.send_bytes(b"\x00" * 70_000), 1009, "larger"),
    (lambda ws: ws.send_bytes(b"\x00" * 301), 1007, "16-bit"),
    (lambda ws: ws.send_text("hello"), 1003, "JSON"),
    (lambda ws: [ws.send_bytes(pcm(np.zeros(RATE // 2, np.float32))) for _ in range(8)],
     1008, "faster than real time"),
], ids=["chunk-too-big", "odd-bytes", "not-json", "too-fast"])
def test_misbehaving_clients_are_closed_with_a_code_and_a_reason(make_client, keys, db, send,
                                                                 code, words):
    client = make_client(stream_max_ahead_s=1.0)
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps({"token": ticket(client, keys.app)["token"]}))
        assert ws.receive_json()["type"] == "ready"
        send(ws)
        got_code, reason = closed_with(ws)
        assert got_code == code and words in reason
    # Closing one stream affects no other, and stores nothing.
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps({"token": ticket(client, keys.app)["token"]}))
        assert ws.receive_json()["type"] == "ready"
    assert row_counts(db)["predictions"] == 0


def test_an_idle_stream_is_closed(make_client, keys):
    client = make_client(stream_idle_timeout_s=0.5)
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps({"token": ticket(client, keys.app)["token"]}))
        assert ws.receive_json()["type"] == "ready"
        code, reason = closed_with(ws)
        assert code == 1008 and "no message" in reason
