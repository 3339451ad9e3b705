"""Moved to ``txengine.app.cli`` (the application layer); kept so ``python -m txengine.cli``
and ``from txengine.cli import main`` keep working."""

import sys

from .app.cli import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    sys.exit(main())
