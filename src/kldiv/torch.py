"""PyTorch-only entry points: the memory-bounded fused losses and the switch of the fused path.

``kldiv.kl_div`` already takes the fused path by itself for torch tensors in log space with a
"sum" or "mean" reduction (when no gradient is recorded, or for inputs of at least
``FUSED_MIN_ELEMENTS`` elements, so that small-batch Hessian-vector products keep working
through the core); this module adds what only makes sense in torch: the loss fused with the
output layer (``linear_kl_div``), the variant that reuses the student's logits buffer for its
gradient (``kl_div_inplace``), ``set_fused`` / ``fused`` to switch the fused path off, and
``release_grad_buffers`` to free the gradient memory the fused path keeps for reuse across steps.
"""
from .backends.torch_fused import (  # noqa: F401  (issue 3, fused kernels)
    FUSED_MIN_ELEMENTS,
    fused,
    fused_enabled,
    kl_div_inplace,
    release_grad_buffers,
    set_fused,
)
from .backends.torch_linear import linear_kl_div  # noqa: F401  (issue 3, fused output layer)
from ._torch_modules import (  # noqa: F401  (issue 15, nn.Module losses)
    JSDivLoss,
    KLDivLoss,
    LinearKLDivLoss,
    ReverseKLLoss,
)

__all__ = ["linear_kl_div", "kl_div_inplace", "set_fused", "fused", "fused_enabled",
           "FUSED_MIN_ELEMENTS", "release_grad_buffers", "KLDivLoss", "ReverseKLLoss",
           "JSDivLoss", "LinearKLDivLoss"]
