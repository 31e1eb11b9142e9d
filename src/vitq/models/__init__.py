"""Model adapters: importing this package registers every known family."""
from . import swin, vit  # noqa: F401  (registration side effects)
from .registry import MODEL_FAMILIES, MODULE_TWINS, UnsupportedModelError, family_of, rewrite

__all__ = ["MODEL_FAMILIES", "MODULE_TWINS", "UnsupportedModelError", "family_of", "rewrite"]
