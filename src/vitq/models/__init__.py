"""Model adapters: importing this package registers every known family."""
from . import mmdet_swin, swin, vit  # noqa: F401  (registration side effects; mmdet loads only on use)
from .registry import (ADAPTERS, Adapter, NormPair, UnsupportedModelError, adapter_for, adapter_option_fields,
                       family_of, find_roots, norm_pairs, register_adapter, rewrite, units)

__all__ = ["ADAPTERS", "Adapter", "NormPair", "UnsupportedModelError", "adapter_for", "adapter_option_fields",
           "family_of", "find_roots", "norm_pairs", "register_adapter", "rewrite", "units"]
