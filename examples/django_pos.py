"""Django views running loyalty payments through txengine's sync ``Engine``.

Add to a Django project's settings::

    TXENGINE_DB = "sqlite:////var/lib/pos/txengine.db"     # or postgresql://...
    TXENGINE_CHEERS = {"api_key": env("CHEERS_API_KEY"), "environment": "production"}

and ``path("loyalty/", include("examples.django_pos"))`` in the URLconf.  One engine per
process, opened on first use: Django's workers are threads or processes, and the engine
is safe to share between threads.  ``tests/test_examples.py`` runs these views against a
served Cheers sandbox.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from txengine import Basket, Engine, LineItem, Money
from txengine.errors import EngineError
from txengine.providers.cheers import CheersDriver

from .pos_api import as_json, http_status

_engine: Engine | None = None
_opening = threading.Lock()


def engine() -> Engine:
    global _engine
    with _opening:
        if _engine is None:
            driver = CheersDriver(**settings.TXENGINE_CHEERS)
            _engine = Engine.open(settings.TXENGINE_DB, providers={"cheers": driver})
        return _engine


def close_engine() -> None:
    global _engine
    with _opening:
        if _engine is not None:
            _engine.close()
            _engine = None


View = Callable[..., JsonResponse]


def answers_engine_errors(view: View) -> View:
    """An EngineError becomes a JSON answer with its HTTP status (README, "Errors")."""
    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
        try:
            return view(request, *args, **kwargs)
        except EngineError as error:
            return JsonResponse({"error": type(error).__name__, "message": str(error)},
                                status=http_status(error))
    return wrapper


def _body(request: HttpRequest) -> dict[str, Any]:
    body = json.loads(request.body or b"{}")
    return body if isinstance(body, dict) else {}


def _lines(body: dict[str, Any]) -> list[LineItem]:
    currency = body["currency"]
    return [LineItem(item.get("product_id"), item["name"], item["quantity"],
                     Money.of(item["unit_price"], currency), item.get("vat_percent", 0))
            for item in body["items"]]


@csrf_exempt
@require_POST
@answers_engine_errors
def sales(request: HttpRequest) -> JsonResponse:
    body = _body(request)
    tx = engine().preview("cheers", Basket(_lines(body)), customer_token=body["customer_token"],
                          idempotency_key=body.get("idempotency_key"))
    return JsonResponse(as_json(tx), status=201)


@require_GET
@answers_engine_errors
def sale(request: HttpRequest, tx_id: str) -> JsonResponse:
    return JsonResponse({**as_json(engine().get(tx_id)), "allowed": engine().allowed_events(tx_id)})


@csrf_exempt
@require_POST
@answers_engine_errors
def command(request: HttpRequest, tx_id: str, name: str) -> JsonResponse:
    body, pos = _body(request), engine()
    key = body.get("idempotency_key")
    if name == "items":
        tx = pos.update(tx_id, _lines(body), idempotency_key=key)
    elif name == "payment":
        tx = pos.begin_payment(tx_id, idempotency_key=key)
    elif name == "finalize":
        tx = pos.finalize(tx_id, idempotency_key=key)
    elif name == "cancel":
        tx = pos.cancel(tx_id, idempotency_key=key)
    elif name == "refund":
        tx = pos.refund(tx_id, comment=body.get("comment"), idempotency_key=key)
    else:
        return JsonResponse({"error": "NotFound", "message": f"no command {name!r}"}, status=404)
    return JsonResponse(as_json(tx))


urlpatterns = [
    path("sales", sales),
    path("sales/<str:tx_id>", sale),
    path("sales/<str:tx_id>/<str:name>", command),
]
