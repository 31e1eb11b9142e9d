"""Methods: one file each; importing this package registers the built-in ones."""
from . import fqvit, isvit, qdrop, repq  # noqa: F401  (registration side effects)
from .base import METHODS, Method, NoOptions, get_method, register_method

__all__ = ["METHODS", "Method", "NoOptions", "get_method", "register_method"]
