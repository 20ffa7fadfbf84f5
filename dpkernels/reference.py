"""The float64 per-sample oracle that tests and benchmarks compare against.

Everything here is deliberately slow and obvious: one autograd call per sample, in float64.
It shares no code with the implementation: the clip rule, its epsilon and every reduction are
stated here on their own (tests/test_oracle.py fails if this file imports dpkernels or opacus).

    per-sample gradient   g_i = d loss_i / d theta            (a loop over samples)
    clipping coefficient  c_i = min(1, C / (||g_i|| + 1e-6))    (Opacus's rule)
    clipped sum           sum_i c_i g_i
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, Sequence

import torch
from torch import nn

CLIP_EPS = 1e-6  # Opacus's epsilon in c_i, restated here (never imported from the implementation)


def clip_coefficients(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """c_i = min(1, C / (||g_i|| + 1e-6)), Opacus's flat clipping rule, in float64.  norms: [B] -> [B]."""
    ratio = max_grad_norm / (norms.double() + CLIP_EPS)
    return torch.minimum(ratio, torch.ones_like(ratio))


def float64_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in float64 (the original is left untouched)."""
    return copy.deepcopy(module).double()


def _to_float64(x):
    return x.double() if torch.is_tensor(x) and x.is_floating_point() else x


def per_sample_grads(
    module: nn.Module,
    sample_loss: Callable[..., torch.Tensor],
    batch: Sequence[torch.Tensor],
) -> Dict[str, torch.Tensor]:
    """Per-sample gradients of every trainable parameter, in float64, by a loop over samples.

    Args:
        module: the model (copied to float64; the original is not modified).
        sample_loss: ``sample_loss(model, *one_sample_batch) -> scalar`` the loss of ONE sample,
            called with each tensor of ``batch`` sliced to a batch of one (``t[i:i+1]``).
        batch: tensors whose first dimension is the batch dimension B.
    Returns:
        {parameter name: [B, *param.shape]} float64.
    """
    model = float64_copy(module)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    B = batch[0].shape[0]
    out = {n: torch.zeros((B,) + p.shape, dtype=torch.float64, device=p.device) for n, p in zip(names, params)}
    for i in range(B):
        sample = [_to_float64(t[i : i + 1]) for t in batch]
        loss = sample_loss(model, *sample)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                out[n][i] = g
    return out


def layer_per_sample_grads(module: nn.Module, inputs: Sequence[torch.Tensor], G: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-sample gradients of ONE layer given its input and its output gradient, in float64.

    The loss of sample i is <layer(x_i), G_i>, so its gradient is exactly what the layer's
    parameters receive from G_i in backpropagation.  inputs[0]: [B, ...], G: [B, ...] -> {name: [B, *shape]}.
    """

    def sample_loss(layer, *sample):
        *xs, g = sample
        return (layer(*xs) * g).sum()

    return per_sample_grads(module, sample_loss, [*inputs, G])


def flat_norms(grads: Dict[str, torch.Tensor]) -> torch.Tensor:
    """||g_i|| over all parameters.  {name: [B, ...]} -> [B]."""
    sq = [g.flatten(1).pow(2).sum(1) for g in grads.values()]
    return torch.stack(sq).sum(0).sqrt()


def clipped_sum(grads: Dict[str, torch.Tensor], max_grad_norm: float) -> Dict[str, torch.Tensor]:
    """sum_i c_i g_i for every parameter, with c_i from the global per-sample norm."""
    coef = clip_coefficients(flat_norms(grads), max_grad_norm)
    return {n: torch.einsum("b...,b->...", g, coef) for n, g in grads.items()}
