"""sahn-bench infrastructure: data, masks, metrics, weights, training and evaluation loops."""
import importlib

from bench.errors import UserError

# Imported on first use: ``import bench`` stays cheap for processes that need one light module (a Ray
# actor's worker imports its class's package), while ``bench.create_method`` works as documented.
_FROM_METHODS = ("InpaintingMethod", "available_methods", "create_method", "register_method", "variant")

__all__ = ["UserError", *_FROM_METHODS]


def __getattr__(name: str):
    if name in _FROM_METHODS:
        return getattr(importlib.import_module("bench.methods"), name)
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
