"""Prometheus metrics: requests and latency by route template, predictions by label, feedback
received, and the model version each worker serves.

With several worker processes (`emoloop serve --workers N`) each has its own counters; `serve`
then sets PROMETHEUS_MULTIPROC_DIR so that /metrics, whichever worker answers it, adds up all of
them (prometheus_client's multiprocess mode).
"""
import os
import time

from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest, multiprocess)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter("emoloop_http_requests_total", "HTTP requests answered",
                   ["method", "route", "status"])
REQUEST_SECONDS = Histogram(
    "emoloop_http_request_duration_seconds", "Time to answer a request", ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
PREDICTIONS = Counter("emoloop_predictions_total", "Predictions made, by predicted emotion",
                      ["emotion", "model_version"])
FEEDBACK = Counter("emoloop_feedback_total", "Feedback received, by label and whether it "
                   "confirmed the prediction", ["label", "confirmed"])
# Per worker process (a pid label with several workers): how the load spreads over them
# (`emoloop bench serve` reports each worker's share from these). Gauges, because in
# prometheus_client's multiprocess mode a counter is summed over the processes.
WORKER_REQUESTS = Gauge("emoloop_worker_requests",
                        "HTTP requests this worker process answered since it started",
                        multiprocess_mode="liveall")
WORKER_CONNECTIONS = Gauge("emoloop_worker_open_connections",
                           "HTTP connections this worker process holds open",
                           multiprocess_mode="liveall")
CONNECTIONS_CUT = Counter(
    "emoloop_connections_cut_total", "Connections the server ended on a client: request head "
    "or body too slow (408), head too large (431), over the connection cap (503)", ["reason"])
ACTIVE_MODEL_VERSION = Gauge("emoloop_active_model_version",
                             "The global model version this worker serves",
                             multiprocess_mode="liveall")

MODEL_LOAD_FAILURES = Counter("emoloop_model_load_failures_total",
                              "Tries to load the active model version that failed (file missing, "
                              "corrupt, or not a model)")
MODEL_FALLBACKS = Counter("emoloop_model_fallbacks_total",
                          "Times a worker started serving an earlier version because the active "
                          "one would not load")


def render_metrics() -> tuple[bytes, str]:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class RequestMetrics:
    """Counts and times every HTTP request under its route template (`/v1/predictions/{id}`),
    so the label set stays small whatever ids clients send. Paths no route matched share one
    label."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = None

        async def send_and_record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        except BaseException:
            status = status or 500  # what the server answers when the app raises first
            raise
        finally:
            if status is not None:  # None: the client went away before any answer
                _record(scope, status, time.perf_counter() - start)


def _record(scope: Scope, status: int, seconds: float) -> None:
    WORKER_REQUESTS.inc()
    # The router writes the matched route into the scope it was given, which is ours.
    route = getattr(scope.get("route"), "path", "unmatched")
    REQUESTS.labels(scope["method"], route, str(status)).inc()
    REQUEST_SECONDS.labels(scope["method"], route).observe(seconds)
