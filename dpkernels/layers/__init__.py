"""Per-layer rules: each layer family answers two questions about one call of the layer.

    view = samples_of(module, inputs, G)    inputs: the layer's forward inputs, G: grad of its output
    view.norm_sq()        -> {param: [B]}   per-sample squared gradient norm of each trainable param
    view.clipped_grad(c)  -> {param: grad}  sum_i c_i g_i for each trainable param

The clipping algorithms (ghost, bookkeeping) only orchestrate these two calls.
"""

from __future__ import annotations

from typing import Optional

import torch
from opacus.grad_sample import GradSampleModule
from torch import nn
from torch.distributed.fsdp import FSDPModule

from .conv import ConvSamples
from .embedding import EmbeddingSamples
from .linear import LinearSamples
from .materialised import MaterialisedGrads
from .norms import NormLayerSamples

FAMILIES = {
    nn.Linear: LinearSamples,
    nn.Embedding: EmbeddingSamples,
    nn.LayerNorm: NormLayerSamples,
    nn.RMSNorm: NormLayerSamples,
    nn.GroupNorm: NormLayerSamples,
    nn.Conv1d: ConvSamples,
    nn.Conv2d: ConvSamples,
}


# RMSNorms of ``transformers`` models (y = w * x / sqrt(mean(x^2) + variance_epsilon)), matched by
# qualified class name so that transformers is never imported here.
HF_RMSNORMS = {"transformers.models.llama.modeling_llama.LlamaRMSNorm"}


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


def rule_for(module: nn.Module) -> Optional[type]:
    """The per-sample class for this module's exact type, or None if the type is unsupported."""
    kind = layer_type(module)
    if kind in FAMILIES:
        return FAMILIES[kind]
    if f"{kind.__module__}.{kind.__qualname__}" in HF_RMSNORMS:
        return NormLayerSamples
    if kind in GradSampleModule.GRAD_SAMPLERS:
        return MaterialisedSamples
    return None


def samples_of(module: nn.Module, inputs, G: torch.Tensor, linear_method: str = "auto", keep: bool = False):
    """The per-sample view of one call of ``module`` (see the module docstring).

    keep: the view will be asked for clipped gradients later (bookkeeping), so it may hold
    per-sample gradients instead of the layer's input and output gradient where that is cheaper.
    """
    rule = rule_for(module)
    if rule is LinearSamples:
        return LinearSamples(module, inputs, G, method=linear_method, keep=keep)
    return rule(module, inputs, G)
