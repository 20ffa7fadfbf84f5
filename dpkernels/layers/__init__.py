"""Per-layer rules: each layer family answers two questions about one call of the layer.

    view = samples_of(module, inputs, G)    inputs: the layer's forward inputs, G: grad of its output
    view.norm_sq()        -> {param: [B]}   per-sample squared gradient norm of each trainable param
    view.clipped_grad(c)  -> {param: grad}  sum_i c_i g_i for each trainable param
    view.grad_forms()     -> {param: Factors or [B, *shape]}  for parameters used by several calls
                                            (cross terms between the uses, layers/shared.py)

The clipping algorithms (ghost, bookkeeping) only orchestrate these calls.  Modules without a rule
get per-sample gradients from torch.func (layers/func.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from opacus.grad_sample import GradSampleModule
from torch import nn
from torch.distributed.fsdp import FSDPModule

from .conv import ConvSamples
from .embedding import EmbeddingSamples
from .linear import LinearSamples, TransposedLinearSamples
from .materialised import MaterialisedGrads
from .norms import HF_RMSNORMS, NormLayerSamples

FAMILIES = {
    nn.Linear: LinearSamples,
    nn.Embedding: EmbeddingSamples,
    nn.LayerNorm: NormLayerSamples,
    nn.RMSNorm: NormLayerSamples,
    nn.GroupNorm: NormLayerSamples,
    nn.Conv1d: ConvSamples,
    nn.Conv2d: ConvSamples,
}

# Layers of other packages, matched by qualified class name so that they are never imported here.
BY_NAME = {
    "transformers.pytorch_utils.Conv1D": TransposedLinearSamples,  # y = x W + b, W stored [in, out]
    **{name: NormLayerSamples for name in HF_RMSNORMS},  # y = w * h(x), see layers/norms.py
}

# Subclasses of a family that override forward with the same function (checked in the tests).
SAME_FUNCTION = {"timm.layers.norm.LayerNorm"}  # F.layer_norm, or a fused kernel of it


class MaterialisedSamples(MaterialisedGrads):
    """Fallback for other layer types: Opacus's registered grad sampler materialises [B, *shape]."""

    def __init__(self, module: nn.Module, inputs, G: torch.Tensor):
        sampler = GradSampleModule.GRAD_SAMPLERS[layer_type(module)]
        names = {id(p): n for n, p in module.named_parameters(recurse=False)}
        grads = sampler(module, list(inputs), G)
        super().__init__(module, {names[id(p)]: g for p, g in grads.items() if p.requires_grad})


def layer_type(module: nn.Module) -> type:
    """The module's own type.  FSDP2's ``fully_shard`` swaps a module's class for a subclass
    ``FSDP<Name>(FSDPModule, <Name>)``; the rules are looked up by ``<Name>``."""
    kind = type(module)
    if isinstance(module, FSDPModule):
        return next(base for base in kind.__bases__ if not issubclass(base, FSDPModule))
    return kind


def qualified_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def rule_for(module: nn.Module) -> Optional[type]:
    """The per-sample class for this module, or None (then clipping/module.py uses torch.func).

    Found through the class hierarchy: a subclass of a family (timm's LayerNorm, PyTorch's
    NonDynamicallyQuantizableLinear, FSDP2's swapped classes) gets the family's rule only if its
    forward IS the family's forward or is listed in SAME_FUNCTION; a subclass that changes the
    math gets no rule.  Opacus's registered grad samplers are matched by exact type.
    """
    kind = layer_type(module)
    if qualified_name(kind) in BY_NAME:
        return BY_NAME[qualified_name(kind)]
    for base in kind.__mro__:
        if base in FAMILIES:
            same = kind.forward is base.forward or qualified_name(kind) in SAME_FUNCTION
            return FAMILIES[base] if same else None
    if kind in GradSampleModule.GRAD_SAMPLERS:
        return MaterialisedSamples
    return None


def samples_of(module: nn.Module, inputs, G: torch.Tensor, linear_method: str = "auto", keep: bool = False, rule: Optional[type] = None):
    """The per-sample view of one call of ``module`` (see the module docstring).

    keep: the view will be asked for clipped gradients later (bookkeeping), so it may hold
    per-sample gradients instead of the layer's input and output gradient where that is cheaper.
    rule: ``rule_for(module)``, where the caller has it already (looked up here otherwise).
    """
    rule = rule or rule_for(module)
    if issubclass(rule, LinearSamples):
        return rule(module, inputs, G, method=linear_method, keep=keep)
    return rule(module, inputs, G)
