"""A FastAPI POS backend running loyalty payments through txengine's ``AsyncEngine``.

Run it against the Cheers sandbox (``txengine sandbox serve cheers`` prints its URL and
API key)::

    TXENGINE_DB=sqlite:///pos.db CHEERS_URL=http://127.0.0.1:8001 CHEERS_API_KEY=... \\
        uvicorn examples.fastapi_pos:app

In production, construct the driver with ``environment="production"`` and the terminal's
API key instead of a URL.  ``tests/test_examples.py`` runs this module against a served
sandbox, and type-checks it with ``mypy --strict``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from txengine import AsyncEngine, Basket, LineItem, Money
from txengine.errors import EngineError
from txengine.providers.cheers import CheersDriver

from .pos_api import as_json, http_status


class Item(BaseModel):
    product_id: str | None = None
    name: str
    quantity: int = Field(gt=0)
    unit_price: Decimal  # "5.00": a decimal string, never a float
    vat_percent: Decimal = Decimal(0)

    def line(self, currency: str) -> LineItem:
        return LineItem(self.product_id, self.name, self.quantity,
                        Money.of(str(self.unit_price), currency), self.vat_percent)


class NewSale(BaseModel):
    customer_token: str
    currency: str
    items: list[Item]
    idempotency_key: str | None = None  # the till's retry key: send the same one again


class MoreItems(BaseModel):
    currency: str
    items: list[Item]
    idempotency_key: str | None = None


class Refund(BaseModel):
    comment: str | None = None
    idempotency_key: str | None = None


def create_app(db_url: str, driver: CheersDriver) -> FastAPI:
    """The POS API; ``db_url`` and ``driver`` come from the deployment's settings."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = AsyncEngine.open(db_url, providers={"cheers": driver})
        app.state.engine = engine
        try:
            yield
        finally:
            await engine.aclose()

    app = FastAPI(title="POS loyalty payments", lifespan=lifespan)

    def engine_of(request: Request) -> AsyncEngine:
        engine: AsyncEngine = request.app.state.engine
        return engine

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, error: EngineError) -> JSONResponse:
        # The message is safe to show: txengine never puts a secret in one.
        return JSONResponse({"error": type(error).__name__, "message": str(error)},
                            status_code=http_status(error))

    @app.post("/sales", status_code=201)
    async def preview(sale: NewSale, request: Request) -> dict[str, Any]:
        basket = Basket([item.line(sale.currency) for item in sale.items])
        tx = await engine_of(request).preview("cheers", basket, customer_token=sale.customer_token,
                                              idempotency_key=sale.idempotency_key)
        return as_json(tx)

    @app.get("/sales/{tx_id}")
    async def get(tx_id: str, request: Request) -> dict[str, Any]:
        engine = engine_of(request)
        return {**as_json(await engine.get(tx_id)), "allowed": await engine.allowed_events(tx_id)}

    @app.post("/sales/{tx_id}/items")
    async def update(tx_id: str, more: MoreItems, request: Request) -> dict[str, Any]:
        items = [item.line(more.currency) for item in more.items]
        return as_json(await engine_of(request).update(tx_id, items, idempotency_key=more.idempotency_key))

    @app.post("/sales/{tx_id}/payment")
    async def begin_payment(tx_id: str, request: Request) -> dict[str, Any]:
        return as_json(await engine_of(request).begin_payment(tx_id))

    @app.post("/sales/{tx_id}/finalize")
    async def finalize(tx_id: str, request: Request) -> dict[str, Any]:
        return as_json(await engine_of(request).finalize(tx_id))

    @app.post("/sales/{tx_id}/cancel")
    async def cancel(tx_id: str, request: Request) -> dict[str, Any]:
        return as_json(await engine_of(request).cancel(tx_id))

    @app.post("/sales/{tx_id}/refund")
    async def refund(tx_id: str, body: Refund, request: Request) -> dict[str, Any]:
        return as_json(await engine_of(request).refund(tx_id, comment=body.comment,
                                                      idempotency_key=body.idempotency_key))

    return app


def app_from_environment() -> FastAPI:
    """The deployment's wiring: everything from the environment, no default host."""
    driver = CheersDriver(api_key=os.environ["CHEERS_API_KEY"],
                          base_url=os.environ.get("CHEERS_URL"),
                          environment=os.environ.get("CHEERS_ENVIRONMENT"))
    return create_app(os.environ.get("TXENGINE_DB", "sqlite:///pos.db"), driver)


if os.environ.get("CHEERS_API_KEY"):
    app = app_from_environment()
