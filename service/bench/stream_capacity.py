"""The capacity half of `emoloop bench stream`: concurrent real-time streams against
`emoloop serve` on loopback.

For each level N, N clients each get a ticket (POST /v1/streams) and stream 16 kHz PCM over
WebSocket /v1/stream in real time (0.25 s chunks, paced by the clock) for `seconds`; the audio
is a synthetic voice, so every window reaches the model. An answer's delay is the time from
sending the window's last sample to receiving its answer. A level holds when the p99 delay is
at most 500 ms and no stream was dropped (closed by the server, or an error); the capacity is
the largest level that holds. The clients run in this process, on the same two cores as the
server (one event loop; they only pace and send bytes).
"""
import asyncio
import http.client
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from service.bench.clips import voiced_clip
from service.bench.serve import bench_server

RATE = 16_000
CHUNK_S = 0.25
MAX_P99_MS = 500.0


def run_capacity(levels: list[int], *, seconds: float = 20.0, workers: int = 2) -> dict:
    results = {}
    with (tempfile.TemporaryDirectory(prefix="emoloop-bench-streams-") as tmp,
          bench_server(Path(tmp), workers) as (port, _, key, _)):
        for n in levels:
            results[n] = asyncio.run(_level(port, key, n, seconds))
            if not results[n]["holds"]:
                break  # more streams will not hold either
    held = [n for n, r in results.items() if r["holds"]]
    return {"workers": workers, "seconds_per_stream": seconds, "levels": results,
            "capacity": max(held) if held else 0, "max_p99_ms": MAX_P99_MS}


async def _level(port: int, key: str, n: int, seconds: float) -> dict:
    tickets = [_ticket(port, key) for _ in range(n)]
    wave = (np.clip(voiced_clip(seconds, RATE, seed=7), -1, 1) * 32767).astype("<i2").tobytes()
    outcomes = await asyncio.gather(*(_stream(port, t, wave, i * 1.0 / n)
                                      for i, t in enumerate(tickets)))
    delays = [d for o in outcomes for d in o["delays_ms"]]
    dropped = sum(o["dropped"] for o in outcomes)
    p99 = float(np.percentile(delays, 99)) if delays else float("inf")
    return {"streams": n, "answers": len(delays), "dropped": dropped,
            "load_average": round(os.getloadavg()[0], 1),  # the machine's, over the last minute
            "p50_ms": round(float(np.median(delays)), 1) if delays else None,
            "p99_ms": round(p99, 1), "holds": dropped == 0 and p99 <= MAX_P99_MS and
            len(delays) > 0}


def _ticket(port: int, key: str) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/v1/streams", json.dumps({"sample_rate": RATE}),
                       {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    if response.status != 201:
        raise RuntimeError(f"POST /v1/streams answered {response.status}: {body}")
    return body["token"]


async def _stream(port: int, token: str, pcm: bytes, offset_s: float) -> dict:
    """One client: real-time chunks out, answers in; the delay of each window's answer."""
    import websockets

    await asyncio.sleep(offset_s)  # streams start spread over a second, as people do
    chunk = int(CHUNK_S * RATE) * 2
    sent_at: dict[int, float] = {}  # sample count -> when the chunk ending there was sent
    delays, dropped = [], 0
    try:
        async with websockets.connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
            await ws.send(json.dumps({"token": token}))
            ready = json.loads(await ws.recv())
            window, hop = int(ready["window_s"] * RATE), int(ready["hop_s"] * RATE)

            async def receive() -> None:
                async for message in ws:
                    body = json.loads(message)
                    if body.get("type") == "window":
                        end = body["index"] * hop + window
                        delays.append(1000 * (time.monotonic() - sent_at[end]))

            receiver = asyncio.create_task(receive())
            start = time.monotonic()
            for i in range(0, len(pcm), chunk):
                await asyncio.sleep(max(0.0, start + i / 2 / RATE - time.monotonic()))
                await ws.send(pcm[i:i + chunk])
                sent_at[(i + len(pcm[i:i + chunk])) // 2] = time.monotonic()
            await asyncio.sleep(1.0)  # the last answers
            receiver.cancel()
    except Exception:  # closed by the server, or any failure: the stream was dropped
        dropped = 1
    return {"delays_ms": delays, "dropped": dropped}
