"""Per-sample gradient norms and clipped gradients of ``nn.Conv1d`` and ``nn.Conv2d``.

A convolution is a linear layer applied at every output position to the unfolded input patch.
Notation (one call, ``B`` samples, ``g`` groups, kernel of ``k`` taps, ``q`` output positions):
    x:  [B, C_in, *spatial]       layer input, padded explicitly as the layer pads it
    A:  [B, C_in k, q]            ``F.unfold`` of the padded input (Conv1d: height 1)
    G:  [B, C_out, *spatial_out]  gradient of each sample's loss with respect to the output, q = prod(spatial_out)
Group j maps input channels [j C_in/g, (j+1) C_in/g) to output channels [j C_out/g, (j+1) C_out/g), so per group
    A_{i,j}: [q, C_in/g k],  G_{i,j}: [q, C_out/g],  W_{i,j} = G_{i,j}^T A_{i,j}  [C_out/g, C_in/g k]
and the weight gradient W_i stacks the groups' W_{i,j}: ||W_i||_F^2 = sum_j ||W_{i,j}||_F^2.
Bias: b_i = sum_t g_{i,t}  [C_out].
The linear-layer rules (``weight_norm_sq``, ``clipped_weight_grad``, bias rules) do the work on these factors.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LayerInputError
from ..kernels import weight_norm_sq
from ..kernels.formulas import bias_grads, bias_norm_sq, clipped_bias_grad, clipped_weight_grad, common_dtype


def check_shapes(module: nn.Module, x: torch.Tensor, G: torch.Tensor) -> None:
    """Raise LayerInputError unless x is [B, C_in, *spatial] and G is [B, C_out, *spatial_out] for ``module``."""
    name = type(module).__name__
    rank = 2 + len(module.kernel_size)
    if x.dim() != rank or x.shape[1] != module.in_channels:
        raise LayerInputError(
            f"nn.{name} input must have rank {rank}, [B, {module.in_channels}, *spatial] with a batch dimension "
            f"first, got {tuple(x.shape)}; add a batch dimension to unbatched inputs (x.unsqueeze(0))"
        )
    if G.dim() != rank or G.shape[:2] != (x.shape[0], module.out_channels):
        raise LayerInputError(
            f"nn.{name} output gradient must have shape [{x.shape[0]}, {module.out_channels}, *spatial_out], "
            f"got {tuple(G.shape)}"
        )


def unfolded_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pad x as the layer does (any padding_mode, 'same'/'valid' included), then unfold.  -> A: [B, C_in k, q]."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
    return F.unfold(x, kernel, dilation=dilation, padding=0, stride=stride)


def per_group(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Split the channel dim into groups, positions before channels.  t: [B, C, q] -> [B, g, q, C/g]."""
    B, C, q = t.shape
    return t.reshape(B, groups, C // groups, q).transpose(2, 3)


class ConvSamples:
    """The per-sample gradients of one ``nn.Conv1d`` / ``nn.Conv2d`` call, kept as the factors (A, G) per group."""

    def __init__(self, module: nn.Module, inputs, G: torch.Tensor, method: str = "auto"):
        x = inputs[0]
        check_shapes(module, x, G)
        A = unfolded_input(module, x)
        q = math.prod(G.shape[2:])
        if q != A.shape[-1]:
            raise LayerInputError(
                f"nn.{type(module).__name__} output gradient has {q} positions but the layer maps an input of "
                f"shape {tuple(x.shape)} to {A.shape[-1]}; pass the gradient of this call's output"
            )
        G = G.reshape(G.shape[0], module.out_channels, q)
        self.module = module
        self.method = method
        self.A = per_group(A, module.groups)
        self.G = per_group(G, module.groups)
        self.G_rows = G.transpose(1, 2)

    def norm_sq(self) -> Dict[nn.Parameter, torch.Tensor]:
        """||W_i||^2 = sum_j ||G_{i,j}^T A_{i,j}||^2 (the B g pairs as one batch), ||b_i||^2 = ||sum_t g_{i,t}||^2."""
        B, g = self.A.shape[:2]
        out = {}
        if self.module.weight.requires_grad:
            per_pair = weight_norm_sq(self.A.flatten(0, 1), self.G.flatten(0, 1), self.method)
            out[self.module.weight] = per_pair.reshape(B, g).sum(dim=1)
        if self.module.bias is not None and self.module.bias.requires_grad:
            out[self.module.bias] = bias_norm_sq(self.G_rows)
        return out

    def clipped_grad(self, coef: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
        """sum_i coef_i W_{i,j} for each group j (one GEMM per group, vmapped), reshaped to [C_out, C_in/g, *k]."""
        out = {}
        weight = self.module.weight
        if weight.requires_grad:
            per_group_grad = torch.vmap(clipped_weight_grad, in_dims=(1, 1, None))(self.A, self.G, coef)
            out[weight] = per_group_grad.reshape(weight.shape)
        if self.module.bias is not None and self.module.bias.requires_grad:
            out[self.module.bias] = clipped_bias_grad(self.G_rows, coef)
        return out

    def grad_forms(self) -> Dict[nn.Parameter, torch.Tensor]:
        """The per-sample gradients materialised: W_{i,j} = G_{i,j}^T A_{i,j} per group, [B, *weight.shape]."""
        out = {}
        weight = self.module.weight
        if weight.requires_grad:
            A, G = common_dtype(self.A, self.G)
            out[weight] = torch.einsum("bgqo,bgqi->bgoi", G, A).reshape(A.shape[0], *weight.shape)
        if self.module.bias is not None and self.module.bias.requires_grad:
            out[self.module.bias] = bias_grads(self.G_rows)
        return out
