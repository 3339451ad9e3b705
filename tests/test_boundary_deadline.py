"""Item 2: every provider call has one overall deadline, whatever the server dribbles.

A real server on a loopback socket answers its headers at once, then one body byte every
50 ms: httpx's per-read timeouts never fire, so only the call deadline ends the call.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from datetime import datetime, timezone

import pytest

from txengine.drivers import PreviewRequest
from txengine.errors import OutcomeUnknown, ValidationError
from txengine.models import Basket, LineItem
from txengine.money import Money
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox

DEADLINE = 0.5
BODY_BYTES = 200  # 10 s of dribbling: far past the deadline


class DribblingServer:
    """Answers every connection with a valid header and a body sent one byte at a time."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.listener.settimeout(0.1)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._dribble, args=(connection,), daemon=True).start()

    def _dribble(self, connection: socket.socket) -> None:
        with connection:
            connection.recv(65536)
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {BODY_BYTES}\r\n\r\n")
            try:
                connection.sendall(head.encode())
                for _ in range(BODY_BYTES):
                    if self.stopped.wait(0.05):
                        return
                    connection.sendall(b" ")
            except OSError:
                return  # the client gave up: what we want

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.listener.close()


@pytest.fixture
def server():
    serving = DribblingServer()
    yield serving
    serving.close()


def _driver(server: DribblingServer, **options) -> ReferenceDriver:
    return ReferenceDriver(base_url=f"http://127.0.0.1:{server.port}", api_key=ReferenceSandbox.api_key,
                           timeout=2.0, **options)


def _preview(driver: ReferenceDriver):
    basket = Basket([LineItem(product_id="p1", name="Coffee", quantity=1, unit_price=Money(350, "EUR"),
                              vat_percent="19")])
    return driver.preview(PreviewRequest("tx_deadline", basket, None, "SPLIT_PAYMENT", "key-1",
                                         datetime(2026, 1, 1, tzinfo=timezone.utc)))


def test_a_dribbled_answer_ends_at_the_deadline_as_outcome_unknown(server):
    driver = _driver(server, deadline=DEADLINE)
    started = time.monotonic()
    with pytest.raises(OutcomeUnknown, match="call deadline"):
        driver.run(_preview(driver))
    elapsed = time.monotonic() - started
    driver.close()
    assert DEADLINE <= elapsed < DEADLINE + 0.5  # not the 10 s the body would take


def test_a_dribbled_answer_ends_at_the_deadline_in_the_async_engine_too(server):
    driver = _driver(server, deadline=DEADLINE)

    async def call() -> float:
        started = time.monotonic()
        with pytest.raises(OutcomeUnknown, match="call deadline"):
            await driver.arun(_preview(driver))
        await driver.aclose()
        return time.monotonic() - started

    elapsed = asyncio.run(call())
    assert DEADLINE <= elapsed < DEADLINE + 0.3


def test_the_deadline_is_a_provider_policy_the_pos_may_override(server):
    assert ReferenceDriver.call_deadline > 0
    assert _driver(server).call_deadline == ReferenceDriver.call_deadline
    assert _driver(server, deadline=2).call_deadline == 2.0
    for nonsense in (0, -1, "5", True, 10_000):
        with pytest.raises(ValidationError, match="deadline"):
            _driver(server, deadline=nonsense)
