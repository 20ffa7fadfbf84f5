"""Ghost clipping: two backward passes.

Pass 1 (hooks on) computes every per-sample norm, and its parameter gradients are discarded;
pass 2 (hooks off) backpropagates sum_i c_i loss_i, which adds sum_i c_i g_i to every p.grad.
"""

from __future__ import annotations

import torch

from .loss import quiet_backward, reduce_loss, restore_grads, stash_grads
from .single import single_sample_backward


def check_batch(coef: torch.Tensor, loss_per_sample: torch.Tensor) -> None:
    if coef.shape[0] != loss_per_sample.shape[0]:
        raise ValueError(
            f"the layers saw a batch of {coef.shape[0]} samples but the criterion returned "
            f"{loss_per_sample.shape[0]} losses; check batch_first and that the criterion gives one loss per sample "
            "(flat [B*T, V] logits need shape=(B, T, V), or pass the [B, T, V] logits as they are)"
        )


def norms_pass(module, loss_per_sample: torch.Tensor, loss_reduction: str, retain_graph: bool, check_finite: bool = True) -> torch.Tensor:
    """Backward with hooks on; returns c [B].  p.grad is left exactly as before, also on error.
    check_finite=False: the caller checks the norms (``module.check_norms_finite``) before changing p.grad."""
    params = module.trainable_parameters
    saved = stash_grads(params)
    try:
        quiet_backward(reduce_loss(loss_per_sample, loss_reduction), retain_graph=retain_graph)
        coef = module.get_clipping_coef(check_finite=check_finite)
        check_batch(coef, loss_per_sample)
    except BaseException:
        module.clear_step_state()
        raise
    finally:
        restore_grads(params, saved)
    return coef


def ghost_backward(module, loss_per_sample: torch.Tensor, loss_reduction: str) -> None:
    if module.single_sample_step:
        return single_sample_backward(module, loss_per_sample, loss_reduction)
    coef = norms_pass(module, loss_per_sample, loss_reduction, retain_graph=True)
    module.clear_step_state()
    module.disable_hooks()
    try:
        quiet_backward((coef.to(loss_per_sample.dtype) * loss_per_sample).sum())
    finally:
        module.enable_hooks()
    module.fill_missing_grads()
