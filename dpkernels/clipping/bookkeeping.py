"""Bookkeeping: one backward pass.

The backward pass computes every per-sample norm and keeps each layer's per-sample view
(A and G for Linear, per-sample gradients for small layers); once every norm is known,
sum_i c_i g_i is formed per layer (one GEMM over all B*T rows for Linear) and added to p.grad.
Autograd's own (unclipped) parameter gradients from that pass are discarded.
"""

from __future__ import annotations

import torch

from .ghost import norms_pass
from .single import single_sample_backward


def bookkeeping_backward(module, loss_per_sample: torch.Tensor, loss_reduction: str) -> None:
    if module.single_sample_step:
        return single_sample_backward(module, loss_per_sample, loss_reduction)
    coef = norms_pass(module, loss_per_sample, loss_reduction, retain_graph=False, check_finite=False)
    try:
        module.add_clipped_grads(coef)
    finally:
        module.clear_step_state()
    module.fill_missing_grads()
