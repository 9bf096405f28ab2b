"""One live stream on WebSocket /v1/stream, from its ticket to its close.

Protocol (JSON text messages, audio as binary):
1. client -> `{"token": "emst_..."}` (from POST /v1/streams), within the idle timeout;
   server -> `{"type": "ready", "sample_rate", "window_s", "hop_s", "model_version", ...}`.
2. client -> binary chunks of 16-bit little-endian mono PCM at the ticket's rate, at most
   `api.stream_max_chunk_bytes` each; server -> `{"type": "window", "index", "start", "end",
   "probabilities", "raw", "smoothed"}` for every window that completes (one per hop).
3. client -> `{"type": "correct", "index": k, "label": "sad"}`: stores window k's audio (while
   the last `api.stream_keep_seconds` are kept), its prediction and the feedback, then and only
   then; server -> `{"type": "corrected", "index", "prediction_id", "feedback_id"}`, or
   `{"type": "error", "error", "detail"}` when the window cannot be corrected (the stream goes on).

The server closes with a code and a reason on: a bad, expired or reused ticket (1008), a chunk
over the size limit (1009), bytes that are not 16-bit PCM or a message it does not understand
(1007 / 1003), audio sent faster than real time by more than `api.stream_max_ahead_s` (1008),
no message for `api.stream_idle_timeout_s` (1008). A stream holds its own bounded state only, so
closing one affects no other. The model work runs in a worker thread; while it does, the socket
is not read, so a client that sends too much waits on TCP (backpressure) or trips the rate check.
"""
import asyncio
import json
import logging
import time

import numpy as np
import soxr
from fastapi import WebSocket, WebSocketDisconnect
from starlette.concurrency import run_in_threadpool

from learner.audio import SAMPLE_RATE
from learner.labels import canonical_label, feedback_labels
from learner.timeline import LiveTimeline
from service.engine import ModelLoadError, ServingModel
from service.window_feedback import CorrectedPart, store_correction
from storage.stream_tokens import StreamTicket, StreamTokenRepository

log = logging.getLogger("emoloop.streams")

POLICY, UNSUPPORTED, INVALID, TOO_BIG, TRY_LATER = 1008, 1003, 1007, 1009, 1013


class StreamClosed(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


class LiveStream:
    def __init__(self, websocket: WebSocket):
        self.ws = websocket
        state = websocket.app.state
        self.settings = state.settings
        self.engine = state.engine
        self.artifacts = state.artifacts
        self.session_factory = state.session_factory
        self.ticket: StreamTicket | None = None
        self.model: ServingModel | None = None

    async def run(self) -> None:
        await self.ws.accept()
        try:
            self.ticket = await self._redeem(await self._receive())
            try:
                self.model = self.engine.model_for(
                    self.ticket.user_id if self.settings.personal.enabled else None)
            except ModelLoadError:
                raise StreamClosed(TRY_LATER, "the model is still loading; retry shortly") \
                    from None
            await self._stream()
        except StreamClosed as closed:
            await self.ws.close(closed.code, closed.reason[:120])  # reasons are short frames
        except WebSocketDisconnect:
            pass

    async def _stream(self) -> None:
        api, rate = self.settings.api, self.ticket.sample_rate
        live = LiveTimeline(self.model.predictor, self.settings.timeline, api.stream_keep_seconds)
        resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1) if rate != SAMPLE_RATE else None
        await self.ws.send_json({
            "type": "ready", "sample_rate": rate, "window_s": self.settings.timeline.window_s,
            "hop_s": self.settings.timeline.hop_s, "model_version": self.model.version,
            "max_chunk_bytes": api.stream_max_chunk_bytes})
        started, sent_s = time.monotonic(), 0.0
        while True:
            message = await self._receive()
            if message.get("bytes") is not None:
                chunk = message["bytes"]
                if len(chunk) > api.stream_max_chunk_bytes:
                    raise StreamClosed(TOO_BIG, f"a chunk is larger than "
                                                f"{api.stream_max_chunk_bytes} bytes")
                if len(chunk) % 2:
                    raise StreamClosed(INVALID, "audio must be 16-bit PCM: an even number of "
                                                "bytes")
                sent_s += len(chunk) / 2 / rate
                if sent_s > time.monotonic() - started + api.stream_max_ahead_s:
                    raise StreamClosed(POLICY, "audio is arriving faster than real time")
                samples = np.frombuffer(chunk, "<i2").astype(np.float32) / 32768
                if resampler is not None:
                    samples = resampler.resample_chunk(samples)
                for index, window in await run_in_threadpool(live.push, samples):
                    await self.ws.send_json({"type": "window", "index": index,
                                             "start": window.start, "end": window.end,
                                             "probabilities": window.probabilities,
                                             "raw": window.raw, "smoothed": window.smoothed})
            else:
                await self.ws.send_json(await self._correct(live, _json(message.get("text"))))

    async def _receive(self) -> dict:
        try:
            message = await asyncio.wait_for(self.ws.receive(),
                                             self.settings.api.stream_idle_timeout_s)
        except asyncio.TimeoutError:
            raise StreamClosed(POLICY, f"no message for "
                                       f"{self.settings.api.stream_idle_timeout_s:g} s") from None
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        return message

    async def _redeem(self, message: dict) -> StreamTicket:
        body = _json(message.get("text"))
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise StreamClosed(POLICY, 'the first message must be {"token": ...} from '
                                       'POST /v1/streams')

        def redeem() -> StreamTicket | None:
            with self.session_factory() as session:
                ticket = StreamTokenRepository(session).redeem(token)
                session.commit()
                return ticket
        ticket = await run_in_threadpool(redeem)
        if ticket is None:
            raise StreamClosed(POLICY, "the stream token is unknown, expired or used already")
        return ticket

    async def _correct(self, live: LiveTimeline, body: dict) -> dict:
        if body.get("type") != "correct" or not isinstance(body.get("index"), int):
            raise StreamClosed(UNSUPPORTED, 'text messages must be {"type": "correct", '
                                            '"index": N, "label": ...}')
        index = body["index"]
        try:
            label = canonical_label(str(body.get("label", "")))
        except ValueError as err:
            return _error(index, "unknown_label", str(err))
        allowed = feedback_labels(self.settings.learner.labels,
                                  self.settings.learner.allow_new_labels,
                                  self.model.predictor.labels)
        if label not in allowed:
            return _error(index, "unknown_label", f"feedback may not name {label!r} here")
        window, audio = live.windows.get(index), live.window_audio(index)
        if window is None or audio is None:
            return _error(index, "window_gone", f"window {index} is not in the last "
                                                f"{self.settings.api.stream_keep_seconds:g} s")
        if window.probabilities is None:
            return _error(index, "silence", f"window {index} has no speech to correct")
        part = CorrectedPart(self.ticket.api_key_id, self.ticket.user_id, self.model.version,
                             self.model.personal, window.probabilities)
        prediction_id, feedback_id = await run_in_threadpool(
            store_correction, self.session_factory, self.artifacts, part, audio, label)
        return {"type": "corrected", "index": index, "prediction_id": str(prediction_id),
                "feedback_id": feedback_id}


def _json(text: str | None) -> dict:
    try:
        body = json.loads(text or "")
    except ValueError:
        raise StreamClosed(UNSUPPORTED, "text messages must be JSON objects") from None
    if not isinstance(body, dict):
        raise StreamClosed(UNSUPPORTED, "text messages must be JSON objects")
    return body


def _error(index: int, error: str, detail: str) -> dict:
    return {"type": "error", "index": index, "error": error, "detail": detail}
