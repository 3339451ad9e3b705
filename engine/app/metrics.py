"""``txengine worker --metrics-port``: the OpenTelemetry SDK with its Prometheus reader,
served on loopback with ``/metrics`` and ``/healthz``.

The library records through the OpenTelemetry API (``txengine.telemetry``); installing
the SDK's meter provider here is what turns those no-ops into series.  Needs the
``txengine[worker]`` extra."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import ValidationError


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True
    health: Callable[[], bool] = staticmethod(lambda: True)  # type: ignore[assignment]


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer

    def do_GET(self) -> None:  # noqa: N802 (the http.server protocol)
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._answer(200, generate_latest(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            healthy = self.server.health()
            self._answer(200 if healthy else 503, b"ok\n" if healthy else b"stopping\n", "text/plain")
        else:
            self._answer(404, b"not found: /metrics or /healthz\n", "text/plain")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # scrapes are not worth a log line
        pass


_installed = False


def install_sdk() -> None:
    """Route the library's OpenTelemetry API calls to a meter provider Prometheus reads."""
    global _installed
    if _installed:
        return
    try:
        from opentelemetry import metrics
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
    except ImportError:
        raise ValidationError("--metrics-port needs the worker extra: pip install 'txengine[worker]'") from None
    metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))
    _installed = True


def serve_metrics(port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``/metrics`` and ``/healthz`` on ``host:port`` from a daemon thread."""
    install_sdk()
    try:
        server = MetricsServer((host, port), _Handler)
    except OSError as taken:
        raise ValidationError(f"cannot serve metrics on {host}:{port}: {taken.strerror}") from None
    threading.Thread(target=server.serve_forever, name="txengine-metrics", daemon=True).start()
    return server
