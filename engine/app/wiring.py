"""Which providers the application runs: the demo's in-process sandboxes, or a
deployment's ``module:function`` factory.  The only module that imports the providers."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping

from ..clock import Clock
from ..drivers import ProviderDriver
from ..errors import ValidationError


def load_providers(spec: str) -> dict[str, ProviderDriver]:
    """``package.module:function``: the function returns ``{name: driver}`` (credentials are
    the function's business: the environment, a secrets manager; never the command line).

    The current directory is searched first, as uvicorn and gunicorn do.  Every way this
    can fail (no such module, a factory that raises, a wrong return) is a ``ValidationError``
    naming the spec and the exception's type only: its text could echo a credential."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValidationError(f"--providers wants module:function, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as missing:
        raise ValidationError(f"cannot load {spec!r}: {type(missing).__name__}") from None
    try:
        providers = factory()
    except Exception as failed:
        raise ValidationError(f"{spec} raised {type(failed).__name__} while building the providers") from None
    if not isinstance(providers, Mapping) or not providers or not all(
            isinstance(name, str) and isinstance(driver, ProviderDriver) for name, driver in providers.items()):
        raise ValidationError(f"{spec} must return a non-empty {{name: ProviderDriver}} mapping")
    return dict(providers)


def demo_providers(clock: Clock | None = None) -> dict[str, ProviderDriver]:
    """Every provider wired to an in-process sandbox (nothing leaves the machine): for
    trying the worker locally.  Forloy runs offline, so its records go through the queue."""
    from ..clock import SystemClock

    pairs = demo_pairs(clock or SystemClock(), forloy_offline=True)
    return {name: driver for name, (_, driver) in pairs.items()}


def demo_pairs(clock: Clock, *, forloy_offline: bool = False) -> dict[str, tuple]:
    """Every provider's sandbox, in-process, and its driver wired to it."""
    from txengine.providers.cheers import CheersDriver, CheersSandbox
    from txengine.providers.cheers.sandbox import DEFAULT_API_KEY
    from txengine.providers.forloy.sandbox import forloy_pair
    from txengine.providers.reference import ReferenceDriver, ReferenceSandbox
    from txengine.providers.rekonect.sandbox import rekonect_pair
    from txengine.providers.secuconnect import SecuconnectDriver, SecuconnectSandbox
    from txengine.providers.secuconnect.sandbox import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET

    reference = ReferenceSandbox(clock)
    cheers = CheersSandbox(clock)
    secuconnect = SecuconnectSandbox(clock)
    return {
        "reference": (reference, ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=reference.transport())),
        "cheers": (cheers, CheersDriver(environment="sandbox", api_key=DEFAULT_API_KEY, transport=cheers.transport())),
        "rekonect": rekonect_pair(clock),
        "forloy": forloy_pair(clock, offline=forloy_offline),
        "secuconnect": (secuconnect, SecuconnectDriver(environment="sandbox", client_id=DEFAULT_CLIENT_ID, client_secret=DEFAULT_CLIENT_SECRET,
                                                       clock=clock, transport=secuconnect.transport())),
    }


