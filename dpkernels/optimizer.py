"""Opacus's fast-gradient-clipping optimizers with batched per-parameter loops and no gradient copy.

DPOptimizer's behaviour is Opacus's to the bit (the noise of ``_generate_noise`` per parameter, in the
same order, so ``secure_mode`` and ``generator`` are honoured; the same sums and scaling):

  DPOptimizer     ``DPOptimizerFastGradientClipping``: the noise addition and the division by the
                  expected batch size are one multi-tensor (``torch._foreach_*``) operation each
                  instead of one per parameter (the launches otherwise dominate a short step of a
                  model of many small parameters)
  FSDPOptimizer   ``FSDPOptimizerFastGradientClipping`` (FSDP2), but each rank draws only its own
                  shards' noise, from its own generator stream (see ``rank_generator``)

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

from typing import Optional

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping, FSDPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed
from torch.distributed.tensor import DTensor, Shard


class UnclippedParameterError(ValueError):
    """The optimizer would step a parameter whose per-sample gradients the model did not clip."""

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


def gaussian_noise(std: float, reference: torch.Tensor, generator, secure_mode: bool) -> torch.Tensor:
    """N(0, std^2) of ``reference``'s shape, dtype and device: Opacus's ``_generate_noise``, bit for bit.

    Outside secure mode Opacus draws one ``torch.normal`` per parameter after allocating a zero tensor
    it then drops; this draws the same ``torch.normal`` (same generator, same call: the same numbers)
    without the zeros, a fill kernel and an allocation per parameter less.  Secure mode and std = 0
    are Opacus's own function."""
    if secure_mode or std == 0:
        return _generate_noise(std=std, reference=reference, generator=generator, secure_mode=secure_mode)
    return torch.normal(mean=0, std=std, size=reference.shape, device=reference.device, generator=generator, dtype=reference.dtype)


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

    def pre_step(self, closure=None):
        require_gradients(self)
        return super().pre_step(closure)

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
        noise = [gaussian_noise(std, s, self.generator, self.secure_mode) for s in summed]
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


MASK64 = 2**64 - 1


def splitmix64(x: int) -> int:
    """SplitMix64's output function: a bijection of the 64-bit integers whose outputs for nearby
    inputs look independent (used to turn generator states into seeds)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def draw_seed(generator: torch.Generator) -> int:
    """A 64-bit integer drawn from ``generator``, which moves on: equal on ranks whose generators are in
    equal states, and without a host synchronisation.

    A Philox generator (CUDA) keeps its whole state, (seed, offset), on the host: the draw is a hash of
    that state, and the offset advances by one Philox block (4).  Other generators (CPU's Mersenne
    twister) draw an integer; on a device without host-side state that costs one synchronisation.
    """
    try:
        offset = generator.get_offset()
    except RuntimeError:  # not a Philox generator
        return int(torch.randint(2**63 - 1, (), generator=generator, device=generator.device))
    generator.set_offset(offset + 4)
    return splitmix64(generator.initial_seed() ^ splitmix64(offset))


def rank_generator(generator: Optional[torch.Generator], device: torch.device, rank: int) -> torch.Generator:
    """This rank's noise generator for one step: seeded with (h + rank) mod 2^64, h = splitmix64 of a
    draw from ``generator`` (the device's default generator if None, as Opacus's noise uses).

    Why the shards' noise is independent: on ranks whose generators are in one state (a user's seeded
    generator, or ``torch.manual_seed`` everywhere) h is equal, so the ranks' seeds are distinct, also
    in their low 32 bits (the CPU generator keeps only those); on ranks whose generators differ, h
    differs.  Distinct seeds key distinct Philox streams (CUDA) or Mersenne twister states (CPU), which
    are independent by those generators' design.  Each step draws a new h: two (step, rank) pairs share
    a seed only if two draws differ by less than the world size (probability < 2 W / 2^64 per pair of
    steps).  A seeded run is reproducible: the seeds are a function of the user's generator's states.
    """
    if generator is None:
        generator = torch.default_generator if device.type == "cpu" else torch.get_device_module(device).default_generators[device.index]
    seed = (splitmix64(draw_seed(generator)) + rank) & MASK64
    return torch.Generator(device).manual_seed(seed)


def local_shard(grad: torch.Tensor) -> torch.Tensor:
    """The rank's own part of an FSDP2 gradient (a DTensor sharded on every mesh dimension), as a
    plain tensor sharing its storage; anything else (replicated, as in HSDP, or not a DTensor) would
    need the same noise on several ranks and is refused."""
    if not isinstance(grad, DTensor) or not all(isinstance(pl, Shard) for pl in grad.placements):
        what = f"placements {tuple(grad.placements)}" if isinstance(grad, DTensor) else "a plain tensor"
        raise ValueError(
            f"FSDPOptimizer: a gradient of shape {tuple(grad.shape)} is {what}; every parameter must be an "
            "FSDP2 shard (fully_shard on a 1-D mesh, a DTensor with Shard placements): each rank noises "
            "only its own shard"
        )
    return grad.to_local()


class FSDPOptimizer(FSDPOptimizerFastGradientClipping):
    """``FSDPOptimizerFastGradientClipping`` where each rank draws the noise of its own shards only, on
    plain local tensors, and keeps no copy of the gradient shards.

    Opacus draws noise of every parameter's full shape on every rank and keeps its shard: W times the
    noise (and a full-shape zeros, division and addition per parameter) that one step needs, a cost per
    rank that sharding does not divide.  Here rank r adds N(0, s^2) to its shard only, from its own
    generator (``rank_generator``), with s = sigma C / W under mean reduction (the gradient is the mean
    over ranks of per-rank sums, later divided by the per-rank expected batch) and sigma C under sum:
    every coordinate is noised once, by the rank that owns it.  ``secure_mode`` draws from the engine's
    secure generator (Opacus's 4-sample construction), each rank from its own secure source.
    """

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

    @torch.no_grad()  # DTensor.to_local is then the local tensor itself, not an autograd function call
    def add_noise(self) -> None:
        """p.grad = the sum (shard) + this rank's noise, added in place; the sums are released."""
        sigma = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        std = sigma * self.max_grad_norm / (self.world_size if self.loss_reduction == "mean" else 1)
        summed = [self.grad_state[p]["summed_grad"] for p in self.params]
        shards = [local_shard(s) for s in summed]
        if self.secure_mode and self.generator is None:
            raise ValueError(
                "FSDPOptimizer: secure_mode needs a secure generator on each rank (PrivacyEngine(secure_mode=True) "
                "passes its own); the default generator may be seeded alike on every rank"
            )
        if std != 0 and shards:
            generator = self.generator if self.secure_mode else rank_generator(self.generator, shards[0].device, self.rank)
            for x in shards:  # one shard's noise at a time: a shard-sized temporary, not the model's
                if self.secure_mode:
                    x.add_(_generate_noise(std=std, reference=x, generator=generator, secure_mode=True))
                else:
                    x.add_(torch.empty_like(x).normal_(0, std, generator=generator))
        for p, s in zip(self.params, summed):
            p.grad = s
            self.grad_state[p]["summed_grad"] = None

    @torch.no_grad()
    def scale_grad(self) -> None:
        """Divide the shards by the expected batch size (times accumulated iterations) under mean reduction."""
        shards = [local_shard(p.grad) for p in self.params]
        if self.loss_reduction == "mean" and shards:
            torch._foreach_div_(shards, self.expected_batch_size * self.accumulated_iterations)
