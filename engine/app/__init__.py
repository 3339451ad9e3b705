"""The application layer: the operator's ``txengine`` command line, the demo, the worker's
wiring and ``sandbox serve``.  It is the only part of txengine that knows the providers;
the engine's library modules never import ``txengine.providers``."""
