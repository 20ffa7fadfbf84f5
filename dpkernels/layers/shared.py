"""A parameter used several times in one forward pass (tied weights, a layer called twice).

Its per-sample gradient is the sum over its uses, g_i = sum_u g_{u,i}, so its squared norm is

    ||g_i||^2 = sum_u ||g_{u,i}||^2 + 2 sum_{u < v} <g_{u,i}, g_{v,i}>

The self terms come from each use's own rule; this file forms the cross terms <g_u, g_v> per sample
from each use's ``grad_forms()``: per parameter either a :class:`Factors` (g_i = L_i^T R_i) or the
materialised per-sample gradients [B, *shape].  For two factored uses

    <L_u^T R_u, L_v^T R_v> = sum_{s,t} (L_u L_v^T)[s, t] (R_u R_v^T)[s, t]      two [T_u, T_v] Grams

so a Linear called twice costs two Grams, and a tied Embedding / Linear pair (the Embedding's L is
the one-hot of its ids, never built: its Gram rows are the head's output gradient gathered at the
ids) never materialises the [V, d] per-sample gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels.formulas import accumulation_dtype


@dataclass
class Factors:
    """g_i = L_i^T R_i for every sample.  L: [B, T, rows] or, with ``ids``, the one-hot rows
    e_{ids[i, t]} (ids: [B, T] long, ``keep``: bool [B, T] masking padding); R: [B, T, cols]."""

    L: Optional[torch.Tensor]
    R: torch.Tensor
    ids: Optional[torch.Tensor] = None
    keep: Optional[torch.Tensor] = None

    def masked_R(self, dt: torch.dtype) -> torch.Tensor:
        R = self.R.to(dt)
        return R if self.keep is None else R * self.keep.unsqueeze(-1).to(dt)

    def materialise(self, rows: int, dt: torch.dtype) -> torch.Tensor:
        """The per-sample gradients [B, rows, cols]."""
        R = self.masked_R(dt)
        if self.ids is None:
            return torch.bmm(self.L.to(dt).transpose(1, 2), R)
        out = torch.zeros(R.shape[0], rows, R.shape[-1], dtype=dt, device=R.device)
        return out.scatter_add_(1, self.ids.unsqueeze(-1).expand_as(R), R)


def left_gram(u: Factors, v: Factors, dt: torch.dtype) -> torch.Tensor:
    """(L_u L_v^T)[s, t] per sample, [B, T_u, T_v], without building one-hot rows."""
    if u.ids is None and v.ids is None:
        return torch.bmm(u.L.to(dt), v.L.to(dt).transpose(1, 2))
    if u.ids is not None and v.ids is not None:
        return (u.ids.unsqueeze(2) == v.ids.unsqueeze(1)).to(dt)
    if u.ids is not None:
        return left_gram(v, u, dt).transpose(1, 2)
    # u dense, v one-hot: L_u[s, ids_v[t]]
    index = v.ids.unsqueeze(1).expand(-1, u.L.shape[1], -1)
    return torch.gather(u.L, 2, index).to(dt)


def materialised_with_factors(M: torch.Tensor, f: Factors, dt: torch.dtype) -> torch.Tensor:
    """<M_i, L_i^T R_i> = sum_t (L_{i,t} M_i) . R_{i,t} per sample.  M: [B, rows, cols] -> [B]."""
    M = M.to(dt).reshape(M.shape[0], -1, f.R.shape[-1])
    R = f.masked_R(dt)
    if f.ids is None:
        return torch.einsum("btr,brc,btc->b", f.L.to(dt), M, R)
    rows = torch.gather(M, 1, f.ids.unsqueeze(-1).expand(-1, -1, M.shape[-1]))  # M_i[ids_{i,t}]: [B, T, cols]
    return (rows * R).sum(dim=(1, 2))


def cross_term(u, v) -> torch.Tensor:
    """<g_{u,i}, g_{v,i}> per sample, [B], for two uses' forms of one parameter (Factors or [B, *shape])."""
    tensors = [x.R if isinstance(x, Factors) else x for x in (u, v)]
    dt = accumulation_dtype(*tensors)
    if isinstance(u, Factors) and isinstance(v, Factors):
        gram_r = torch.bmm(u.masked_R(dt), v.masked_R(dt).transpose(1, 2))
        return (left_gram(u, v, dt) * gram_r).sum(dim=(1, 2))
    if isinstance(u, Factors):
        u, v = v, u
    if isinstance(v, Factors):
        return materialised_with_factors(u, v, dt)
    return (u.to(dt).flatten(1) * v.to(dt).flatten(1)).sum(1)
