"""The backend-agnostic core: KL semantics defined once through the array API."""
from .divergence import jeffreys_div, js_div, kl_div, kl_terms, reverse_kl
from .validation import normalization_tolerance, set_validation, validation

__all__ = [
    "kl_div", "reverse_kl", "js_div", "jeffreys_div", "kl_terms",
    "set_validation", "validation", "normalization_tolerance",
]
