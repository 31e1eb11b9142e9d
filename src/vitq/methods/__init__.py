"""Methods: one file each; importing this package imports every module in it, which registers them."""
from ..registry import import_modules
from .base import (ADDONS, METHODS, Addon, Method, NoOptions, build_method, get_method, register_addon,
                   register_method)

__all__ = ["ADDONS", "METHODS", "Addon", "Method", "NoOptions", "build_method", "get_method", "register_addon",
           "register_method"]

import_modules(__name__, __path__)  # registration side effects: a new method is a new file here
