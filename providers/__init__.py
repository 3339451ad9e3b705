"""Provider drivers and their sandboxes, one package per provider.

``SANDBOXES`` maps a provider name to its sandbox class (``module:Class``), for
``txengine sandbox serve NAME`` and the demo.
"""

SANDBOXES: dict[str, str] = {
    "reference": "txengine.providers.reference:ReferenceSandbox",
    "cheers": "txengine.providers.cheers:CheersSandbox",
    "rekonect": "txengine.providers.rekonect:RekonectSandbox",
    "forloy": "txengine.providers.forloy:ForloySandbox",
    "secuconnect": "txengine.providers.secuconnect:SecuconnectSandbox",
}


def load_sandbox_class(name: str):
    import importlib

    try:
        module_name, _, class_name = SANDBOXES[name].partition(":")
    except KeyError:
        raise LookupError(f"no sandbox named {name!r}; known: {', '.join(SANDBOXES)}") from None
    return getattr(importlib.import_module(module_name), class_name)
