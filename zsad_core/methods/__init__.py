"""Methods, one module each, registered by name (see base.py for the shared interface).

Every module in this package is imported on first lookup, so a new method only needs its own file
with an `@register` class.
"""
import importlib
import pkgutil

from .base import METHODS, Method, Prediction, create_method, method_class, parse_options, register


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["METHODS", "Method", "Prediction", "create_method", "method_class", "parse_options", "register"]
