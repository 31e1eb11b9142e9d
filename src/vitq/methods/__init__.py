"""Methods: one file each; importing this package registers the built-in ones."""
from . import fqvit, isvit, liu21, noisyquant, qdrop, repq  # noqa: F401  (registration side effects)
from .base import (ADDONS, METHODS, Addon, Method, NoOptions, build_method, get_method, register_addon,
                   register_method)

__all__ = ["ADDONS", "METHODS", "Addon", "Method", "NoOptions", "build_method", "get_method", "register_addon",
           "register_method"]
