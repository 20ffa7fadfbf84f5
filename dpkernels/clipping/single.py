"""One sample in the batch: its per-sample gradient IS the ordinary gradient.

So every mode takes the same shortcut: one ordinary backward pass (no caching, no norm
kernels), one global norm ||g|| over the gradients, and p.grad += c * g with
c = min(1, C / (||g|| + 1e-6)).  The overhead over non-private training is that one norm.
"""

from __future__ import annotations

import torch

from ..errors import LayerInputError, NonFiniteNormError
from ..kernels.formulas import accumulation_dtype
from .coefficients import clip_coefficients
from .loss import quiet_backward, reduce_loss, restore_grads, stash_grads


def global_norm(grads) -> torch.Tensor:
    """||g|| over all gradients, accumulated in float32 (float64 for float64 gradients); 0 if none."""
    if not grads:
        return torch.zeros(())
    dt = accumulation_dtype(*grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=dt) for g in grads]))


def single_sample_backward(module, loss_per_sample: torch.Tensor, loss_reduction: str) -> None:
    if module._inputs or loss_per_sample.shape[0] != 1:
        module.clear_step_state()
        raise LayerInputError(
            "some layers saw one sample and others more: every trainable layer must be called on inputs "
            "whose first dimension is the batch"
        )
    params = module.trainable_parameters
    saved = stash_grads(params)
    try:
        quiet_backward(reduce_loss(loss_per_sample, loss_reduction))
        norm = global_norm([p.grad for p in params if p.grad is not None])
        if not bool(torch.isfinite(norm)):
            raise NonFiniteNormError(
                "the gradient norm of the single sample [0] is NaN or Inf; the step was refused and "
                "gradients were left untouched"
            )
    except BaseException:
        restore_grads(params, saved)
        module.clear_step_state()
        raise
    coef = clip_coefficients(norm.reshape(1), module.max_grad_norm)
    module.per_sample_gradient_norms = norm.reshape(1)
    for p, old in zip(params, saved):
        if p.grad is None:
            p.grad = old
            continue
        p.grad.mul_(coef.to(p.grad.dtype))
        if old is not None:
            p.grad.add_(old)
    module.clear_step_state()
    module.fill_missing_grads()
