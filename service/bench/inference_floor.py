"""The floor under `emoloop bench serve`: the service's own inference path, and nothing else.

`emoloop bench serve --floor` runs this app under uvicorn (uvloop, httptools, one worker, one
thread, as `emoloop serve` runs) beside the real server, with the same clips and clients. It is
InferenceEngine.predict (decoding and features in the CPU slots, the model in batches across
requests, the bundled model or --model in serving form) behind a bare ASGI callable: no web
framework, no key check, no database, no clip store. What it answers in is what the model work
alone costs on this machine, so the report can say how much of the real server's latency is
the model and how much is everything a prediction also has to do.

It reads only the bench's own requests (one multipart part, the clip) and is never served to
users.
"""
import json
import os
from pathlib import Path

import anyio

MODEL_ENV = "EMOLOOP_BENCH_FLOOR_MODEL"  # a model file; unset: the bundled default


def create_app():
    """The uvicorn factory: load and warm the model, then return the ASGI app."""
    from learner.checkpoint import load_default_model, load_model
    from learner.inference import EmotionPredictor, limit_threads
    from learner.serving_net import for_serving
    from service.engine import InferenceEngine, ServingModel

    limit_threads(1)
    model_path = os.environ.get(MODEL_ENV)
    loaded = load_model(Path(model_path)) if model_path else load_default_model()
    predictor = EmotionPredictor(for_serving(loaded))
    predictor.warm_up()
    # No registry and no store behind it: the model is handed in, and no user_id is passed,
    # so the engine never reaches for either.
    engine = InferenceEngine(None, None, max_audio_seconds=30.0)
    engine.serve(ServingModel(1, predictor))

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/ready":
            await _answer(send, 200, {"ready": True})
            return
        body = await _body(receive)
        # The bench's form has one part: its headers end at the first blank line, and the
        # closing boundary is the body's last line.
        clip = body[body.index(b"\r\n\r\n") + 4:body.rindex(b"\r\n--")]
        inference = await anyio.to_thread.run_sync(engine.predict, clip,
                                                   limiter=engine.request_slots)
        prediction = inference.prediction
        await _answer(send, 201, {"emotion": prediction.emotion,
                                  "confidence": prediction.confidence,
                                  "probabilities": prediction.probabilities,
                                  "latency_ms": inference.latency_ms})

    return app


async def _body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _answer(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
