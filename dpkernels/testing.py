"""Test utilities shared by the tests and the benchmarks: tolerance checks and one DP step.

Tolerances follow the dtype of the computation under test (relative to the float64 reference):
float64 1e-10, float32 1e-5.  Low precision is bounded by plain PyTorch's own error in that dtype.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from . import reference
from .engine import PrivacyEngine

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def assert_rel_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 0.0, atol: float = 0.0) -> None:
    """Fail unless ||actual - expected|| <= rtol(dtype) * (||expected|| + scale) + atol; NaN never passes.

    ``scale`` is the norm of a larger whole the tensor belongs to (e.g. the update of every
    parameter, or the terms of a sum that cancels): a parameter whose exact gradient is zero (a key
    bias under softmax) is then held to rounding noise at the whole's scale rather than to a
    relative error of 0/0.  ``atol`` covers the float64 oracle's own rounding where the exact value is 0.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    rtol = RTOL[dtype]
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert not torch.isnan(actual).any(), f"{name}: NaN in result"
    err = (actual - expected).norm().item()
    bound = rtol * (expected.norm().item() + float(scale)) + atol
    assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} = {rtol:g} * (||ref|| {expected.norm().item():.3g} + scale {float(scale):.3g}) + {atol:g} ({dtype})"


ORACLE_ATOL = 1e-12  # the float64 oracle's own rounding where the exact gradient is zero


def check_against_oracle(view, module, inputs, G, coef, magnitude) -> None:
    """norm_sq (per parameter and summed) and clipped_grad(coef) of a layer's per-sample ``view`` match
    the float64 oracle ``reference.layer_per_sample_grads(module, inputs, G)``.

    ``magnitude`` m {name: [B, *shape]} holds the per-sample gradients with every summand made positive,
    so rounding is held to the size of the terms of a sum that cancels, not to the size of its result:
    sum_i c_i g_i to ||sum_i c_i m_i||, and ||g_i||^2, a sum of products of two such terms (as in the
    ghost trace), to ||m_i||^2.
    """
    ref = reference.layer_per_sample_grads(module, inputs, G)
    param = dict(module.named_parameters())
    norms, clipped = view.norm_sq(), view.clipped_grad(coef)
    assert set(norms) == set(clipped) == {param[n] for n in ref}
    total_sq = total_terms = torch.zeros(G.shape[0], dtype=torch.float64)
    for n, g in ref.items():
        sq, terms_sq = g.flatten(1).pow(2).sum(1), magnitude[n].flatten(1).pow(2).sum(1)
        assert norms[param[n]].dtype == clipped[param[n]].dtype == G.dtype
        assert_rel_close(f"{n} norm^2", norms[param[n]], sq, G.dtype, scale=terms_sq.norm(), atol=ORACLE_ATOL)
        expected, terms = (torch.einsum("b...,b->...", t, coef.double()) for t in (g, magnitude[n]))
        assert_rel_close(f"clipped {n}", clipped[param[n]], expected, G.dtype, scale=terms.norm(), atol=ORACLE_ATOL)
        total_sq, total_terms = total_sq + sq, total_terms + terms_sq
    summed = sum(norms.values())
    assert_rel_close("norm^2 summed over parameters", summed, total_sq, G.dtype, scale=total_terms.norm(), atol=ORACLE_ATOL)


def total_norm(tensors) -> float:
    """Norm of the concatenation of ``tensors`` (float64)."""
    return float(sum(t.double().pow(2).sum().item() for t in tensors) ** 0.5)


def assert_no_worse_than_torch(name: str, actual, torch_result, expected, k: float = 2.0, atol: float = 1e-6) -> None:
    """Low-precision rule: max error <= k * (plain PyTorch's max error in the same dtype) + atol."""
    err = (actual.double() - expected.double()).abs().max().item()
    base = (torch_result.double() - expected.double()).abs().max().item()
    assert err <= k * base + atol, f"{name}: error {err:.3g} > {k} * torch's {base:.3g} + {atol:g}"


# ---- one DP step through the public API, and its float64 oracle ----------------------------------


@dataclass
class Case:
    """A model, a batch maker and its loss: logits_of(output) feeds ``criterion(reduction=...)``."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int], Tuple[torch.Tensor, ...]]  # B -> (*inputs, target)
    criterion: type = nn.CrossEntropyLoss
    logits_of: Callable[[torch.Tensor], torch.Tensor] = lambda out: out


def sample_loss_fn(case: Case, reduction: str):
    """Loss of ONE sample (a batch of one), folded over extra dims like dpkernels' criterion wrapper."""

    def sample_loss(model, *sample):
        *xs, y = sample
        loss = case.criterion(reduction="none")(case.logits_of(model(*xs)), y).reshape(1, -1)
        return loss.mean() if reduction == "mean" else loss.sum()

    return sample_loss


def make_private(model, batch, case: Case, mode: str, max_grad_norm: float, reduction: str, noise=0.0, optimizer=None, **kwargs):
    """dpkernels.PrivacyEngine.make_private on ``optimizer`` (default SGD(lr=1)) and a one-batch loader."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0) if optimizer is None else optimizer
    loader = DataLoader(TensorDataset(*batch), batch_size=batch[0].shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine()
    return engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        criterion=case.criterion(reduction=reduction),
        noise_multiplier=noise,
        max_grad_norm=max_grad_norm,
        grad_sample_mode=mode,
        poisson_sampling=False,
        loss_reduction=reduction,
        **kwargs,
    )


def dp_update(model, batch, case: Case, mode: str, max_grad_norm: float, reduction: str):
    """Run one DP step (noise 0, SGD lr=1) on a copy of ``model``; return {name: old - new}."""
    model = copy.deepcopy(model)
    dp_model, optimizer, criterion, _ = make_private(model, batch, case, mode, max_grad_norm, reduction)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    *xs, y = batch
    loss = criterion(case.logits_of(dp_model(*xs)), y)
    loss.backward()
    optimizer.step()
    return {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}


def oracle_update(model, batch, case: Case, reduction: str, quantile: float = 0.5):
    """float64 oracle: (clip norm C at the ``quantile`` of per-sample norms, expected update, norms)."""
    grads = reference.per_sample_grads(model, sample_loss_fn(case, reduction), batch)
    norms = reference.flat_norms(grads)
    C = norms.quantile(quantile).item()
    scale = batch[0].shape[0] if reduction == "mean" else 1
    expected = {n: g / scale for n, g in reference.clipped_sum(grads, C).items()}
    return C, expected, norms
