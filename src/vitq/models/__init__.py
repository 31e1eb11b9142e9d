"""Model adapters: importing this package imports every module in it, which registers every family
(adapters are tried in name order: mmdet_swin, swin, vit; mmdet itself loads only on use)."""
from ..registry import import_modules
from .registry import (ADAPTERS, Adapter, NormPair, UnsupportedModelError, adapter_for, adapter_option_fields,
                       family_of, find_roots, norm_pairs, register_adapter, rewrite, units)

__all__ = ["ADAPTERS", "Adapter", "NormPair", "UnsupportedModelError", "adapter_for", "adapter_option_fields",
           "family_of", "find_roots", "norm_pairs", "register_adapter", "rewrite", "units"]

import_modules(__name__, __path__)  # registration side effects: a new family is a new file here
