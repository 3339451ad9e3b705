"""What the property suites need to know about one provider: ``ProviderHarness``.

A harness is a small adapter between the generic suites and one provider's driver and
sandbox (or a recorded fake that behaves like one).  It says how to build them, which
customers exist, how to read the provider's ledger, and which sandbox operations carry
which lifecycle event, so faults can be aimed.  Each bundled provider ships its own
(``txengine.providers.<name>.harness``, registered as an entry point, see
``txengine.testing.registry``); a POS team writes one for its own driver::

    class AcmeHarness(ProviderHarness):
        provider = "acme"
        wallet_labels = ("rich", "poor")
        fault_operations = {"preview": ("quote",), "finalize": ("charge",), "deliver": ()}

        def make_sandbox(self, clock):
            sandbox = AcmeSandbox(clock)
            sandbox.add_wallet("rich", 5000)
            sandbox.add_wallet("poor", 100)
            return sandbox

        def make_driver(self, sandbox, *, transport, clock):
            return AcmeDriver(api_key="test", transport=transport)

        def customer_token(self, sandbox, wallet):
            return sandbox.card_of(wallet)

        def balance(self, sandbox, wallet):
            return sandbox.balance(wallet)

        def commits(self, sandbox):
            return Counter((entry.kind, entry.ref) for entry in sandbox.ledger)

The store is a parameter too (``SQLiteStores`` by default): anything with ``new_url()``
and ``dispose(url)``, so the same suites run against another store by passing its
factory.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import httpx
from hypothesis import strategies as st

from ..clock import Clock
from ..drivers import ProviderDriver
from ..models import Basket, LineItem, Transaction
from ..money import CURRENCY_EXPONENTS, Money
from .sandbox import FAULT_HEADER
from . import strategies as values

def deterministic_key(*parts: object, length: int = 32) -> str:
    """A deterministic hex key for a harness's customers: runs replay exactly, and no real key is used."""
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:length]


# --- stores ----------------------------------------------------------------------------------------


class StoreFactory(Protocol):
    """Where the suites keep their engines' data: a fresh, empty store per run."""

    def new_url(self) -> str:
        """The URL of a new, empty store (``Engine.open`` takes it; a restart reopens it)."""

    def dispose(self, url: str) -> None:
        """Remove what ``new_url`` created."""


def _default_directory() -> str | None:
    """``$TXENGINE_TEST_STORE_DIR``, else ``/dev/shm`` (RAM) where there is one, else the temp dir.

    The suites make thousands of durable commits; on a disk each waits for a flush, which
    tests nothing the suites check (they simulate crashes above the file system).
    """
    chosen = os.environ.get("TXENGINE_TEST_STORE_DIR")
    if chosen:
        return chosen
    ram = "/dev/shm"
    return ram if os.path.isdir(ram) and os.access(ram, os.W_OK) else None


class SQLiteStores:
    """A new SQLite file per run, in its own temporary directory (see ``_default_directory``).

    Real files through the real ``SQLiteStore`` (WAL, ``synchronous=FULL``); a restart
    reopens the same file.  Each file is a copy of one migrated when the factory is first
    used: a copy takes a quarter of the time a migration does (0.5 ms against 2.2), and a
    shrinking run opens a store for each of its hundreds of attempts.
    """

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory if directory is not None else _default_directory()
        self._template: str | None = None

    def new_url(self) -> str:
        folder = tempfile.mkdtemp(prefix="txengine-", dir=self.directory)
        path = os.path.join(folder, "txengine.db")
        shutil.copyfile(self._migrated_template(), path)
        return f"sqlite:///{path}"

    def _migrated_template(self) -> str:
        if self._template is None or not os.path.exists(self._template):
            from ..store.sqlite import SQLiteStore

            folder = tempfile.mkdtemp(prefix="txengine-template-", dir=self.directory)
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            path = os.path.join(folder, "txengine.db")
            SQLiteStore(path).close()  # the last connection closed: the file holds it all
            self._template = path
        return self._template

    def dispose(self, url: str) -> None:
        shutil.rmtree(os.path.dirname(url.removeprefix("sqlite:///")), ignore_errors=True)

    def __repr__(self) -> str:
        return f"SQLiteStores({self.directory!r})"


class CallableStores:
    """A store factory from a function: ``new_url()`` is called for every run (it must give
    a fresh, empty store: a new file, schema or database), ``dispose(url)`` after it."""

    def __init__(self, new_url: Callable[[], str], dispose: Callable[[str], None] | None = None) -> None:
        self._new_url, self._dispose = new_url, dispose

    def new_url(self) -> str:
        return self._new_url()

    def dispose(self, url: str) -> None:
        if self._dispose is not None:
            self._dispose(url)

    def __repr__(self) -> str:
        return f"CallableStores({getattr(self._new_url, '__name__', self._new_url)!r})"


StoreOption = StoreFactory | Callable[[], str] | str


def as_store_factory(store: StoreOption | None) -> StoreFactory:
    """What the suites accept as ``store``: a ``StoreFactory``; a function returning a fresh
    store's URL per run; ``"sqlite:///some/dir/"`` (a new file per run in that directory);
    or None (``SQLiteStores()``)."""
    if store is None:
        return SQLiteStores()
    if isinstance(store, str):
        if store.startswith("sqlite:///") and store.endswith("/"):
            return SQLiteStores(store.removeprefix("sqlite:///"))
        raise ValueError("a store URL names one database, and every run needs a fresh one: pass"
                         " 'sqlite:///a/directory/' or a function returning a new URL per run")
    if hasattr(store, "new_url"):
        return store  # type: ignore[return-value]
    if callable(store):
        return CallableStores(store)
    raise TypeError(f"not a store factory: {store!r}")


# --- the transport the suites hand a driver ----------------------------------------------------------


class SimulatedCrash(BaseException):
    """The POS process died: raised past every ``except Exception``, like a kill would be."""


class SandboxTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """The sandbox in-process, with one extra power: ``crash_after_next_answer()``.

    Armed, the next request reaches the sandbox (which acts on it), and then the POS
    process "dies" before it reads the answer: ``SimulatedCrash`` propagates out of the
    engine, leaving exactly what a killed process leaves in the store.
    """

    def __init__(self, sandbox: Any) -> None:
        self.sandbox = sandbox
        self._inner = sandbox.transport()
        self._crash_armed = False
        #: every request the driver sent, counted here (also those a fault swallowed)
        self.sent: list[httpx.Request] = []
        #: the HTTP status each answered request got (by the request's identity)
        self.statuses: dict[int, int] = {}

    def crash_after_next_answer(self) -> None:
        self._crash_armed = True

    def disarm(self) -> bool:
        """Disarm; True if the crash was still armed (no request went out)."""
        armed, self._crash_armed = self._crash_armed, False
        return armed

    def _after(self, response: httpx.Response) -> httpx.Response:
        if self._crash_armed:
            self._crash_armed = False
            raise SimulatedCrash("the POS process died after the provider acted")
        return response

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        response = self._inner.handle_request(request)
        self._count(request, response)
        return self._after(response)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        response = await self._inner.handle_async_request(request)
        self._count(request, response)
        return self._after(response)

    def _count(self, request: httpx.Request, response: httpx.Response) -> None:
        if FAULT_HEADER not in response.headers:  # a spoiled answer is no answer
            self.statuses[id(request)] = response.status_code


# --- the harness ---------------------------------------------------------------------------------


class ProviderHarness:
    """How the lifecycle suites drive one provider.  Subclass it; override what differs.

    Required: ``provider``, ``wallet_labels``, ``fault_operations``, ``make_sandbox``,
    ``make_driver``, ``customer_token``, ``balance``, ``commits``.
    """

    #: the name the engine knows the driver by (``Engine.open(providers={provider: driver})``)
    provider: str = ""
    #: the customers' wallets ``make_sandbox`` sets up, by a readable label
    wallet_labels: tuple[str, ...] = ()
    #: whether a preview without a customer (an anonymous sale) is possible
    anonymous: bool = False
    #: lifecycle event -> the sandbox operations (its ``@route`` names) that event's
    #: provider calls use; ``deliver`` names those of deferred deliveries.  A fault
    #: injected into one of these fires on that call.
    fault_operations: Mapping[str, tuple[str, ...]] = {}
    #: operation -> why its answer carries an amount only the provider can compute and
    #: nothing in the transaction confirms (secuconnect's ``missing_sum``): an amount off
    #: by one there is undetectable, so the conformance check does not demand it
    unconfirmable_amounts: Mapping[str, str] = {}
    #: event -> the kind of provider commit (in ``commits``) the event makes, when it makes one
    commit_kinds: Mapping[str, str] = {}
    #: the currencies baskets are drawn in (the first is the default for added items)
    currencies: tuple[str, ...] = ("EUR",)
    #: products the sandbox prices specially (discounts, deals), so baskets hit them
    product_ids: tuple[str | None, ...] = ("beer", "coffee", "sku-1", None)
    #: the wire carries whole currency units only (Cheers)
    whole_units: bool = False
    #: VAT must be an integer percent (Cheers, secuconnect)
    integer_vat: bool = False
    #: the largest unit price drawn, in minor units
    max_unit_minor: int = 5_000

    # --- building the world -------------------------------------------------------------------

    def make_sandbox(self, clock: Clock) -> Any:
        """A fresh sandbox on ``clock``, with every wallet of ``wallet_labels`` set up."""
        raise NotImplementedError

    def make_driver(self, sandbox: Any, *, transport: httpx.BaseTransport, clock: Clock) -> ProviderDriver:
        """A driver talking to ``sandbox`` through ``transport`` (use it: crashes are simulated there)."""
        raise NotImplementedError

    def engine_options(self) -> dict[str, Any]:
        """Extra ``Engine.open`` options (timer overrides, leases...)."""
        return {}

    # --- customers and ledgers ------------------------------------------------------------------

    def customer_token(self, sandbox: Any, wallet: str) -> str:
        """The key the customer of ``wallet`` shows at the till.  Called once per preview:
        a provider with one-time keys issues a fresh one each time."""
        raise NotImplementedError

    def balance(self, sandbox: Any, wallet: str) -> int:
        """The wallet's ledger balance at the provider, in whatever unit ``ledger_effect`` uses."""
        raise NotImplementedError

    def opening_balance(self, sandbox: Any, wallet: str) -> int | None:
        """The balance the sandbox says the wallet opened with; None: the balance at set-up."""
        return None

    def ledger_effect(self, sandbox: Any, wallet: str, tx: Transaction) -> int:
        """How a finalized, not refunded transaction moves the wallet's balance."""
        return -tx.total_credits.amount_minor

    def commits(self, sandbox: Any) -> Counter:
        """Every commit the provider's ledger holds, counted by ``(kind, reference)``.

        Exactly-once means no count above one.  Kinds named in ``commit_kinds`` are the
        ones the conformance check expects one of per event.
        """
        raise NotImplementedError

    def delivery_moves_money(self) -> bool:
        """True when a deferred delivery, not the event, moves the wallet (offline record)."""
        return False

    # --- values --------------------------------------------------------------------------------

    def baskets(self) -> st.SearchStrategy[Basket]:
        """Baskets this provider can price (its currencies, units and VAT rules), mostly in
        the first currency: added items are drawn in it, and should usually match."""
        weighted = (self.currencies[0],) * 3 + self.currencies[1:]
        return values.baskets(weighted, max_lines=4, **self._line_options())

    def added_items(self) -> st.SearchStrategy[list[LineItem]]:
        """Lines added by ``update`` (fees, tips), in the default currency."""
        return st.lists(values.line_items(self.currencies[0], **self._line_options()), min_size=1, max_size=2)

    def payment_types(self, driver: ProviderDriver) -> tuple[str, ...]:
        return tuple(sorted(driver.capabilities.payment_types))

    def invalid_customer_tokens(self) -> st.SearchStrategy[Any]:
        """Strings this provider's driver refuses as customer keys (``ValidationError``)."""
        return st.nothing()

    def example_basket(self) -> Basket:
        """A basket every event can run on (the conformance check's happy path)."""
        return Basket([LineItem(self.product_ids[0], "Example item", 2, self._amount(300), 20)])

    def example_items(self) -> list[LineItem]:
        """Lines an example ``update`` adds (a tip)."""
        return [LineItem(None, "Tip", 1, self._amount(100), 0)]

    def _amount(self, units: int) -> Money:
        """``units`` minor units, or whole units where the wire carries no fractions."""
        currency = self.currencies[0]
        return Money(units * (10 ** CURRENCY_EXPONENTS[currency] if self.whole_units else 1), currency)

    def _line_options(self) -> dict[str, Any]:
        # Curated names (accents, emoji, CJK, RTL, the longest allowed), not generated
        # text: the value suites cover arbitrary names, the lifecycle needs fast draws.
        return {"product_ids": self.product_ids, "whole_units": self.whole_units,
                "integer_vat": self.integer_vat, "max_unit_minor": self.max_unit_minor,
                "names": values.product_names(generated=False)}

    # --- reading requests (conformance) ------------------------------------------------------------

    def repeatable(self, request: httpx.Request) -> bool:
        """May the driver send ``request`` twice in one attempt (reads, logins)?  Default: GETs.
        The conformance check flags any other request sent again after a clean 2xx answer."""
        return request.method == "GET"

    def idempotency_key_of(self, request: Any) -> str | None:
        """The idempotency key a sandbox request carries, if any.

        Default: a header whose name mentions ``idempotency``, else a top-level JSON
        field ``idempotency_key``.  Override for providers keyed otherwise (Rekonect's
        ``transaction.transactionId``).
        """
        for name, value in request.headers.items():
            if "idempotency" in name.lower():
                return value
        body = _json_body(request)
        key = body.get("idempotency_key") if isinstance(body, dict) else None
        return key if isinstance(key, str) else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _json_body(request: Any) -> Any:
    try:
        return json.loads(request.body or b"null")
    except ValueError:
        return None


def operations(harness: ProviderHarness) -> tuple[str, ...]:
    """Every sandbox operation the harness names, in a stable order."""
    seen: dict[str, None] = {}
    for names in harness.fault_operations.values():
        for name in names:
            seen.setdefault(name, None)
    return tuple(seen)


def wallet_labels(harness: ProviderHarness) -> Sequence[str | None]:
    return (*harness.wallet_labels, *((None,) if harness.anonymous else ()))
