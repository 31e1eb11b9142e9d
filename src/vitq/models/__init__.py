"""Model adapters: importing this package registers every known family."""
from . import swin, vit  # noqa: F401  (registration side effects)
from .registry import (ADAPTERS, Adapter, NormPair, UnsupportedModelError, adapter_for, family_of, find_roots,
                       norm_pairs, register_adapter, rewrite, units)

__all__ = ["ADAPTERS", "Adapter", "NormPair", "UnsupportedModelError", "adapter_for", "family_of", "find_roots",
           "norm_pairs", "register_adapter", "rewrite", "units"]
