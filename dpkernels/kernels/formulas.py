"""Per-sample gradient norms and clipped sums of a Linear layer, in plain PyTorch (exact, any device).

Notation (one call of the layer, ``B`` samples):
    A: [B, T, d]  layer input (rank-2 inputs have T = 1, rank >= 4 inputs fold the middle dims into T)
    G: [B, T, p]  gradient of each sample's loss with respect to the layer output
Per-sample gradients: W_i = G_i^T A_i  [p, d] and b_i = sum_t g_{i,t}  [p].

Two exact strategies for ||W_i||_F^2:
    ghost   <A_i A_i^T, G_i G_i^T>_F     2 B T^2 (d + p) flops, 2 B T^2 memory
    direct  ||G_i^T A_i||_F^2            2 B T d p flops,      B d p memory
``choose_method`` picks the cheaper one from the shapes on every call (T changes between steps).
Norms and sums are taken in float32 for float32/bf16/fp16 inputs and in float64 for float64 inputs
(``accumulation_dtype``); the other layer families (conv, embedding, norms) use the same helpers.
"""

from __future__ import annotations

import math

import torch

from ..errors import LayerInputError


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (norms of bf16/fp16 data are summed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def common_dtype(A: torch.Tensor, G: torch.Tensor):
    """(A, G) in one dtype for GEMMs: the lower precision of the two (as autocast computes the layer).

    bf16/fp16 GEMMs run on tensor cores with fp32 accumulation, as plain PyTorch's do; squares and
    sums of their results are taken in float32 (``accumulation_dtype``).
    """
    if A.dtype == G.dtype:
        return A, G
    low = A.dtype if A.element_size() < G.element_size() else G.dtype
    return A.to(low), G.to(low)


def as_sequence(x: torch.Tensor, width: int, what: str) -> torch.Tensor:
    """View ``x`` of shape [B, ..., width] as [B, T, width]; rank 2 gives T = 1."""
    if x.dim() < 2 or x.shape[-1] != width:
        raise LayerInputError(
            f"{what} must have shape [B, ..., {width}] with a batch dimension first, got {tuple(x.shape)}"
        )
    T = 1
    for n in x.shape[1:-1]:
        T *= n
    return x.reshape(x.shape[0], T, width)


def choose_method(B: int, T: int, d: int, p: int) -> str:
    """Cheaper exact strategy for these shapes: ghost iff T (d + p) < d p (fewer flops, less memory)."""
    return "ghost" if T * (d + p) < d * p else "direct"


def sum_sq(x: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of squares in the accumulation dtype.  x: [B, ...] -> [B]."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1, dtype=accumulation_dtype(x)).square()


def weight_norm_sq_ghost(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """sum_{s,t} (a_s . a_t)(g_s . g_t) per sample.  A: [B, T, d], G: [B, T, p] -> [B]."""
    A, G = common_dtype(A, G)
    dt = accumulation_dtype(A, G)
    B, T = A.shape[:2]
    gram_a = torch.bmm(A, A.transpose(1, 2)).to(dt).reshape(B, 1, T * T)
    gram_g = torch.bmm(G, G.transpose(1, 2)).to(dt).reshape(B, T * T, 1)
    return torch.bmm(gram_a, gram_g).reshape(B)


def per_sample_weight_grads(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """W_i = G_i^T A_i for every sample.  A: [B, T, d], G: [B, T, p] -> [B, p, d]."""
    A, G = common_dtype(A, G)
    return torch.bmm(G.transpose(1, 2), A)


def weight_norm_sq_direct(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """||G_i^T A_i||_F^2 with the per-sample gradients materialised.  A: [B, T, d], G: [B, T, p] -> [B]."""
    return sum_sq(per_sample_weight_grads(A, G))


def bias_grads(G: torch.Tensor) -> torch.Tensor:
    """Per-sample bias gradients b_i = sum_t g_{i,t} in the accumulation dtype.  G: [B, T, p] -> [B, p]."""
    return G.sum(dim=1, dtype=accumulation_dtype(G))


def bias_norm_sq(G: torch.Tensor) -> torch.Tensor:
    """||sum_t g_t||^2 per sample (the sum over t comes before the square).  G: [B, T, p] -> [B]."""
    return sum_sq(bias_grads(G))


def clipped_weight_grad(A: torch.Tensor, G: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """sum_i coef_i G_i^T A_i as one GEMM over all B*T rows.  -> [p, d] (in the GEMM dtype)."""
    A, G = common_dtype(A, G)
    scaled = G * coef.to(G.dtype)[:, None, None]
    return scaled.reshape(-1, G.shape[-1]).t() @ A.reshape(-1, A.shape[-1])


def clipped_bias_grad(G: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """sum_i coef_i sum_t g_{i,t}.  G: [B, T, p] -> [p]."""
    return clipped_sum(bias_grads(G), coef)


def clipped_sum(per_sample: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """sum_i coef_i x_i.  per_sample: [B, ...] -> [...] (in per_sample's dtype)."""
    rows = per_sample.reshape(per_sample.shape[0], math.prod(per_sample.shape[1:]))  # [B, n], also for B = 0 or x_i scalar
    return (coef.to(per_sample.dtype) @ rows).reshape(per_sample.shape[1:])
