"""The kernels' tiling in plain PyTorch, for tensors off CUDA when Triton is not interpreting.

    A: [B, T, d], G: [B, T, p]; W_i = G_i^T A_i; results [B] float32 (fp32 accumulation).

Same loops as linear_norm.py, batched over the B samples: one bmm per tile step, so the
working memory is O(B * tile) (slices cast to fp32 plus one tile accumulator), never the
[B, T, T] Grams nor the [B, p, d] per-sample gradients.

    gram  for s <= t over T tiles of BT rows:  c_st <A_s A_t^T, G_s G_t^T>_F, c_st = 1 + (s < t),
          each Gram tile summed over column chunks of BK.
    psg   for each BP x BD tile of W_i: sum over BT-row chunks of G_c^T A_c, then ||tile||_F^2.
    bias  ||sum_t g_t||^2 from column sums over BT-row chunks.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .heuristics import Config, GramConfig, PsgConfig, resolve_kernel, tiled_gram_config, tiled_psg_config

Norms = Tuple[torch.Tensor, Optional[torch.Tensor]]


def _chunk(X: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """X[:, rows, cols] in fp32.  X: [B, T, K] -> [B, |rows|, |cols|]."""
    return X[:, rows, cols].float()


def gram_tile(X: torch.Tensor, s: slice, t: slice, BK: int) -> torch.Tensor:
    """X_s X_t^T summed over column chunks of BK.  X: [B, T, K] -> [B, |s|, |t|] fp32."""
    K = X.shape[-1]
    out = torch.zeros(X.shape[0], s.stop - s.start, t.stop - t.start, dtype=torch.float32, device=X.device)
    for k in range(0, K, BK):
        cols = slice(k, min(k + BK, K))
        out += torch.bmm(_chunk(X, s, cols), _chunk(X, t, cols).transpose(1, 2))
    return out


def gram_weight_norm_sq(A: torch.Tensor, G: torch.Tensor, cfg: GramConfig) -> torch.Tensor:
    """sum_{s <= t} c_st <A_s A_t^T, G_s G_t^T>_F over T tiles of cfg.BT rows.  -> [B] fp32."""
    B, T, _ = A.shape
    out = torch.zeros(B, dtype=torch.float32, device=A.device)
    for s0 in range(0, T, cfg.BT):
        s = slice(s0, min(s0 + cfg.BT, T))
        for t0 in range(s0, T, cfg.BT):
            t = slice(t0, min(t0 + cfg.BT, T))
            c_st = 1.0 if s0 == t0 else 2.0
            out += c_st * (gram_tile(A, s, t, cfg.BK) * gram_tile(G, s, t, cfg.BK)).sum((1, 2))
    return out


def psg_weight_norm_sq(A: torch.Tensor, G: torch.Tensor, cfg: PsgConfig) -> torch.Tensor:
    """sum over BP x BD tiles of ||sum_c G_c^T A_c||_F^2, chunks c of cfg.BT rows.  -> [B] fp32."""
    B, T, d = A.shape
    p = G.shape[-1]
    out = torch.zeros(B, dtype=torch.float32, device=A.device)
    for p0 in range(0, p, cfg.BP):
        ps = slice(p0, min(p0 + cfg.BP, p))
        for d0 in range(0, d, cfg.BD):
            ds = slice(d0, min(d0 + cfg.BD, d))
            tile = torch.zeros(B, ps.stop - p0, ds.stop - d0, dtype=torch.float32, device=A.device)
            for t0 in range(0, T, cfg.BT):
                rows = slice(t0, min(t0 + cfg.BT, T))
                tile += torch.bmm(_chunk(G, rows, ps).transpose(1, 2), _chunk(A, rows, ds))
            out += tile.square_().sum((1, 2))
    return out


def bias_norm_sq(G: torch.Tensor, BT: int) -> torch.Tensor:
    """||sum_t g_t||^2 with the sum over t taken in chunks of BT rows.  G: [B, T, p] -> [B] fp32."""
    B, T, p = G.shape
    col = torch.zeros(B, p, dtype=torch.float32, device=G.device)
    for t0 in range(0, T, BT):
        col += _chunk(G, slice(t0, min(t0 + BT, T)), slice(None)).sum(1)
    return col.square_().sum(1)


def tiled_linear_norm_sq(
    A: torch.Tensor, G: torch.Tensor, with_bias: bool, method: str = "auto", config: Optional[Config] = None
) -> Norms:
    """(||G_i^T A_i||_F^2, ||sum_t g_{i,t}||^2 or None), both [B] fp32, by the tiled loops.

    A: [B, T, d], G: [B, T, p] with T, d, p >= 1; method "gram", "psg" or "auto"; config
    overrides the CPU tile sizes (GramConfig uses BT, BK; PsgConfig uses BP, BD, BT).
    """
    B, T, d = A.shape
    p = G.shape[-1]
    if resolve_kernel(method, config, B, T, d, p) == "gram":
        cfg = config or tiled_gram_config(T, d, p)
        weight = gram_weight_norm_sq(A, G, cfg)
    else:
        cfg = config or tiled_psg_config(T, d, p)
        weight = psg_weight_norm_sq(A, G, cfg)
    return weight, (bias_norm_sq(G, cfg.BT) if with_bias else None)
