"""Prometheus metrics and the health check, on the gateway's HTTP server.

`/metrics` (Prometheus text format): devices by state, onboarding time (first register seen by
this configurator to configured), messages rejected by reason, store commit time, gateway
driver failures. `/healthz`: whether this configurator is primary and serving; 200 when it
is, 503 when not, so a configurator that stood down for a newer one (fenced), or lost its
broker, is not healthy even if the process runs and its last retained state said `online`.

The rejection reasons are free text naming the device and numbers; `reason_class` folds them
into a few stable label values so the series stay few.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from homenet.schemas.messages import Event

from ..bus import Committed, DeviceChanged, Notice
from ..lifecycle import State
from . import Extension

REASONS: tuple[tuple[str, str], ...] = (
    (r"signature|signed by|no enrolled key", "signature"),
    (r"replayed|out of order", "replay"),
    (r"over the \d+-byte limit", "too_large"),
    (r"^stale ", "stale"),
    (r"not JSON|not a JSON object|bad envelope|unknown kind|kind .* on a topic|bad .* body|bad status", "malformed"),
    (r"topic|not a safe topic level|sender .* published on|body names device", "wrong_topic"),
    (r"has not registered|sent no config|no config", "unknown_device"),
    (r"config published by|config version|retained config cleared", "config_tampered"),
)


def reason_class(reason: str) -> str:
    for pattern, label in REASONS:
        if re.search(pattern, reason):
            return label
    return "other"


class _DevicesByState:
    """Collected at scrape time from the committed devices."""

    def __init__(self, devices: Any) -> None:
        self._devices = devices

    def collect(self) -> Any:
        family = GaugeMetricFamily("homenet_devices", "Devices by configuration state", labels=["state"])
        counts = {s.value: 0 for s in State}
        for record in self._devices():
            counts[record.state.value] += 1
        for state, n in counts.items():
            family.add_metric([state], n)
        yield family


class Metrics(Extension):
    name = "metrics"

    def start(self) -> None:
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        self.registry = CollectorRegistry()
        self.registry.register(_DevicesByState(self.host.devices))
        self.onboarding = Histogram("homenet_onboarding_seconds", "First register seen to configured",
                                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300), registry=self.registry)
        self.rejected = Counter("homenet_messages_rejected", "Messages dropped, by reason", ["reason"],
                                registry=self.registry)
        self.commit = Histogram("homenet_store_commit_seconds", "Group commit of the configuration database",
                                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1), registry=self.registry)
        self.gateway_failures = Counter("homenet_gateway_failures", "Gateway driver operations that failed",
                                        ["driver"], registry=self.registry)
        self.serving = Gauge("homenet_configurator_serving", "1 while primary and connected", registry=self.registry)
        self.serving.set_function(lambda: 1.0 if self.host.health().serving else 0.0)
        self._registered: dict[str, float] = {}
        self._lock = threading.Lock()

        async def metrics(_request: Any) -> Response:
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        async def healthz(_request: Any) -> JSONResponse:
            h = self.host.health()
            return JSONResponse({"serving": h.serving, "primary": h.primary, "connected": h.connected,
                                 "configurator_id": h.configurator_id, "epoch": h.epoch},
                                status_code=200 if h.serving else 503)

        self.host.routes += [Route("/metrics", metrics), Route("/healthz", healthz)]
        self.host.bus.subscribe(self._on_notice)

    def stop(self) -> None:
        self.host.bus.unsubscribe(self._on_notice)

    def _on_notice(self, notice: Notice) -> None:
        if isinstance(notice, Committed):
            self.commit.observe(notice.seconds)
        elif isinstance(notice, DeviceChanged):
            self._onboarding(notice.record.device_id, notice.record.state)
        elif isinstance(notice, Event):
            if notice.event == "device.registered" and notice.device_id:
                with self._lock:
                    self._registered[notice.device_id] = time.monotonic()
            elif notice.event == "device.forgotten" and notice.device_id:
                with self._lock:
                    self._registered.pop(notice.device_id, None)
            elif notice.event == "message.rejected":
                self.rejected.labels(reason_class(notice.reason)).inc()
            elif notice.event == "gateway.failed":
                self.gateway_failures.labels(self.host.driver).inc()

    def _onboarding(self, device_id: str, state: State) -> None:
        if state != State.CONFIGURED:
            return
        with self._lock:
            since = self._registered.pop(device_id, None)
        if since is not None:
            self.onboarding.observe(time.monotonic() - since)
