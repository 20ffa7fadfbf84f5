"""Layers whose per-sample gradients are small enough to hold: [B, *param.shape] per parameter."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..kernels.formulas import accumulation_dtype, clipped_sum, sum_sq


class MaterialisedGrads:
    """Per-sample gradients held by parameter name (dotted, relative to ``module``), {name: [B, *shape]}.

    The parameters are looked up on the module when asked, so a model sharded with FSDP2 (which swaps
    a module's parameter objects between the unsharded ones of forward/backward and the sharded ones
    the optimizer holds) gets the parameters current at that moment.
    """

    def __init__(self, module: nn.Module, grads: Dict[str, torch.Tensor]):
        self.module = module
        self.grads = grads

    def norm_sq(self) -> Dict[nn.Parameter, torch.Tensor]:
        return {self.module.get_parameter(n): sum_sq(g) for n, g in self.grads.items()}

    def clipped_grad(self, coef: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
        return {self.module.get_parameter(n): clipped_sum(g.to(accumulation_dtype(g)), coef) for n, g in self.grads.items()}

    def grad_forms(self) -> Dict[nn.Parameter, torch.Tensor]:
        return {self.module.get_parameter(n): g for n, g in self.grads.items()}
