"""The criterion wrapper: per-sample losses whose ``backward()`` runs the mode's clipping.

A training step stays ``loss = criterion(model(x), y); loss.backward(); optimizer.step()``.

Layouts of a class-index criterion (``CrossEntropyLoss``, ``NLLLoss``; see ``LAYOUTS``):

    logits [B, C]       targets [B]                      one label per sample
    logits [B, T, V]    targets [B, T]                   classes last (what language models return)
    logits [B*T, V]     targets [B*T], shape=(B, T, V)   Opacus's flat form
    logits [B, V, T]    targets [B, T]                   classes second (PyTorch's [B, C, d1, ...])

Each runs the wrapped criterion ONCE on contiguous rows, logits [N, V] and targets [N] (N = B*T):
the class dimension is never strided (a cross-entropy over a strided class dimension is 13-30x
slower).  The per-token losses l [B, T] are then reduced per sample:

    "mean"  L_i = sum_t l_it / n_i,  n_i = #{t : y_it != ignore_index}  (L_i = 0 when n_i = 0)
    "sum"   L_i = sum_t l_it

so a sample's loss is what the criterion returns on that sample alone (Opacus 1.6's rule for
``shape=``; with class ``weight`` the per-token losses are weighted and n_i still counts tokens).
Any other criterion (``MSELoss``, ...) is called as given with reduction="none" and its result
[B, ...] averaged ("mean") or summed ("sum") per sample.  ``PrivateLoss`` holds the [B] losses.

A plain loss instead of a ``PrivateLoss``: once a criterion is wrapped for a model, ``guard_outputs``
puts a tensor hook on the model's outputs that refuses any backward pass not started by
``PrivateLoss.backward()``.  The hook fires before any parameter's gradient is formed, so p.grad is
left exactly as it was (micro-batches accumulated before are kept).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from functools import partial
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..errors import CriterionError

LAYOUTS = (
    "accepted layouts (class-index targets): logits [B, C] with targets [B]; "
    "logits [B, T, V] with targets [B, T] (classes last); "
    "flat logits [B*T, V] with targets [B*T] and shape=(B, T, V) (Opacus's form); "
    "logits [B, V, T] with targets [B, T] (classes second; also [B, C, d1, ...] with targets [B, d1, ...]); "
    "probability targets: the logits' shape, [B, C] or flat with shape=(B, T, V)"
)

PLAIN_LOSS = (
    "backward() reached the model's output through a loss that is not the returned criterion's: "
    "use the criterion that make_private returned (model, optimizer, criterion, data_loader = "
    "engine.make_private(..., criterion=...)) and call criterion(output, target).backward(). "
    "Nothing was added to p.grad by this backward pass (micro-batches accumulated before are kept)."
)


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


# ---- the guard against a plain loss -------------------------------------------------------------------


def _refuse_plain_backward(module, grad: torch.Tensor) -> None:
    if not module.__dict__.get("_in_private_backward", False):
        module.clear_step_state()
        raise CriterionError(PLAIN_LOSS)


def guard_outputs(module, output) -> None:
    """Hook every floating output of ``module``'s forward that requires a gradient, so that a backward
    pass reaching it outside ``PrivateLoss.backward()`` raises ``CriterionError`` (``PLAIN_LOSS``).

    Armed once a ``DPCriterion`` wraps a criterion for ``module`` (``make_private`` does), in a
    training forward with the hooks on and gradients enabled.  ``module``: a ``DPClippingModule``.
    """
    armed = module.__dict__.get("_criterion_bound", False)
    if not (armed and module.hooks_enabled and module._module.training and torch.is_grad_enabled()):
        return
    for t in tree_leaves(output):
        if torch.is_tensor(t) and t.is_floating_point() and t.requires_grad:
            t.register_hook(partial(_refuse_plain_backward, module))


@contextmanager
def private_backward(module):
    """The block in which backward passes through ``module``'s outputs are the criterion's own."""
    object.__setattr__(module, "_in_private_backward", True)
    try:
        yield
    finally:
        object.__setattr__(module, "_in_private_backward", False)


# ---- the returned loss ----------------------------------------------------------------------------------


class PrivateLoss:
    """Per-sample losses [B] of one batch; ``backward()`` leaves sum_i c_i g_i added to every p.grad.

    For logging it behaves like the reduced loss (mean or sum over the batch, as the criterion's
    reduction says): ``float(loss)``, ``loss.item()``, ``loss.detach()``, ``f"{loss:.3f}"``,
    comparisons with numbers or tensors; arithmetic with numbers or other losses keeps it a PrivateLoss.
    """

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

    # ---- the reduced value, for logging
    def detach(self) -> torch.Tensor:
        return reduce_loss(self.loss_per_sample, self.loss_reduction).detach()

    def item(self) -> float:
        return self.detach().item()

    def __float__(self) -> float:
        return self.item()

    def __format__(self, spec: str) -> str:
        return format(self.item(), spec) if spec else str(self)

    def __str__(self) -> str:
        return f"PrivateLoss({self.item():.4f})"

    def __repr__(self):
        return f"PrivateLoss(reduction={self.loss_reduction}, batch={self.loss_per_sample.shape[0]})"

    def _compare(self, other, op):
        return op(self.detach(), other.detach() if isinstance(other, PrivateLoss) else other)

    def __lt__(self, other):
        return self._compare(other, torch.Tensor.__lt__)

    def __le__(self, other):
        return self._compare(other, torch.Tensor.__le__)

    def __gt__(self, other):
        return self._compare(other, torch.Tensor.__gt__)

    def __ge__(self, other):
        return self._compare(other, torch.Tensor.__ge__)

    def __eq__(self, other):
        return self._compare(other, torch.Tensor.__eq__)

    def __ne__(self, other):
        return self._compare(other, torch.Tensor.__ne__)

    __hash__ = object.__hash__

    def backward(self) -> None:
        with private_backward(self.module):
            self.clipped_backward(self.module, self.loss_per_sample, self.loss_reduction)


# ---- per-sample losses ----------------------------------------------------------------------------------


def input_and_target(args, kwargs) -> Tuple[torch.Tensor, torch.Tensor, dict]:
    """(input, target, other keyword arguments) of ``criterion(input, target)`` in any call form."""
    args, kwargs = list(args), dict(kwargs)
    found = []
    for name in ("input", "target"):
        if args:
            found.append(args.pop(0))
        elif name in kwargs:
            found.append(kwargs.pop(name))
        else:
            raise CriterionError(f"the criterion was called without its {name!r}; call criterion(logits, target)")
    if args:
        raise CriterionError(f"the criterion takes (input, target) and keywords; got {len(args)} more positional arguments")
    return found[0], found[1], kwargs


def layout_error(what: str, logits: torch.Tensor, target: torch.Tensor, shape) -> CriterionError:
    given = f"logits {list(logits.shape)}, targets {list(target.shape)} ({target.dtype})"
    if shape is not None:
        given += f", shape={tuple(shape)}"
    return CriterionError(f"{what}: got {given}. {LAYOUTS}")


def class_rows(logits: torch.Tensor, target: torch.Tensor, shape: Optional[Sequence[int]]):
    """(logits [N, V] contiguous, targets [N] (or [N, V] probabilities), B) for a class-index criterion.

    Checks the layout against ``LAYOUTS``; a classes-second layout is moved to classes last (one copy)."""
    soft = target.is_floating_point()
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2:
            raise layout_error("shape= must be the logits' shape before flattening, (B, T, V)", logits, target, shape)
        B, V, N = shape[0], shape[-1], math.prod(shape[:-1])
        flat = logits.dim() == 2 and tuple(logits.shape) == (N, V)
        if not (flat or tuple(logits.shape) == shape):
            raise layout_error(f"shape={shape} does not match the logits (expected [{N}, {V}] or {list(shape)})", logits, target, shape)
        wanted = tuple(logits.shape) if soft else tuple(logits.shape[:-1])
        if tuple(target.shape) != wanted:
            raise layout_error(f"targets do not match the logits (expected {list(wanted)})", logits, target, shape)
        return rows(logits, target, V, classes_second=False), B
    if logits.dim() < 2 or target.dim() < 1 or target.shape[0] != logits.shape[0]:
        raise layout_error("no batch dimension shared by logits and targets", logits, target, shape)
    if soft:
        if target.shape != logits.shape:
            raise layout_error("probability targets must have the logits' shape", logits, target, shape)
        if logits.dim() > 2:
            raise layout_error("probability targets over more than [B, C] are ambiguous (which dimension holds the classes?); "
                               "flatten to [B*T, V] and pass shape=(B, T, V)", logits, target, shape)
        return rows(logits, target, logits.shape[1], classes_second=False), logits.shape[0]
    if target.dim() != logits.dim() - 1:
        raise layout_error("targets must have one dimension fewer than the logits", logits, target, shape)
    if logits.dim() == 2:
        return rows(logits, target, logits.shape[1], classes_second=False), logits.shape[0]
    second = logits.shape[2:] == target.shape[1:]
    last = logits.shape[1:-1] == target.shape[1:]
    if second and last:
        raise layout_error("ambiguous: the classes could be the second or the last dimension (equal sizes); "
                           "flatten to [B*T, V] and pass shape=(B, T, V), or pass shape=logits.shape for classes last",
                           logits, target, shape)
    if not (second or last):
        raise layout_error("targets match neither classes-last nor classes-second logits", logits, target, shape)
    V = logits.shape[1] if second else logits.shape[-1]
    return rows(logits, target, V, classes_second=second), logits.shape[0]


def rows(logits: torch.Tensor, target: torch.Tensor, V: int, classes_second: bool):
    """logits as contiguous [N, V] rows and targets as [N] (or [N, V])."""
    if classes_second:
        logits = logits.movedim(1, -1)
    flat_logits = logits.reshape(-1, V).contiguous()
    flat_target = target.reshape(-1, V) if target.is_floating_point() else target.reshape(-1)
    return flat_logits, flat_target


def per_sample(tokens: torch.Tensor, B: int, loss_reduction: str, counted: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token losses [N] (N = B*n) -> [B]: sum, or sum / counted tokens (all n if ``counted`` is None)."""
    n = tokens.numel() // B if B else 1
    tokens = tokens.reshape(B, n)
    if loss_reduction == "sum":
        return tokens.sum(1)
    if counted is None:
        return tokens.mean(1)
    count = counted.reshape(B, n).sum(1).clamp(min=1)
    return tokens.sum(1) / count.to(tokens.dtype)


def with_reduction_none(criterion: nn.Module, *args, **kwargs) -> torch.Tensor:
    """criterion(*args, **kwargs) with reduction "none"; the criterion's reduction is restored even if it raises."""
    old = criterion.reduction
    criterion.reduction = "none"
    try:
        return criterion(*args, **kwargs)
    finally:
        criterion.reduction = old


def per_sample_loss(criterion: nn.Module, loss_reduction: str, args, kwargs, shape=None) -> torch.Tensor:
    """One loss per sample [B] from ``criterion(*args, **kwargs)`` (module doc: layouts and reduction)."""
    if isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss)):
        logits, target, rest = input_and_target(args, kwargs)
        (flat_logits, flat_target), B = class_rows(logits, target, shape)
        tokens = with_reduction_none(criterion, flat_logits, flat_target, **rest)
        counted = None if flat_target.is_floating_point() else flat_target != criterion.ignore_index
        return per_sample(tokens, B, loss_reduction, counted)
    loss = with_reduction_none(criterion, *args, **kwargs)
    if loss.dim() == 0:
        raise CriterionError(
            f"{type(criterion).__name__} returned a scalar with reduction='none'; a DP criterion must "
            "return one loss per sample (first dimension = batch)"
        )
    B = loss.shape[0]
    if shape is not None:
        B = int(shape[0])
        if loss.shape[0] not in (B, B * int(shape[1])):
            raise CriterionError(
                f"{type(criterion).__name__} returned losses of shape {list(loss.shape)}: neither {B} samples "
                f"nor {B}*{int(shape[1])} tokens of shape={tuple(shape)}"
            )
    return per_sample(loss, B, loss_reduction)


class DPCriterion:
    """Wraps a criterion: ``DPCriterion(...)(output, target, shape=None) -> PrivateLoss``.

    Call forms: ``criterion(logits, target)``, ``criterion(input=..., target=...)`` and Opacus's
    ``criterion(flat_logits, flat_target, shape=(B, T, V))``; layouts in the module doc.
    """

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
        object.__setattr__(module, "_criterion_bound", True)  # arms guard_outputs

    @property
    def reduction(self) -> str:
        return self.loss_reduction

    def __call__(self, *args, shape=None, **kwargs) -> PrivateLoss:
        loss = per_sample_loss(self.criterion, self.loss_reduction, args, kwargs, shape)
        return PrivateLoss(self.module, loss, self.loss_reduction, self.clipped_backward)
