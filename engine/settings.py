"""Configuration from the environment (``TXENGINE_*``), for the worker and the CLI.

pydantic-settings reads and validates it; credentials are ``SecretStr``, so a settings
object printed, logged or put in an exception shows ``**********``.  A POS embedding
the library passes its configuration to ``Engine.open`` directly and needs none of this.

=================================  ===========================================================
``TXENGINE_DB``                    database: a SQLite path, ``sqlite:///...`` or ``postgresql://...``
``TXENGINE_PREVIEW_TTL``           seconds a preview lives (overrides every provider's timer)
``TXENGINE_UPDATE_EXTENSION``      seconds an update extends a preview's life
``TXENGINE_REFUND_WINDOW``         seconds a finalized transaction stays refundable
``TXENGINE_INTENT_LEASE``          seconds an in-doubt call is leased before recover() re-drives it
``TXENGINE_CHEERS_API_KEY``        Cheers Loyalty API key
``TXENGINE_REKONECT_API_KEY``      Rekonect API key
``TXENGINE_FORLOY_API_KEY``        Forloy API key
``TXENGINE_SECUCONNECT_CLIENT_ID`` / ``..._CLIENT_SECRET``  secuconnect OAuth client
``TXENGINE_<PROVIDER>_BASE_URL``   where that provider's driver talks (sandbox or production)
=================================  ===========================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .drivers import ProviderDriver

DEFAULT_DB = "txengine.db"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TXENGINE_", extra="ignore", frozen=True)

    db: str = Field(DEFAULT_DB, description="SQLite path, sqlite:/// or postgresql:// URL")
    preview_ttl: float | None = Field(None, gt=0, description="seconds a preview lives")
    update_extension: float | None = Field(None, gt=0, description="seconds an update extends it")
    refund_window: float | None = Field(None, gt=0, description="seconds a sale stays refundable")
    intent_lease: float | None = Field(None, gt=0, description="seconds before recover() re-drives")

    cheers_api_key: SecretStr | None = None
    cheers_base_url: str | None = None
    rekonect_api_key: SecretStr | None = None
    rekonect_base_url: str | None = None
    forloy_api_key: SecretStr | None = None
    forloy_base_url: str | None = None
    secuconnect_client_id: str | None = None
    secuconnect_client_secret: SecretStr | None = None
    secuconnect_base_url: str | None = None

    def engine_options(self, drivers: Mapping[str, ProviderDriver]) -> dict[str, Any]:
        """The ``Engine.open`` options the environment overrides (none by default): each
        timer set replaces that deadline for every provider, the others keep the driver's."""
        options: dict[str, Any] = {}
        timers = {name: timedelta(seconds=seconds) for name, seconds in (
            ("preview_ttl", self.preview_ttl), ("update_extension", self.update_extension),
            ("refund_window", self.refund_window)) if seconds is not None}
        if timers:
            options["timers"] = {name: attrs.evolve(driver.capabilities.timers, **timers)
                                 for name, driver in drivers.items()}
        if self.intent_lease is not None:
            options["intent_lease"] = timedelta(seconds=self.intent_lease)
        return options


def redacted_db(db: str) -> str:
    """``db`` fit for a log line: a URL's password (and user) replaced, a path unchanged."""
    parts = urlsplit(db)
    if "://" not in db or parts.password is None and parts.username is None:
        return db
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def load() -> Settings:
    return Settings()  # type: ignore[call-arg]  # every field has a default or comes from TXENGINE_*
