"""Forloy: staff-login loyalty cards (punch, cashback, discount); see ``driver``."""

from .driver import ForloyDriver
from .sandbox import ForloySandbox, forloy_pair

__all__ = ["ForloyDriver", "ForloySandbox", "forloy_pair"]
