"""The criterion wrapper: per-sample losses whose ``backward()`` runs the mode's clipping.

A training step stays ``loss = criterion(model(x), y); loss.backward(); optimizer.step()``.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from ..errors import CriterionError


def reduce_loss(loss_per_sample: torch.Tensor, loss_reduction: str) -> torch.Tensor:
    """mean or sum over the batch; the mean of an empty batch is 0 (not NaN)."""
    total = loss_per_sample.sum()
    return total / max(loss_per_sample.shape[0], 1) if loss_reduction == "mean" else total


def quiet_backward(loss: torch.Tensor, retain_graph: bool = False) -> None:
    """loss.backward(), without PyTorch's warning that a first layer's full backward hook fires
    although its input needs no gradient (expected: the hook only needs the output gradient)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward(retain_graph=retain_graph)


def stash_grads(params) -> list:
    """Take every p.grad out (to be put back after a backward pass whose gradients are discarded)."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    return saved


def restore_grads(params, saved) -> None:
    for p, g in zip(params, saved):
        p.grad = g


class PrivateLoss:
    """Per-sample losses [B] of one batch; ``backward()`` leaves sum_i c_i g_i added to every p.grad."""

    def __init__(self, module, loss_per_sample: torch.Tensor, loss_reduction: str, clipped_backward: Callable):
        self.module = module
        self.loss_per_sample = loss_per_sample
        self.loss_reduction = loss_reduction
        self.clipped_backward = clipped_backward

    def _like(self, loss_per_sample: torch.Tensor) -> "PrivateLoss":
        return PrivateLoss(self.module, loss_per_sample, self.loss_reduction, self.clipped_backward)

    @staticmethod
    def _value(other):
        return other.loss_per_sample if isinstance(other, PrivateLoss) else other

    def __add__(self, other):
        return self._like(self.loss_per_sample + self._value(other))

    __radd__ = __add__

    def __sub__(self, other):
        return self._like(self.loss_per_sample - self._value(other))

    def __rsub__(self, other):
        return self._like(self._value(other) - self.loss_per_sample)

    def __mul__(self, other):
        return self._like(self.loss_per_sample * other)

    __rmul__ = __mul__

    def __truediv__(self, other):
        return self._like(self.loss_per_sample / other)

    def __neg__(self):
        return self._like(-self.loss_per_sample)

    def detach(self) -> torch.Tensor:
        return reduce_loss(self.loss_per_sample, self.loss_reduction).detach()

    def item(self) -> float:
        return self.detach().item()

    def __repr__(self):
        return f"PrivateLoss(reduction={self.loss_reduction}, batch={self.loss_per_sample.shape[0]})"

    def backward(self) -> None:
        self.clipped_backward(self.module, self.loss_per_sample, self.loss_reduction)


def per_sample_loss(criterion: nn.Module, loss_reduction: str, args, kwargs) -> torch.Tensor:
    """The criterion with reduction 'none', folded to one loss per sample [B].

    Extra dimensions (e.g. tokens, [B, T]) are averaged under "mean" and summed under "sum", so that
    reducing the result over the batch gives the criterion's own loss.  The criterion's
    ``reduction`` attribute is restored even if it raises.
    """
    old = criterion.reduction
    criterion.reduction = "none"
    try:
        loss = criterion(*args, **kwargs)
    finally:
        criterion.reduction = old
    if loss.dim() == 0:
        raise CriterionError(
            f"{type(criterion).__name__} returned a scalar with reduction='none'; a DP criterion must "
            "return one loss per sample (first dimension = batch)"
        )
    if loss.dim() > 1:
        flat = loss.flatten(1)
        loss = flat.mean(1) if loss_reduction == "mean" else flat.sum(1)
    return loss


class DPCriterion:
    """Wraps a criterion: ``DPCriterion(...)(output, target) -> PrivateLoss``."""

    def __init__(self, module, criterion: nn.Module, loss_reduction: str, clipped_backward: Callable):
        if not hasattr(criterion, "reduction"):
            raise CriterionError(
                f"criterion {type(criterion).__name__} has no `reduction` attribute; dpkernels needs a "
                "criterion that supports reduction='none' (one loss per sample), e.g. torch.nn.CrossEntropyLoss"
            )
        if criterion.reduction != loss_reduction:
            raise CriterionError(
                f"criterion reduction {criterion.reduction!r} differs from loss_reduction {loss_reduction!r}"
            )
        self.module = module
        self.criterion = criterion
        self.loss_reduction = loss_reduction
        self.clipped_backward = clipped_backward

    @property
    def reduction(self) -> str:
        return self.loss_reduction

    def __call__(self, *args, **kwargs) -> PrivateLoss:
        loss = per_sample_loss(self.criterion, self.loss_reduction, args, kwargs)
        return PrivateLoss(self.module, loss, self.loss_reduction, self.clipped_backward)
