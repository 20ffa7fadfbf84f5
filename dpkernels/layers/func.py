"""Per-sample gradients of any module by ``torch.func``: the rule for modules without a layer rule.

One call of a module ``unit`` (its inputs x, its output leaves y_j, their gradients G_j) gives sample
i's gradient of the chosen parameters P as the gradient of

    <unit(x_i), G_i> = sum_j <y_j(x_i), G_{j,i}>          x_i, G_{j,i}: sample i of each, a batch of one

which is exactly what P receives from sample i's loss through this call (the samples are independent).
It is ``grad`` of that inner product through ``functional_call``, vmapped over the samples (a loop
of single samples where the forward cannot be vmapped).  Each input and output leaf carries its own
batch dimension (``in_dims``, ``out_dims``: int, or None for a leaf shared by every sample).
Used for modules that own parameters without a rule (a ViT's embeddings, nn.MultiheadAttention's
packed projections, timm's VisionTransformer inside a wrapper), and, with the model's root as
``unit``, for layers called on a tensor without a batch dimension whose output cannot be made
per-sample (T5's relative attention bias).  Memory: [B, *shape] per parameter.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import LayerInputError
from .materialised import MaterialisedGrads


def _restore_batch(leaves, dims):
    """A sample's leaves (batch dimension removed) back to batches of one."""
    return [x.unsqueeze(d) if d is not None else x for x, d in zip(leaves, dims)]


class FuncSamples(MaterialisedGrads):
    """Per-sample gradients {name: [B, *shape]} of parameters ``names`` (dotted, relative to ``unit``)
    for one recorded call of ``unit``.

    leaves, spec: the call's (args, kwargs) flattened (tensors detached); outputs: the call's output
    leaves (detached tensors, for the check that samples run alone reproduce the batch);
    grads: the gradient of each output leaf, or None where none arrived.
    """

    def __init__(self, unit: nn.Module, names: List[str], leaves: list, spec, in_dims: list, outputs: list, out_dims: list, grads: list, label: str):
        used = [j for j, g in enumerate(grads) if g is not None]
        for j in used:
            if out_dims[j] is None:
                raise LayerInputError(
                    f"{label}: an output without a batch dimension receives a gradient, so its parameters "
                    "have no per-sample gradients here"
                )
        params = {n: unit.get_parameter(n).detach() for n in names}

        def inner_product(params, xs, gs):
            args, kwargs = tree_unflatten(_restore_batch(xs, in_dims), spec)
            out = tree_flatten(functional_call(unit, params, args, kwargs))[0]
            total = sum((out[j] * g.unsqueeze(out_dims[j]).to(out[j].dtype)).sum() for j, g in zip(used, gs))
            return total, [out[j].detach().squeeze(out_dims[j]) for j in used]

        per_sample = grad(inner_product, has_aux=True)
        gs = [grads[j] for j in used]
        g_dims = [out_dims[j] for j in used]
        B = gs[0].shape[g_dims[0]] if gs else 0
        try:  # torch.func.grad differentiates under an outer no_grad; no graph is built around it
            with torch.no_grad():
                result, alone = vmap(per_sample, in_dims=(None, in_dims, g_dims), out_dims=(0, g_dims))(params, leaves, gs)
        except Exception:  # data-dependent control flow and the like: one sample at a time
            with torch.no_grad():
                rows = [per_sample(params, [x.select(d, i) if d is not None else x for x, d in zip(leaves, in_dims)], [g.select(d, i) for g, d in zip(gs, g_dims)]) for i in range(B)]
            result = {n: torch.stack([r[0][n] for r in rows]) for n in names}
            alone = [torch.stack([r[1][k] for r in rows], g_dims[k]) for k in range(len(used))]
        check_samples_alone(label, [outputs[j] for j in used], alone)
        super().__init__(unit, {n: g.detach() for n, g in result.items()})  # no graph through other layers' parameters


def check_samples_alone(label: str, batch_outputs: list, alone: list) -> None:
    """The outputs of the samples run alone must be the batch's (up to the rounding of other kernel
    shapes): a forward that mixes samples (batch statistics) has no per-sample gradients."""
    for batch_out, out in zip(batch_outputs, alone):
        if batch_out is None:
            continue  # modified in place after the call: nothing to compare
        tolerance = 1e-2 if batch_out.dtype in (torch.bfloat16, torch.float16) else 1e-4
        error = (out.double() - batch_out.double()).norm()
        if error > tolerance * batch_out.double().norm() + 1e-12:
            raise LayerInputError(
                f"{label}: its output for each sample alone differs from its output in the batch (relative "
                f"difference {float(error / (batch_out.double().norm() + 1e-300)):.2g}): its forward mixes "
                "samples (or draws random numbers), so it has no per-sample gradients"
            )


def unit_parameter_names(unit: nn.Module, recurse: bool) -> List[str]:
    """The trainable parameters a torch.func unit differentiates: its own, or (recurse) all of its
    subtree's (nn.MultiheadAttention uses out_proj's weight without calling out_proj)."""
    return [n for n, p in unit.named_parameters(recurse=recurse) if p.requires_grad]


def unit_recurses(unit: nn.Module) -> bool:
    """nn.MultiheadAttention (and subclasses keeping its forward) reads its children's parameters
    directly, so it is one unit with its whole subtree; other modules own only their own."""
    return isinstance(unit, nn.MultiheadAttention) and type(unit).forward is nn.MultiheadAttention.forward
