"""Cheers Loyalty: the driver and its sandbox (see ``driver``'s fidelity note)."""

from .driver import (
    PRODUCTION_BASE_URL,
    SANDBOX_BASE_URL,
    CatalogProduct,
    CheersDriver,
    Reconciled,
    UpdateNotReconciled,
    product_catalog,
    reconcile_update,
)
from .sandbox import DEFAULT_API_KEY, CheersSandbox

__all__ = [
    "CatalogProduct",
    "CheersDriver",
    "CheersSandbox",
    "DEFAULT_API_KEY",
    "PRODUCTION_BASE_URL",
    "Reconciled",
    "SANDBOX_BASE_URL",
    "UpdateNotReconciled",
    "product_catalog",
    "reconcile_update",
]
