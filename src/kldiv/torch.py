"""PyTorch-only entry points: the memory-bounded fused losses.

``kldiv.kl_div`` already takes the fused path by itself for torch tensors in log space with a
"sum" or "mean" reduction; this module adds what only makes sense in torch: the loss fused with
the output layer (``linear_kl_div``) and the variant that reuses the student's logits buffer for
its gradient (``kl_div_inplace``).
"""
from .backends.torch_fused import kl_div_inplace  # noqa: F401  (issue 3, fused kernels)
from .backends.torch_linear import linear_kl_div  # noqa: F401  (issue 3, fused output layer)

__all__ = ["linear_kl_div", "kl_div_inplace"]
