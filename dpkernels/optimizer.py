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

The parameter set (DPOptimizer).  Opacus noises ``params``: every parameter of every param group
that requires a gradient now.  The wrapped optimizer steps every parameter that has a gradient.
The two can differ, and only parameters clipped by the wrapped model are private:
  frozen after make_private   requires_grad False, yet given a (zero) gradient: not noised by Opacus
                              but stepped by torch (momentum, weight decay, Adam's state move it);
                              here its gradient is dropped, so it is not stepped
  unfrozen after make_private, or a parameter outside the model (``add_param_group``): its per-sample
                              gradients were never clipped; the step is refused (UnclippedParameterError)
  ``add_param_group`` of a parameter the model clips: noised and scaled like every other
So every parameter that steps gets N(0, (sigma C)^2) and the reduction's division, in every group.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping, FSDPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed


class UnclippedParameterError(ValueError):
    """The optimizer would step a parameter whose per-sample gradients the model did not clip."""


def first_sum(optimizer, grad: torch.Tensor) -> torch.Tensor:
    """What a step's first accumulation stores: ``grad`` itself when the step will be taken (the
    noisy gradient replaces it at once), else a copy (``zero_grad`` may zero ``grad`` in place)."""
    return grad if not optimizer._check_skip_next_step(pop_next=False) else grad.detach().clone()


class DPOptimizer(DPOptimizerFastGradientClipping):
    """``DPOptimizerFastGradientClipping`` (noise, scaling, accountant hook) with batched loops, which
    steps only parameters whose per-sample gradients are clipped (see the module docstring)."""

    def __init__(self, optimizer, **kwargs):
        super().__init__(optimizer, **kwargs)
        # ids of the parameters whose per-sample gradients are clipped: those trainable now (when
        # make_private wraps the model); PrivacyEngine.make_private sets them from the model (clipped_by)
        self.clipped = {id(p) for p in self.params}
        self.names = {}  # id -> the parameter's name in the wrapped model, for error messages

    def clipped_by(self, module) -> None:
        """Take the clipped set from the wrapped model: its parameters trainable at make_private."""
        self.clipped = {id(p) for p in module.trainable_parameters}
        self.names = {id(p): n for n, p in getattr(module, "_module", module).named_parameters()}

    def check_parameter_set(self) -> None:
        """Drop the gradients of frozen parameters (so they are not stepped); refuse the step if a
        trainable parameter's per-sample gradients are not clipped."""
        unclipped = []
        for i, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                if not p.requires_grad:
                    p.grad = None
                elif id(p) not in self.clipped:
                    unclipped.append(f"{self.names.get(id(p), 'a parameter not in the model')} (param_groups[{i}]['params'][{j}])")
        if unclipped:
            raise UnclippedParameterError(
                f"the optimizer would step {', '.join(unclipped)}, whose per-sample gradients the model does not "
                "clip: frozen when make_private wrapped the model and unfrozen since, or not part of the model. "
                "The step was refused (stepping it would release an unclipped gradient). Set requires_grad "
                "before make_private (call it again after unfreezing), or freeze it."
            )

    def accumulate(self) -> None:
        """p.summed_grad += p.grad (``first_sum`` of p.grad on the first micro-batch of a step)."""
        self.check_parameter_set()
        params = self.params
        grown = [p for p in params if getattr(p, "summed_grad", None) is not None]
        if grown:
            torch._foreach_add_([p.summed_grad for p in grown], [p.grad for p in grown])
        for p in params:
            if getattr(p, "summed_grad", None) is None:
                p.summed_grad = first_sum(self, p.grad)

    def add_noise(self) -> None:
        """p.grad = p.summed_grad + N(0, (sigma C)^2), noise drawn per parameter by Opacus; the sum is
        released (the step is taken, so ``zero_grad`` would drop it anyway)."""
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        params = self.params
        summed = [p.summed_grad for p in params]
        for s in summed:
            _check_processed_flag(s)
        noise = [_generate_noise(std=std, reference=s, generator=self.generator, secure_mode=self.secure_mode) for s in summed]
        if noise:
            torch._foreach_add_(noise, summed)
        for p, noisy, s in zip(params, noise, summed):
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
