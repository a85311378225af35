"""sahn-bench infrastructure: data, masks, metrics, weights, training and evaluation loops."""
from bench.errors import UserError
from bench.methods import InpaintingMethod, available_methods, create_method, register_method, variant

__all__ = ["InpaintingMethod", "UserError", "available_methods", "create_method", "register_method", "variant"]
