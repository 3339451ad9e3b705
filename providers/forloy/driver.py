"""Forloy: staff-login loyalty cards (punch, cashback, discount) for the till.

How the lifecycle maps onto Forloy
==================================

Forloy has no preview, no reservation and no void: a purchase is *recorded* against a
customer's card, once, and that is all.  So:

=============  ===================================================================
preview        ``POST /cards/lookup`` (read-only) + local pricing: a discount card's
               rate is applied to the basket; punch and cashback cards grant no
               discount and no credits, so the whole basket is outstanding.
update         local: the engine adds the lines unpriced (fees, tips).
begin_payment  local.
finalize       ``POST /transactions/record`` with the engine's idempotency key
               (default), or, with ``offline=True``, committed locally and recorded
               later by ``deliver()`` through ``POST /transactions/sync`` batches of up
               to 100 (store-and-forward, the guaranteed delivery ``"record"``).
cancel         local: nothing exists on Forloy's side before the record.
expire         local, for the same reason.
refund         unsupported: Forloy documents no void or refund endpoint.
=============  ===================================================================

What gets recorded: ``purchase_amount`` is the gross of the lines priced at preview.
Lines the engine added later by ``update`` (fees, tips) carry no loyalty and are left
out, so a discount card's server-side discount equals the one quoted at the till.

Discount pricing at preview (local, exact): Forloy computes
``discount_amount = purchase_amount x discount_rate`` on the whole purchase and rounds
it to the currency's minor unit (``ASSUMED_ROUNDING``).  The driver does the same for
the total, then allocates it over the lines by the largest-remainder method: each line
gets the floor of its exact share, and the remaining minor units go to the lines with
the largest fractional parts (earliest line first on ties).  Line discounts therefore
sum to exactly the total Forloy will compute, and every line keeps
``gross == discount + credits + outstanding`` with ``credits == 0``.

Authentication: staff accounts, no API keys.  The driver logs in lazily on the first
call, refreshes the access token ``REFRESH_MARGIN`` before it expires (by its own
clock), falls back to a fresh login when a refresh is refused, and when Forloy still
answers 401 ``TOKEN_EXPIRED`` (or ``UNAUTHORIZED``, e.g. tokens revoked) it
re-authenticates once and re-sends the same request: safe, because a rejected request
committed nothing and a record carries its idempotency key.  For the same reason a
request that is safe to repeat (login, lookup, a record or a sync batch with their
keys) is re-sent ``SAFE_RETRIES`` times after a transport failure before the outcome is
declared unknown; a refresh (its token rotates) and a reward claim (no key) never are.
Email, password and tokens are ``Secret`` values; the customer's QR payload (the card's
secret key) is sent to ``/cards/lookup`` and, because the offline-sync guide requires
it per record, in ``/transactions/sync`` records.  The driver holds it in memory from
the scan until finalize queues the record; the queued record carries it as a
``Secret``, which the engine seals (AES-256-GCM, see ``txengine.secret.Sealer``) in the
outbox and deletes once the record is delivered, so a restart between the sale and its
sync (or between a sync whose answer was lost and its re-send) does not lose it.  It
never reaches the store in plain text, nor a log.  A record queued without it (the
process restarted between the scan and finalize) is refused locally as
``QR_CODE_UNAVAILABLE``, before anything is sent.  Online, finalize identifies the card
by ``card_instance_id``.

Money travels in decimal major units (``"purchase_amount": 24.50``) without a currency
field.  The driver is configured for one currency (``currency=``, default EUR) and
refuses baskets in any other with ``ValidationError`` before any call.  Bodies are
encoded by ``dumps`` (Decimals written as JSON numbers, floats refused) and answers
parsed by ``loads`` (JSON numbers become Decimals): no amount ever passes through a
float.

Fidelity note
=============

Relied on, as the public integration guide states it:

- base ``https://api.forloy.com/api/v1``; ``POST /auth/login {email, password}`` returns
  ``access_token`` (``expires_in`` 3600), ``refresh_token``; ``GET /auth/me``;
- ``POST /cards/lookup`` with ``qr_code_data`` or ``barcode_value`` is read-only and
  returns ``card_instance_id, card_type, card_title, merchant_name, customer_name,
  status, balance`` (seed 002); a punch balance holds ``current_punches,
  punch_requirement, pending_rewards, lifetime_punches``.  The rewards guide
  (staging-api.forloy.com/en/guide/rewards) shows the same answer flat, the balance
  fields beside ``card_name`` and ``status``, and names the cashback fields
  ``cashback_balance, cashback_rate, current_tier_name`` (``CASHBACK_BALANCE_FIELD``,
  ``TIER_FIELD``): the driver reads either shape (``balance`` when present);
- ``POST /transactions/record`` with ``qr_code_data`` or ``card_instance_id``,
  ``location_id, staff_user_id, purchase_amount`` (required), ``punch_count`` (default
  1), ``transaction_notes, idempotency_key, pos_reference_id, pos_terminal_id,
  client_timestamp``; the punch, cashback and discount answers and the ``reward``
  object exactly as documented; a repeated ``idempotency_key`` returns the original
  result with ``"idempotent": true``;
- punch cooldown of one minute per card: HTTP 429 ``COOLDOWN_ACTIVE``;
- ``POST /transactions/sync`` takes 1 to 100 records, each with ``qr_code_data``
  (required, the offline-sync guide at staging-api.forloy.com/en/guide/offline-sync);
  QR payloads look like ``forloy_enr_abc123def456`` (the QR guide) or base64 (the
  record example in seed 002): ``QR_PAYLOAD`` accepts both; ``POST /rewards/claim`` claims
  the oldest pending reward; ``GET /transactions/history`` pages with ``page,
  page_size`` (default 20) and filters ``transaction_type, from_date, to_date``;
- envelope ``{success, data, meta{request_id, timestamp}}`` and ``{success: false,
  error{code, message}}``; codes ``UNAUTHORIZED`` (401), ``TOKEN_EXPIRED`` (401),
  ``CARD_NOT_FOUND``, ``COOLDOWN_ACTIVE`` (429).

Environments: only "production" (``DEFAULT_BASE_URL``, seed 002).  The guides are
served from staging-api.forloy.com, but no page says that host serves the API: no
"sandbox" environment until one does.

Still open (not yet checked against the guides): the login answer's ``user`` object
(the driver reads only the tokens), cashback redemption as a checkout step (the
rewards guide has a "Cashback Redemption" section; not modelled: cashback cards grant
no credits here), and whether an inactive card answers ``CARD_NOT_FOUND``
(``ASSUMED_CARD_INACTIVE`` below).

ASSUMED (no public source; each is the one constant named, and tests use it):

- ``ASSUMED_REFRESH_PATH``: the refresh call, ``POST /auth/refresh {refresh_token}``,
  answering like login; ``ASSUMED_REFRESH_TOKEN_TTL`` its lifetime, and the sandbox
  rotates refresh tokens (a used one is dead).
- ``ASSUMED_CARD_NOT_FOUND_STATUS``: the HTTP status of ``CARD_NOT_FOUND`` (404).
- ``ASSUMED_VALIDATION_ERROR``/``ASSUMED_VALIDATION_STATUS``: malformed requests.
- ``ASSUMED_CARD_INACTIVE``/``ASSUMED_CARD_INACTIVE_STATUS``: recording on a card whose
  ``status`` is not ``active``; the driver refuses such a card at preview with it.
- ``ASSUMED_RETRY_AFTER_FIELD`` and the ``Retry-After`` header: how a cooldown says how
  long to wait (seconds); the driver reads the field first, then the header.
- ``ASSUMED_CURRENCY``: the default currency of the merchant's amounts.
- ``ASSUMED_ROUNDING``: how Forloy rounds discounts and cashback (half up, minor unit).
- the discount card's lookup fields: ``discount_rate`` and ``current_tier_name`` as on a
  cashback card (the rewards guide shows the punch and cashback lookups only).
- ``ASSUMED_SYNC_RECORDS_FIELD``/``ASSUMED_SYNC_RESULTS_FIELD``: the sync shapes,
  ``{"transactions": [record, ...]}`` answered by ``{"results": [{"idempotency_key",
  "success", "data" | "error"}], "synced_count", "failed_count"}``; each synced record
  needs an ``idempotency_key`` and its ``client_timestamp`` is when the purchase
  happened (the cooldown is judged on it).
- ``ASSUMED_NO_PENDING_REWARDS``: claiming with nothing to claim; the claim body is
  ``{card_instance_id, location_id, staff_user_id}``.
- ``ASSUMED_HISTORY_MAX_PAGE_SIZE``: the largest ``page_size`` accepted.
- Errors are never replayed by idempotency (only created transactions are), so a
  record refused by the cooldown can be re-sent with the same key later.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal, localcontext
from typing import Any

import attrs
import httpx

from txengine.answers import Answer
from txengine.clock import UTC, Clock, SystemClock
from txengine.drivers import Capabilities, Delivery, Exchange, HttpDriver, PreviewRequest
from txengine.errors import OutcomeUnknown, ProviderRejected, ValidationError
from txengine.machine import TimerPolicy
from txengine.models import LineItem, Outcome, PricedLine, Quote, ReceiptLine, Transaction
from txengine.money import Money, currency_exponent
from txengine.secret import Secret

# --- documented facts ---------------------------------------------------------------------

DEFAULT_BASE_URL = "https://api.forloy.com/api/v1"
API_PREFIX = "/api/v1"
ACCESS_TOKEN_TTL = timedelta(seconds=3600)  # login's documented ``expires_in``
PUNCH_COOLDOWN = timedelta(minutes=1)
SYNC_BATCH_LIMIT = 100
HISTORY_DEFAULT_PAGE_SIZE = 20
CARD_TYPES = ("punch", "cashback", "discount")
UNAUTHORIZED = "UNAUTHORIZED"
TOKEN_EXPIRED = "TOKEN_EXPIRED"
CARD_NOT_FOUND = "CARD_NOT_FOUND"
COOLDOWN_ACTIVE = "COOLDOWN_ACTIVE"
COOLDOWN_STATUS = 429
UNAUTHORIZED_STATUS = 401

# --- assumptions (see the fidelity note) ----------------------------------------------------

ASSUMED_REFRESH_PATH = "/auth/refresh"
ASSUMED_REFRESH_TOKEN_TTL = timedelta(days=30)
ASSUMED_CARD_NOT_FOUND_STATUS = 404
ASSUMED_VALIDATION_ERROR = "VALIDATION_ERROR"
ASSUMED_VALIDATION_STATUS = 400
ASSUMED_CARD_INACTIVE = "CARD_INACTIVE"
ASSUMED_CARD_INACTIVE_STATUS = 422
ASSUMED_RETRY_AFTER_FIELD = "retry_after"
ASSUMED_CURRENCY = "EUR"
ASSUMED_ROUNDING = ROUND_HALF_UP
#: the rewards guide (staging-api.forloy.com/en/guide/rewards): a cashback lookup shows
#: ``cashback_balance, cashback_rate, current_tier_name``
CASHBACK_BALANCE_FIELD = "cashback_balance"
TIER_FIELD = "current_tier_name"
ASSUMED_SYNC_RECORDS_FIELD = "transactions"
ASSUMED_SYNC_RESULTS_FIELD = "results"
ASSUMED_NO_PENDING_REWARDS = "NO_PENDING_REWARDS"
ASSUMED_NO_PENDING_REWARDS_STATUS = 422
ASSUMED_HISTORY_MAX_PAGE_SIZE = 100

# --- our policies (choices, not facts about Forloy) -------------------------------------------

#: refresh this long before the access token's expiry, so a call never races it
REFRESH_MARGIN = timedelta(seconds=60)
#: a request that is safe to repeat (login, lookup, record with its key) is re-sent
#: this many times after a transport failure before the outcome is declared unknown
SAFE_RETRIES = 1
#: one purchase, one punch (the documented default of ``punch_count``)
PUNCHES_PER_PURCHASE = 1
#: Forloy holds nothing while the till collects payment: the preview's lifetime and
#: the refund window are local policy (refunds are unsupported anyway)
TIMERS = TimerPolicy(
    preview_ttl=timedelta(minutes=10),
    update_extension=timedelta(minutes=10),
    refund_window=timedelta(hours=24),
)
PAYMENT_TYPES = frozenset({"SPLIT_PAYMENT", "EXTERNAL_PAYMENT"})
RECORD_DELIVERY = "record"
MAX_CUSTOMER_TOKEN_LENGTH = 4096
#: a QR payload: base64 (the record example) or ``forloy_enr_abc123def456`` (the QR guide)
QR_PAYLOAD = re.compile(r"[A-Za-z0-9_+/=.:-]+")
#: our code for an offline record whose QR payload this process no longer holds
QR_UNAVAILABLE = "QR_CODE_UNAVAILABLE"
#: the sync record's QR field, in a queued record's payload a ``Secret`` (sealed at rest)
QR_FIELD = "qr_code_data"

ONLINE_CAPABILITIES = Capabilities(
    remote={"preview", "finalize"},
    local={"begin_payment", "update", "cancel"},
    timers=TIMERS,
    payment_types=PAYMENT_TYPES,
)
OFFLINE_CAPABILITIES = Capabilities(
    remote={"preview"},
    local={"begin_payment", "update", "cancel", "finalize"},
    deferred={"finalize": (RECORD_DELIVERY,)},
    timers=TIMERS,
    payment_types=PAYMENT_TYPES,
    delivery_batch=SYNC_BATCH_LIMIT,
)

_CASHIER_MESSAGES = {
    UNAUTHORIZED: "Forloy refused the staff account: check the configured email, password and access",
    TOKEN_EXPIRED: "Forloy refused the session token even after logging in again",
    CARD_NOT_FOUND: "Forloy does not know this card: scan it again or ask for another one",
    COOLDOWN_ACTIVE: "this card was punched less than a minute ago: wait, then try again",
    ASSUMED_CARD_INACTIVE: "this Forloy card is not active",
    ASSUMED_NO_PENDING_REWARDS: "this card has no reward to claim",
}


# --- the wire: JSON with exact decimals ---------------------------------------------------------


def dumps(value: Any) -> bytes:
    """JSON with ``Decimal`` written as a number, exactly; floats are refused."""
    return _encode(value).encode()


def _encode(value: Any) -> str:
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("only finite amounts go on the wire")
        return format(value, "f")
    if isinstance(value, float):
        raise TypeError("floats never go on the wire: use Decimal")
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{json.dumps(str(k))}:{_encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_encode(item) for item in value) + "]"
    return json.dumps(value)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(data: bytes | str) -> Any:
    """JSON whose numbers with a fraction become ``Decimal`` (never float)."""
    return json.loads(data, parse_float=Decimal, parse_constant=_no_constants)


def wire_timestamp(when: datetime) -> str:
    """ISO 8601 UTC with milliseconds, as Forloy writes it: 2026-01-15T10:30:00.000Z."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


# --- pricing ----------------------------------------------------------------------------------


def discount_lines(items: Sequence[LineItem], rate: Decimal) -> list[PricedLine]:
    """Apply ``rate`` to the basket as Forloy does to the purchase, split over the lines.

    The total is ``round(gross x rate)`` to the minor unit (``ASSUMED_ROUNDING``); the
    lines share it by largest remainder, so their discounts sum to it exactly.
    """
    if not Decimal(0) <= rate <= Decimal(1):
        raise ValueError(f"a discount rate is between 0 and 1, got {rate}")
    currency = items[0].currency
    with localcontext() as exact:
        exact.prec = 60  # wide enough that no product of an amount and a rate rounds
        shares = [Decimal(item.gross.amount_minor) * rate for item in items]
        total = sum(shares, Decimal(0)).quantize(Decimal(1), rounding=ASSUMED_ROUNDING)
        floors = [share.to_integral_value(rounding=ROUND_FLOOR) for share in shares]
        leftover = int(total - sum(floors, Decimal(0)))
        by_remainder = sorted(range(len(items)), key=lambda i: (-(shares[i] - floors[i]), i))
        discounts = [int(floor) for floor in floors]
        for index in by_remainder[:leftover]:
            discounts[index] += 1
    zero = Money.zero(currency)
    return [
        PricedLine(
            item,
            discount=Money(discount, currency),
            credits=zero,
            outstanding=item.gross - Money(discount, currency),
        )
        for item, discount in zip(items, discounts)
    ]


#: the card fields of a lookup answer; in the rewards guide's flat shape the rest is balance
_CARD_FIELDS = frozenset({"card_instance_id", "card_type", "card_title", "card_name", "merchant_name",
                          "customer_name", "status"})


def _flat_balance(card: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in card.items() if name not in _CARD_FIELDS}


def _percent(rate: Decimal) -> str:
    value = rate * 100
    return f"{int(value)}%" if value == value.to_integral_value() else f"{value.normalize():f}%"


def _json_safe(value: Any) -> Any:
    """Balances and rewards as the snapshot may store them: decimals become strings."""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


# --- the session -------------------------------------------------------------------------------


@attrs.frozen(repr=False)
class _Session:
    access_token: Secret
    refresh_token: Secret
    expires_at: datetime

    def needs_refresh(self, now: datetime) -> bool:
        return now >= self.expires_at - REFRESH_MARGIN

    def __repr__(self) -> str:
        return f"_Session(expires_at={self.expires_at.isoformat()})"


@attrs.frozen
class HistoryPage:
    """One page of ``GET /transactions/history`` (amounts are Decimals, major units)."""

    transactions: tuple[Mapping[str, Any], ...] = attrs.field(converter=tuple)
    page: int
    page_size: int
    total_count: int
    total_pages: int


class ForloyDriver(HttpDriver):
    """The Forloy driver; ``offline=True`` records purchases by store-and-forward sync."""

    name = "forloy"
    environments: Mapping[str, str] = {"production": DEFAULT_BASE_URL}
    capabilities = ONLINE_CAPABILITIES
    #: the HTTP call behind each remote event and deferred delivery (for the diagrams)
    calls: Mapping[str, str] = {
        "preview": f"POST {API_PREFIX}/cards/lookup",
        "finalize": f"POST {API_PREFIX}/transactions/record",
        RECORD_DELIVERY: f"POST {API_PREFIX}/transactions/sync (up to {SYNC_BATCH_LIMIT} a batch)",
    }

    def __init__(
        self,
        *,
        email: str | Secret,
        password: str | Secret,
        location_id: str,
        staff_user_id: str,
        pos_terminal_id: str | None = None,
        currency: str = ASSUMED_CURRENCY,
        offline: bool = False,
        clock: Clock | None = None,
        **http: Any,
    ) -> None:
        super().__init__(**http)
        self._email = Secret(email)
        self._password = Secret(password)
        for label, value in (("location_id", location_id), ("staff_user_id", staff_user_id)):
            if not isinstance(value, str) or not value:
                raise ValidationError(f"{label} must be a non-empty string")
        if pos_terminal_id is not None and (not isinstance(pos_terminal_id, str) or not pos_terminal_id):
            raise ValidationError("pos_terminal_id must be None or a non-empty string")
        currency_exponent(currency)  # ValidationError for anything but ISO 4217
        self.location_id = location_id
        self.staff_user_id = staff_user_id
        self.pos_terminal_id = pos_terminal_id
        self.currency = currency
        self.offline = offline
        self.capabilities = OFFLINE_CAPABILITIES if offline else ONLINE_CAPABILITIES
        self._clock = clock or SystemClock()
        self._session: _Session | None = None
        self._qr_lock = threading.Lock()
        self._qr_by_card: dict[str, Secret] = {}

    def __repr__(self) -> str:
        return (
            f"ForloyDriver(base_url={self.base_url!r}, location_id={self.location_id!r},"
            f" staff_user_id={self.staff_user_id!r}, currency={self.currency!r},"
            f" offline={self.offline!r})"
        )

    # --- requests and answers ---

    def _build(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        token: Secret | None = None,
    ) -> httpx.Request:
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token.reveal()}"
        content = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            content = dumps(body)
        return httpx.Request(
            method, f"{self.base_url}{path}", content=content, headers=headers, params=params
        )

    def _envelope(self, response: httpx.Response) -> Mapping[str, Any]:
        """The parsed body of any answer below 500, or ProtocolError."""
        if response.status_code >= 500:
            raise self.unknown(f"HTTP {response.status_code} from Forloy")
        try:
            body = loads(response.content)
        except ValueError:
            raise self.unknown(
                f"HTTP {response.status_code} with a body that is not JSON"
                f" ({response.headers.get('content-type', 'no content type')})"
            ) from None
        if not isinstance(body, dict):
            raise self.unknown("the answer is not a JSON object")
        return body

    def _error_code(self, response: httpx.Response) -> str | None:
        try:
            error = self._envelope(response).get("error")
        except OutcomeUnknown:
            return None
        return error.get("code") if isinstance(error, dict) else None

    def _data(self, response: httpx.Response) -> Mapping[str, Any]:
        """The envelope's ``data``, a ProviderRejected for a definite no, else ProtocolError."""
        body = self._envelope(response)
        if response.status_code < 400 and body.get("success") is False:
            # An error envelope with a success status contradicts itself: it may have acted.
            raise self.unknown(f"HTTP {response.status_code} carrying an error envelope")
        if response.status_code >= 400 or body.get("success") is not True:
            error = body.get("error")
            if body.get("success") is not False or not isinstance(error, dict):
                raise self.unknown(f"HTTP {response.status_code} without a Forloy error")
            code = error.get("code")
            if not isinstance(code, str) or not code:
                raise self.unknown(f"HTTP {response.status_code} with an error but no code")
            message = _CASHIER_MESSAGES.get(code) or str(error.get("message") or code)
            raise self.rejected(code, message, retry_after=self._retry_after(error, response))
        data = body.get("data")
        if not isinstance(data, dict):
            raise self.unknown("a successful answer without a data object")
        return data

    @staticmethod
    def _retry_after(error: Mapping[str, Any], response: httpx.Response) -> float | None:
        field = error.get(ASSUMED_RETRY_AFTER_FIELD)
        if isinstance(field, (int, Decimal)) and not isinstance(field, bool) and field >= 0:
            return float(field)
        header = response.headers.get("retry-after", "")
        return float(header) if header.isdigit() else None

    # --- authentication ---

    def _login(self) -> Exchange[_Session]:
        body = {"email": self._email.reveal(), "password": self._password.reveal()}
        response = yield from self._send_safely(lambda: self._build("POST", "/auth/login", body))
        return self._start_session(self._data(response))

    def _refresh(self, session: _Session) -> Exchange[_Session]:
        """Refresh, or log in again if Forloy refuses the refresh or the answer is lost.

        Never re-sent as such: a rotated refresh token dies with its first use.
        """
        request = self._build(
            "POST", ASSUMED_REFRESH_PATH, {"refresh_token": session.refresh_token.reveal()}
        )
        try:
            response = yield request
            return self._start_session(self._data(response))
        except (OutcomeUnknown, ProviderRejected):
            return (yield from self._login())

    def _start_session(self, data: Mapping[str, Any]) -> _Session:
        access, refresh, lifetime = (
            data.get("access_token"), data.get("refresh_token"), data.get("expires_in")
        )
        if not (isinstance(access, str) and access and isinstance(refresh, str) and refresh):
            raise self.unknown("the login answer lacks access_token or refresh_token")
        if not isinstance(lifetime, int) or isinstance(lifetime, bool) or lifetime <= 0:
            raise self.unknown("the login answer lacks a positive expires_in")
        session = _Session(
            access_token=Secret(access),
            refresh_token=Secret(refresh),
            expires_at=self._clock.now() + timedelta(seconds=lifetime),
        )
        self._session = session
        return session

    def _current_session(self) -> Exchange[_Session]:
        session = self._session
        if session is None:
            return (yield from self._login())
        if session.needs_refresh(self._clock.now()):
            return (yield from self._refresh(session))
        return session

    def _send_safely(self, build, retries: int = SAFE_RETRIES) -> Exchange[httpx.Response]:
        """Send a request that is safe to repeat, re-sending it after transport failures."""
        while True:
            try:
                return (yield build())
            except OutcomeUnknown:
                if retries <= 0:
                    raise
                retries -= 1

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        *,
        safe: bool = True,
    ) -> Exchange[Mapping[str, Any]]:
        """One authenticated call: the envelope's data, or the error it means.

        A 401 is answered by one fresh authentication and one re-send: Forloy checks
        the token before anything else, so the refused request committed nothing.
        """
        session = yield from self._current_session()
        reauthenticated = False
        while True:
            token = session.access_token
            response = yield from self._send_safely(
                lambda: self._build(method, path, body, params, token),
                retries=SAFE_RETRIES if safe else 0,
            )
            if response.status_code == UNAUTHORIZED_STATUS and not reauthenticated:
                code = self._error_code(response)
                if code in (TOKEN_EXPIRED, UNAUTHORIZED):
                    reauthenticated = True
                    if code == TOKEN_EXPIRED:
                        session = yield from self._refresh(session)
                    else:
                        session = yield from self._login()
                    continue
            return self._data(response)

    # --- money ---

    def _check_currency(self, currency: str) -> None:
        if currency != self.currency:
            raise ValidationError(
                f"this Forloy driver is configured for {self.currency}, not {currency}"
            )

    def _money(self, data: Mapping[str, Any], field: str) -> Money:
        value = data.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
            raise self.unknown(f"{field} is missing or not a number")
        try:
            return Money.of(value, self.currency)
        except ValidationError:
            raise self.unknown(f"{field} {value} is not an amount in {self.currency}") from None

    def _rate(self, data: Mapping[str, Any], field: str) -> Decimal:
        value = data.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
            raise self.unknown(f"{field} is missing or not a number")
        rate = Decimal(value)
        if not Decimal(0) <= rate <= Decimal(1):
            raise self.unknown(f"{field} {rate} is not a rate between 0 and 1")
        return rate

    # --- the lifecycle ---

    @staticmethod
    def _card_identifier(token: Secret | None) -> dict[str, str]:
        """The lookup body: digits are a barcode, any other token a QR payload.

        The guides show QR payloads both as base64 (the record example) and as
        ``forloy_enr_abc123def456`` (the QR guide): the driver accepts any token of
        ``QR_PAYLOAD`` characters and lets Forloy judge it (``CARD_NOT_FOUND``).
        """
        if token is None:
            raise ValidationError("Forloy needs the customer's card: pass its QR code or barcode")
        value = token.reveal().strip()
        if not value or len(value) > MAX_CUSTOMER_TOKEN_LENGTH:
            raise ValidationError("the customer token is empty or too long for a Forloy card")
        if value.isascii() and value.isdigit():
            return {"barcode_value": value}
        if not QR_PAYLOAD.fullmatch(value):
            raise ValidationError(
                "the customer token is neither a Forloy QR payload nor a barcode"
            )
        return {"qr_code_data": value}

    def preview(self, request: PreviewRequest) -> Exchange[Quote]:
        basket = request.basket
        self._check_currency(basket.currency)
        if request.payment_type not in PAYMENT_TYPES:
            raise ValidationError(
                f"Forloy supports payment types {sorted(PAYMENT_TYPES)}, not {request.payment_type!r}"
            )
        identifier = self._card_identifier(request.customer_token)
        if self.offline and "qr_code_data" not in identifier:
            raise ValidationError("Forloy's offline sync identifies a card by its QR code only:"
                                  " scan the customer's QR code, not the barcode")
        card = yield from self._call("POST", "/cards/lookup", identifier)
        quote = self._quote(card, basket.items)
        if self.offline:  # (offline previews always scan the QR code: checked above)
            # An offline sync record must carry the QR payload: held here until finalize
            # queues the record, whose payload carries it as a Secret the engine seals.
            with self._qr_lock:
                self._qr_by_card[quote.details["card_instance_id"]] = Secret(identifier["qr_code_data"])
        return quote

    def _quote(self, card: Mapping[str, Any], items: Sequence[LineItem]) -> Quote:
        card_id, card_type = card.get("card_instance_id"), card.get("card_type")
        # seed 002 nests the balance; the rewards guide shows it flat beside the card
        balance = card.get("balance", _flat_balance(card))
        if not isinstance(card_id, str) or not card_id:
            raise self.unknown("the card lookup lacks card_instance_id")
        if card_type not in CARD_TYPES:
            raise self.unknown(f"unknown card_type {card_type!r}")
        if not isinstance(balance, dict):
            raise self.unknown("the card lookup lacks its balance")
        if card.get("status") != "active":
            raise self.rejected(
                ASSUMED_CARD_INACTIVE, f"this Forloy card is {card.get('status')!r}, not active"
            )
        title = str(card.get("card_title") or card.get("card_name") or "Forloy card")
        receipt = [ReceiptLine("textline", text=f"{title} ({card.get('merchant_name') or 'Forloy'})")]
        purchase = sum((item.gross for item in items), Money.zero(self.currency))
        details: dict[str, Any] = {
            "card_instance_id": card_id,
            "card_type": card_type,
            "card_title": title,
            "merchant_name": card.get("merchant_name"),
            "customer_name": card.get("customer_name"),
            "purchase_amount": format(purchase.to_decimal(), "f"),
            "balance": _json_safe(balance),
        }
        if card_type == "discount":
            rate = self._rate(balance, "discount_rate")
            lines = discount_lines(items, rate)
            details["discount_rate"] = format(rate, "f")
            tier = balance.get(TIER_FIELD)
            label = _percent(rate) + (f" ({tier})" if isinstance(tier, str) and tier else "")
            receipt.append(ReceiptLine("name-value", name="Discount", value=label))
        else:
            lines = [PricedLine.unpriced(item) for item in items]
            if card_type == "punch":
                receipt.append(ReceiptLine(
                    "name-value", name="Punches",
                    value=f"{balance.get('current_punches')}/{balance.get('punch_requirement')}",
                ))
                if balance.get("pending_rewards"):
                    receipt.append(ReceiptLine(
                        "name-value", name="Rewards to claim", value=str(balance["pending_rewards"])
                    ))
            elif CASHBACK_BALANCE_FIELD in balance:
                amount = self._money(balance, CASHBACK_BALANCE_FIELD)
                receipt.append(ReceiptLine("name-value", name="Cashback balance", value=str(amount)))
        return Quote(lines=lines, receipt=receipt, details=details)

    def update(self, tx: Transaction, items: tuple[LineItem, ...], key: str) -> Exchange[Quote]:
        raise NotImplementedError("update is local for Forloy: the engine adds the lines itself")

    def _record_fields(self, tx: Transaction) -> dict[str, Any]:
        """What a record carries, JSON-safe (the amount as a decimal string)."""
        details = tx.details
        card_id, card_type, amount = (
            details.get("card_instance_id"), details.get("card_type"), details.get("purchase_amount")
        )
        if not isinstance(card_id, str) or card_type not in CARD_TYPES or not isinstance(amount, str):
            raise ValidationError(f"transaction {tx.id} was not previewed by the Forloy driver")
        self._check_currency(tx.currency)
        fields: dict[str, Any] = {
            "card_instance_id": card_id,
            "card_type": card_type,  # ours, to read the answer; not sent
            "location_id": self.location_id,
            "staff_user_id": self.staff_user_id,
            "purchase_amount": amount,
            "pos_reference_id": tx.id,
        }
        if card_type == "punch":
            fields["punch_count"] = PUNCHES_PER_PURCHASE
        if self.pos_terminal_id is not None:
            fields["pos_terminal_id"] = self.pos_terminal_id
        return fields

    @staticmethod
    def _record_body(fields: Mapping[str, Any], key: str) -> dict[str, Any]:
        """The wire body: the amount becomes a JSON number, the key is added."""
        body = {name: value for name, value in fields.items() if name != "card_type"}
        body["purchase_amount"] = Decimal(fields["purchase_amount"])
        body["idempotency_key"] = key
        return body

    def finalize(self, tx: Transaction, key: str) -> Exchange[Outcome]:
        fields = self._record_fields(tx)
        data = yield from self._call("POST", "/transactions/record", self._record_body(fields, key))
        return self._recorded(tx, fields, data)

    def _recorded(self, tx: Transaction, fields: Mapping[str, Any], data: Mapping[str, Any]) -> Outcome:
        answer = Answer(data, provider=self.name, where="transactions/record")
        transaction_id = answer.text("transaction_id")
        card_type = answer.one_of("card_type", CARD_TYPES)
        if card_type != fields["card_type"]:
            raise self.unknown(f"recorded a {card_type!r} card, expected {fields['card_type']!r}")
        details: dict[str, Any] = {
            "forloy_transaction_id": transaction_id,
            "idempotent_replay": data.get("idempotent") is True,
        }
        receipt: list[ReceiptLine] = []
        if card_type == "punch":
            added = answer.integer("punches_added", minimum=0)
            count = answer.integer("new_punch_count", minimum=0)
            if added != fields.get("punch_count", PUNCHES_PER_PURCHASE):
                raise answer.fail("punches_added is not the punch_count sent")
            reward = data.get("reward")
            earned = data.get("reward_earned") is True
            if earned and not isinstance(reward, dict):
                raise self.unknown("a reward was earned but the answer does not describe it")
            details.update(punches_added=added, new_punch_count=count, reward_earned=earned,
                           reward=_json_safe(reward) if earned else None)
            receipt.append(ReceiptLine("name-value", name="Punches", value=str(count)))
            if earned:
                receipt.append(ReceiptLine(
                    "textline", text=f"Reward earned: {reward.get('title', 'reward')}",
                    decoration=("important",),
                ))
        else:
            sent = Money.of(fields["purchase_amount"], self.currency)
            if self._money(data, "purchase_amount") != sent:
                raise self.unknown("Forloy recorded a different purchase_amount than was sent")
            if card_type == "cashback":
                earned_back = self._money(data, "cashback_earned")
                new_balance = self._money(data, "new_balance")
                rate = self._rate(data, "cashback_rate")
                details.update(cashback_earned=format(earned_back.to_decimal(), "f"),
                               cashback_rate=format(rate, "f"),
                               new_balance=format(new_balance.to_decimal(), "f"),
                               tier_changed=data.get("tier_changed") is True)
                receipt += [ReceiptLine("name-value", name="Cashback earned", value=str(earned_back)),
                            ReceiptLine("name-value", name="Cashback balance", value=str(new_balance))]
            else:
                discount = self._money(data, "discount_amount")
                final = self._money(data, "final_amount")
                rate = self._rate(data, "discount_rate")
                if discount + final != sent:
                    raise self.unknown("discount_amount + final_amount != purchase_amount")
                details.update(discount_rate=format(rate, "f"),
                               discount_amount=format(discount.to_decimal(), "f"),
                               final_amount=format(final.to_decimal(), "f"),
                               # a tier change between preview and record shows here
                               discount_matches_preview=discount == tx.total_discount)
                receipt.append(ReceiptLine("name-value", name="Discount", value=str(discount)))
        return Outcome(provider_ref=transaction_id, receipt=receipt, details=details)

    def cancel(self, tx: Transaction, key: str) -> Exchange[Outcome]:
        raise NotImplementedError("cancel is local for Forloy: nothing exists before the record")

    def refund(self, tx: Transaction, key: str, comment: str | None) -> Exchange[Outcome]:
        raise NotImplementedError("Forloy documents no void or refund: refund is unsupported")

    # --- offline: store and forward ---

    def delivery_payload(self, kind: str, tx: Transaction) -> Mapping[str, Any]:
        if kind != RECORD_DELIVERY:
            raise ValueError(f"Forloy delivers {RECORD_DELIVERY!r} only, not {kind!r}")
        fields = self._record_fields(tx)
        fields["client_timestamp"] = wire_timestamp(tx.finalized_at or tx.updated_at)
        with self._qr_lock:
            qr = self._qr_by_card.get(fields["card_instance_id"])
        if qr is not None:  # a Secret: the engine seals it in the outbox, so a restart keeps it
            fields[QR_FIELD] = qr
        return fields

    def deliver(self, deliveries: tuple[Delivery, ...]) -> Exchange[Mapping[int, ProviderRejected] | None]:
        """Send queued records as one ``/transactions/sync`` batch.

        Forloy answers per record, so a batch is settled per record too: the refused ones
        come back as ``{delivery.id: ProviderRejected}`` (the engine parks them as dead,
        visible with Forloy's code) and the rest are delivered.  A replayed key counts as
        accepted, so re-sending a batch never doubles a record.
        """
        if not deliveries:
            return None
        if len(deliveries) > SYNC_BATCH_LIMIT:
            raise ValueError(f"a sync batch holds at most {SYNC_BATCH_LIMIT} records")
        if any(delivery.kind != RECORD_DELIVERY for delivery in deliveries):
            raise ValueError(f"Forloy delivers {RECORD_DELIVERY!r} only")
        refused: dict[int, ProviderRejected] = {}
        records, sending = [], []
        for delivery in deliveries:
            record = self._sync_record(delivery)
            if record is None:
                refused[delivery.id] = self.rejected(
                    QR_UNAVAILABLE,
                    f"{delivery.tx_id}: Forloy's offline sync needs the card's QR code, which this"
                    " driver no longer holds (restarted since the scan); record it again online")
            else:
                records.append(record)
                sending.append(delivery)
        if not records:
            return refused
        data = yield from self._call("POST", "/transactions/sync",
                                     {ASSUMED_SYNC_RECORDS_FIELD: records})
        results = data.get(ASSUMED_SYNC_RESULTS_FIELD)
        if not isinstance(results, list):
            raise self.unknown(f"the sync answer lacks {ASSUMED_SYNC_RESULTS_FIELD}")
        by_key = {r.get("idempotency_key"): r for r in results if isinstance(r, dict)}
        for delivery in sending:
            result = by_key.get(delivery.idempotency_key)
            if result is None:
                raise self.unknown(f"the sync answer says nothing about {delivery.tx_id}")
            if result.get("success") is True:
                continue
            error = result.get("error")
            if result.get("success") is not False or not isinstance(error, dict) or not error.get("code"):
                raise self.unknown(f"the sync answer for {delivery.tx_id} is neither success nor error")
            refused[delivery.id] = self.rejected(
                str(error["code"]), f"{delivery.tx_id}: {error.get('message') or error['code']}")
        return refused or None

    def _sync_record(self, delivery: Delivery) -> dict[str, Any] | None:
        """The offline-sync wire record: the guide requires ``qr_code_data`` per record.

        Only the code finalize sealed into the queued record counts.  One queued without
        it (the process restarted between the scan and finalize), or sealed under another
        key, is None on every attempt alike: refused before anything is sent.  A code
        from a later scan of the same card, held in this process only, would let the
        record go out once and leave it, after a restart before the answer, held by
        Forloy perhaps and re-sendable by no process: parked as never sent."""
        qr = delivery.payload.get(QR_FIELD)
        if not isinstance(qr, Secret):
            return None
        record = self._record_body({k: v for k, v in delivery.payload.items() if k != QR_FIELD},
                                   delivery.idempotency_key)
        del record["card_instance_id"]
        record["qr_code_data"] = qr.reveal()
        return record

    # --- beyond the lifecycle: what a POS also shows the customer ---

    def me(self) -> Exchange[Mapping[str, Any]]:
        """The logged-in staff account (``GET /auth/me``): check the configuration."""
        return (yield from self._call("GET", "/auth/me"))

    def claim_reward(self, card_instance_id: str) -> Exchange[Mapping[str, Any]]:
        """Claim the card's oldest pending reward; returns the reward Forloy claimed.

        Not re-sent after a transport failure: a claim has no idempotency key.
        """
        body = {"card_instance_id": card_instance_id, "location_id": self.location_id,
                "staff_user_id": self.staff_user_id}
        data = yield from self._call("POST", "/rewards/claim", body, safe=False)
        # the rewards guide: {transaction_id, reward_id, reward_name, reward_amount,
        # earned_at, pending_rewards_remaining}
        answer = Answer(data, provider=self.name, where="rewards/claim")
        answer.text("transaction_id")
        answer.text("reward_id")
        answer.integer("pending_rewards_remaining", minimum=0)
        return data

    def transaction_history(
        self,
        card_instance_id: str,
        *,
        page: int = 1,
        page_size: int = HISTORY_DEFAULT_PAGE_SIZE,
        transaction_type: str | None = None,
        from_date: datetime | None = None,
        to_date: datetime | None = None,
    ) -> Exchange[HistoryPage]:
        if not 1 <= page_size <= ASSUMED_HISTORY_MAX_PAGE_SIZE or page < 1:
            raise ValidationError(f"page >= 1 and page_size 1..{ASSUMED_HISTORY_MAX_PAGE_SIZE}")
        params: dict[str, Any] = {"card_instance_id": card_instance_id, "page": page,
                                  "page_size": page_size}
        if transaction_type is not None:
            params["transaction_type"] = transaction_type
        if from_date is not None:
            params["from_date"] = wire_timestamp(from_date)
        if to_date is not None:
            params["to_date"] = wire_timestamp(to_date)
        data = yield from self._call("GET", "/transactions/history", params=params)
        transactions, paging = data.get("transactions"), data.get("pagination")
        if not isinstance(transactions, list) or not isinstance(paging, dict):
            raise self.unknown("the history answer lacks transactions or pagination")
        try:
            return HistoryPage(
                transactions=transactions, page=int(paging["page"]), page_size=int(paging["page_size"]),
                total_count=int(paging["total_count"]), total_pages=int(paging["total_pages"]),
            )
        except (KeyError, TypeError, ValueError):
            raise self.unknown("the history pagination is incomplete") from None


__all__ = ["ForloyDriver", "HistoryPage", "discount_lines", "dumps", "loads", "wire_timestamp"]
