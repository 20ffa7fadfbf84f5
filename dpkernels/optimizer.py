"""Opacus's fast-gradient-clipping optimizer with its per-parameter loops batched.

Behaviour is Opacus's ``DPOptimizerFastGradientClipping`` to the bit (same noise from
``_generate_noise`` per parameter, in the same order, so ``secure_mode`` and ``generator`` are
honoured; the same sums and scaling), but the accumulation is one clone per parameter instead of a
deepcopy, and the noise addition and the division by the expected batch size are one multi-tensor
(``torch._foreach_*``) operation each instead of one per parameter.  That matters for models of
many small parameters, where the optimizer's launches otherwise dominate a short step.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed


class DPOptimizer(DPOptimizerFastGradientClipping):
    """``DPOptimizerFastGradientClipping`` (noise, scaling, accountant hook) with batched loops."""

    def accumulate(self) -> None:
        """p.summed_grad += p.grad (a copy of p.grad on the first micro-batch of a step)."""
        grown = [p for p in self.params if p.summed_grad is not None]
        if grown:
            torch._foreach_add_([p.summed_grad for p in grown], [p.grad for p in grown])
        for p in self.params:
            if p.summed_grad is None:
                p.summed_grad = p.grad.detach().clone()

    def add_noise(self) -> None:
        """p.grad = p.summed_grad + N(0, (sigma C)^2), noise drawn per parameter by Opacus."""
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        summed = [p.summed_grad for p in self.params]
        for s in summed:
            _check_processed_flag(s)
        noise = [_generate_noise(std=std, reference=s, generator=self.generator, secure_mode=self.secure_mode) for s in summed]
        if noise:
            torch._foreach_add_(noise, summed)
        for p, noisy, s in zip(self.params, noise, summed):
            p.grad = noisy.view_as(p)
            _mark_as_processed(s)

    def scale_grad(self) -> None:
        """Divide by the expected batch size (times accumulated iterations) under mean reduction."""
        grads = [p.grad for p in self.params]
        if self.loss_reduction == "mean" and grads:
            torch._foreach_div_(grads, self.expected_batch_size * self.accumulated_iterations)
