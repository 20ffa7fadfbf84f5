"""The bottom floor: one layer's per-sample norms and clipped sums, and the dispatch between their forms.

    formulas.py     exact PyTorch formulas (Gram "ghost" and materialised "direct" norms, clipped sums)
    linear_norm.py  Triton kernels for the Linear weight norm (CUDA, or the Triton interpreter)
    tiled.py        the kernels' tiling in PyTorch (CPU)
    heuristics.py   the cost rules and block sizes they share

Dispatch (what ``dpkernels.functional`` exposes), A: [B, T, d] layer input, G: [B, T, p] output gradient:
    weight_norm_sq(A, G, method)          -> ||G_i^T A_i||_F^2                  [B]  by ghost, direct or flash
    flash_weight_norm_sq(A, G)            -> ||G_i^T A_i||_F^2                  [B]
    flash_linear_norm_sq(A, G, with_bias) -> (weight_sq [B], ||sum_t g_{i,t}||^2 [B] or None)

Flash results are float32 for fp32 / bf16 / fp16 inputs (fp32 accumulation) and float64 when an input
is float64 (then the exact PyTorch formulas run in float64).

Where flash runs: CUDA tensors -> Triton kernels (linear_norm.py); other tensors -> the Triton
kernels through the interpreter if TRITON_INTERPRET=1, else the same tiling in PyTorch
(tiled.py).  Importing this package neither imports Triton nor touches CUDA.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..errors import LayerInputError
from .formulas import bias_norm_sq, choose_method, common_dtype, weight_norm_sq_direct, weight_norm_sq_ghost
from .heuristics import KERNELS, Config, GramConfig, PsgConfig, interpreting

__all__ = ["weight_norm_sq", "flash_weight_norm_sq", "flash_linear_norm_sq", "METHODS", "KERNELS", "GramConfig", "PsgConfig"]

METHODS = ("auto", "ghost", "direct", "flash")


def _check(A: torch.Tensor, G: torch.Tensor) -> None:
    """A: [B, T, d] and G: [B, T, p], floating point, on one device."""
    if A.dim() != 3 or G.dim() != 3 or A.shape[:2] != G.shape[:2]:
        raise LayerInputError(f"expected A [B, T, d] and G [B, T, p], got {tuple(A.shape)} and {tuple(G.shape)}")
    if not (A.is_floating_point() and G.is_floating_point()):
        raise LayerInputError(f"A and G must be floating point, got {A.dtype} and {G.dtype}")
    if A.device != G.device:
        raise LayerInputError(f"A and G must be on one device, got {A.device} and {G.device}")


def flash_linear_norm_sq(
    A: torch.Tensor, G: torch.Tensor, with_bias: bool, method: str = "auto", config: Optional[Config] = None
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(||G_i^T A_i||_F^2, ||sum_t g_{i,t}||^2 if with_bias else None) per sample.

    A: [B, T, d], G: [B, T, p] (any strides) -> ([B], [B] or None), float32 (float64 for float64 input).
    method: "gram" (T-tile Grams, 2 B T^2 (d + p) flops), "psg" (per-sample-gradient tiles,
    2 B T d p flops) or "auto" (the cheaper, decided per call).  config: a GramConfig / PsgConfig
    overriding the block sizes of the chosen kernel.
    """
    _check(A, G)
    if method not in KERNELS:
        raise ValueError(f"method must be one of {KERNELS}, got {method!r}")
    if torch.float64 in (A.dtype, G.dtype):
        return weight_norm_sq(A, G), (bias_norm_sq(G) if with_bias else None)
    if A.numel() == 0 or G.numel() == 0:
        weight = torch.zeros(A.shape[0], dtype=torch.float32, device=A.device)
        return weight, (bias_norm_sq(G) if with_bias else None)
    if A.is_cuda or interpreting():
        from .linear_norm import linear_norm_sq

        return linear_norm_sq(A, G, with_bias, method, config)
    from .tiled import tiled_linear_norm_sq

    return tiled_linear_norm_sq(A, G, with_bias, method, config)


def flash_weight_norm_sq(A: torch.Tensor, G: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """||G_i^T A_i||_F^2 per sample.  A: [B, T, d], G: [B, T, p] -> [B] float32 (float64 for float64 input)."""
    return flash_linear_norm_sq(A, G, False, method)[0]


def weight_norm_sq(A: torch.Tensor, G: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Per-sample ||W_i||_F^2 by ``method`` ("auto" decides per call).  A: [B, T, d], G: [B, T, p] -> [B]."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    B, T, d = A.shape
    p = G.shape[-1]
    if method == "auto":
        method = choose_method(B, T, d, p)
    if method == "ghost":
        return weight_norm_sq_ghost(A, G)
    if method == "direct":
        return weight_norm_sq_direct(A, G)
    return flash_weight_norm_sq(*common_dtype(A, G))
