"""Functional entry points: per-sample squared gradient norms of a Linear layer from its factors.

    activations A: [B, T, d] (or [B, d])   the layer input
    backprops   G: [B, T, p] (or [B, p])   the gradient of each sample's loss w.r.t. the layer output
    linear_norm_sq(A, G, method)  -> ||G_i^T A_i||_F^2   [B] float32 (float64 for float64 inputs)
    linear_bias_norm_sq(G)        -> ||sum_t g_{i,t}||^2 [B]

method: "ghost" (Gram inner product, 2 B T^2 (d + p) flops, B T^2 memory), "direct" (per-sample
gradients materialised with bmm, 2 B T d p flops, B d p memory), "flash" (fused Triton kernels on CUDA,
the same tiling in PyTorch on CPU: no B T^2 or B d p memory), "auto" (ghost or direct, whichever
costs fewer flops for these shapes; decided on every call).
"""

from __future__ import annotations

import torch

from .kernels import weight_norm_sq
from .kernels.formulas import as_sequence, bias_norm_sq


def linear_norm_sq(activations: torch.Tensor, backprops: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Per-sample squared Frobenius norm of a Linear layer's weight gradient, [B]."""
    A = as_sequence(activations, activations.shape[-1], "activations")
    G = as_sequence(backprops, backprops.shape[-1], "backprops")
    return weight_norm_sq(A, G, method)


def linear_bias_norm_sq(backprops: torch.Tensor) -> torch.Tensor:
    """Per-sample squared norm of a Linear layer's bias gradient ||sum_t g_t||^2, [B]."""
    return bias_norm_sq(as_sequence(backprops, backprops.shape[-1], "backprops"))
