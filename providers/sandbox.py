"""Moved: the sandbox toolkit is the property kit's, ``txengine.testing.sandbox``.

Kept as an alias so code written against the old path keeps working; new code imports
``txengine.testing.sandbox`` (the kit never imports ``txengine.providers``).
"""

from txengine.testing.sandbox import *  # noqa: F401,F403
from txengine.testing.sandbox import __all__  # noqa: F401
