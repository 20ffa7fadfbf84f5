"""Opacus's fast-gradient-clipping optimizers with their per-parameter loops batched and without
the copy of every gradient at each step.

Behaviour is Opacus's to the bit (same noise from ``_generate_noise`` per parameter, in the same
order, so ``secure_mode`` and ``generator`` are honoured; the same sums and scaling):

  DPOptimizer     ``DPOptimizerFastGradientClipping``: the noise addition and the division by the
                  expected batch size are one multi-tensor (``torch._foreach_*``) operation each
                  instead of one per parameter (the launches otherwise dominate a short step of a
                  model of many small parameters)
  FSDPOptimizer   ``FSDPOptimizerFastGradientClipping`` (FSDP2: each rank noises its own shards)

Opacus copies every gradient into ``summed_grad`` at each step and keeps the copy until
``zero_grad``: one gradient-sized buffer more at the optimizer step (14 GiB per GPU for Llama-3-8B on
2 GPUs).  Here, on a step that is taken (not a BatchMemoryManager step skipped to accumulate), the
first accumulation refers to ``p.grad`` itself, and the sum is released once the noisy gradient has
replaced it.  Skipped steps still accumulate into a copy, as Opacus does.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping, FSDPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

from .errors import CriterionError


def require_gradients(optimizer) -> None:
    """Before a step: every trainable parameter has a gradient (a criterion backward always leaves
    one, zero where the loss does not depend on it); otherwise say how a gradient gets there."""
    missing = sum(p.grad is None for p in optimizer.params)
    if missing:
        raise CriterionError(
            f"optimizer.step(): {missing} of {len(optimizer.params)} trainable parameters have no gradient. "
            "Before each step call backward() on a loss from the criterion that make_private returned "
            "(model, optimizer, criterion, data_loader = engine.make_private(..., criterion=...); "
            "criterion(output, target).backward()), not on a plain loss."
        )


def first_sum(optimizer, grad: torch.Tensor) -> torch.Tensor:
    """What a step's first accumulation stores: ``grad`` itself when the step will be taken (the
    noisy gradient replaces it at once), else a copy (``zero_grad`` may zero ``grad`` in place)."""
    return grad if not optimizer._check_skip_next_step(pop_next=False) else grad.detach().clone()


class DPOptimizer(DPOptimizerFastGradientClipping):
    """``DPOptimizerFastGradientClipping`` (noise, scaling, accountant hook) with batched loops."""

    def pre_step(self, closure=None):
        require_gradients(self)
        return super().pre_step(closure)

    def accumulate(self) -> None:
        """p.summed_grad += p.grad (``first_sum`` of p.grad on the first micro-batch of a step)."""
        grown = [p for p in self.params if p.summed_grad is not None]
        if grown:
            torch._foreach_add_([p.summed_grad for p in grown], [p.grad for p in grown])
        for p in self.params:
            if p.summed_grad is None:
                p.summed_grad = first_sum(self, p.grad)

    def add_noise(self) -> None:
        """p.grad = p.summed_grad + N(0, (sigma C)^2), noise drawn per parameter by Opacus; the sum is
        released (the step is taken, so ``zero_grad`` would drop it anyway)."""
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
            p.summed_grad = None

    def scale_grad(self) -> None:
        """Divide by the expected batch size (times accumulated iterations) under mean reduction."""
        grads = [p.grad for p in self.params]
        if self.loss_reduction == "mean" and grads:
            torch._foreach_div_(grads, self.expected_batch_size * self.accumulated_iterations)


class FSDPOptimizer(FSDPOptimizerFastGradientClipping):
    """``FSDPOptimizerFastGradientClipping`` without the copy of every gradient shard at each step."""

    def pre_step(self, closure=None):
        require_gradients(self)
        return super().pre_step(closure)

    def accumulate(self) -> None:
        for p in self.params:
            state = self.grad_state[p]
            if state["summed_grad"] is None:
                state["summed_grad"] = first_sum(self, p.grad)
            else:
                state["summed_grad"].add_(p.grad.data)

    def add_noise(self) -> None:
        """Opacus's noise, then the sums are released (the noisy gradients have replaced them)."""
        super().add_noise()
        for p in self.params:
            self.grad_state[p]["summed_grad"] = None
