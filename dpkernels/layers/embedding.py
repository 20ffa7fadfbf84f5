"""Per-sample gradient norms and clipped gradients of ``nn.Embedding``.

Notation (one call of the layer, ``B`` samples, vocabulary ``V``, embedding width ``D``):
    x: [B, T]     token ids (inputs of rank >= 3 fold the middle dims into T, rank 1 gives T = 1)
    G: [B, T, D]  gradient of each sample's loss with respect to the looked-up rows
Per-sample gradient: W_i = sum_t e_{x_{i,t}} g_{i,t}^T  [V, D], i.e. g_{i,t} scattered into row x_{i,t};
positions whose id is ``padding_idx`` contribute nothing (PyTorch gives that row no gradient).

Rows of W_i hit by several positions hold the sum of their g, so
    ||W_i||_F^2 = sum_{v in x_i} ||sum_{t: x_{i,t} = v} g_{i,t}||^2.
It is computed on the distinct (sample, token) pairs only: O(B T D) memory, never [B, V, D].
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
from torch import nn

from ..errors import LayerInputError
from ..kernels.formulas import accumulation_dtype
from .shared import Factors


def token_rows(module: nn.Embedding, ids: torch.Tensor, G: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Check and flatten one call's ids and output gradient.  ids: [B, ...], G: [B, ..., D] -> [B, T], [B, T, D]."""
    D = module.embedding_dim
    if ids.is_floating_point() or ids.is_complex() or ids.dim() < 1:
        raise LayerInputError(
            f"nn.Embedding input must be integer token ids of shape [B, ...] with a batch dimension first, "
            f"got dtype {ids.dtype} and shape {tuple(ids.shape)}"
        )
    if G.shape != ids.shape + (D,):
        raise LayerInputError(
            f"nn.Embedding output gradient must have shape {tuple(ids.shape) + (D,)} (input shape + [{D}]), "
            f"got {tuple(G.shape)}"
        )
    B, T = ids.shape[0], math.prod(ids.shape[1:])
    return ids.reshape(B, T).long(), G.reshape(B, T, D)


def kept_positions(module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """Mask of the positions that receive gradient: ids != padding_idx.  ids: [B, T] -> bool [B, T]."""
    if module.padding_idx is None:
        return torch.ones_like(ids, dtype=torch.bool)
    return ids != module.padding_idx


def embedding_norm_sq(ids: torch.Tensor, G: torch.Tensor, keep: torch.Tensor, V: int) -> torch.Tensor:
    """sum over distinct (i, v) of ||sum_{t: x_{i,t} = v} g_{i,t}||^2, per sample.

    ids: [B, T] in [0, V), G: [B, T, D], keep: bool [B, T] -> [B].
    The key i V + x_{i,t} numbers the (sample, token) pairs.  Sorted, equal keys are neighbours: a
    running count of key changes numbers each position's pair, into which its g row is summed
    ([B T, D]: at most B T pairs, the unused rows stay zero).  Every shape is known in advance, so
    nothing waits for the device (``torch.unique`` or a boolean mask would: they size their output
    from the data).  Padding positions contribute zero rows.
    """
    dt = accumulation_dtype(G)
    B, T = ids.shape
    D = G.shape[-1]
    key = (torch.arange(B, device=ids.device)[:, None] * V + ids).reshape(B * T)
    rows = torch.where(keep[..., None], G.to(dt), 0).reshape(B * T, D)
    sorted_key, order = key.sort()
    changed = torch.ones_like(sorted_key, dtype=torch.bool)
    changed[1:] = sorted_key[1:] != sorted_key[:-1]
    pair = changed.cumsum(0) - 1  # [B T], the pair of each sorted position
    pair_at = torch.empty_like(pair).scatter_(0, order, pair)  # the pair of each position, in place of a sorted copy of the rows
    summed = torch.zeros(B * T, D, dtype=dt, device=G.device).index_add_(0, pair_at, rows)
    sample_of_pair = torch.zeros(B * T, dtype=torch.long, device=ids.device).scatter_(0, pair, sorted_key // V)
    return torch.zeros(B, dtype=dt, device=G.device).index_add_(0, sample_of_pair, summed.pow(2).sum(dim=1))


def clipped_embedding_grad(
    ids: torch.Tensor, G: torch.Tensor, keep: torch.Tensor, V: int, coef: torch.Tensor
) -> torch.Tensor:
    """sum_i coef_i W_i: each coef_i g_{i,t} added into row x_{i,t} (padding positions add zero rows).
    -> [V, D] in the accumulation dtype."""
    dt = accumulation_dtype(G)
    scaled = torch.where(keep[..., None], G.to(dt) * coef.to(dt)[:, None, None], 0)
    grad = torch.zeros(V, G.shape[-1], dtype=dt, device=G.device)
    return grad.index_add_(0, ids.reshape(-1), scaled.reshape(-1, G.shape[-1]))


class EmbeddingSamples:
    """The per-sample gradients of one ``nn.Embedding`` call, kept as the ids and the output gradient."""

    def __init__(self, module: nn.Embedding, inputs, G: torch.Tensor):
        if module.scale_grad_by_freq:
            raise LayerInputError(
                "nn.Embedding(scale_grad_by_freq=True) scales each row's gradient by a batch-wide token count, "
                "so per-sample gradients are not independent; build the embedding with scale_grad_by_freq=False"
            )
        if module.sparse:
            raise LayerInputError(
                "nn.Embedding(sparse=True) produces sparse gradients, which DP noise would make dense; "
                "build the embedding with sparse=False"
            )
        self.module = module
        self.ids, self.G = token_rows(module, inputs[0], G)
        self.keep = kept_positions(module, self.ids)

    def norm_sq(self) -> Dict[nn.Parameter, torch.Tensor]:
        if not self.module.weight.requires_grad:
            return {}
        return {self.module.weight: embedding_norm_sq(self.ids, self.G, self.keep, self.module.num_embeddings)}

    def clipped_grad(self, coef: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
        if not self.module.weight.requires_grad:
            return {}
        V = self.module.num_embeddings
        return {self.module.weight: clipped_embedding_grad(self.ids, self.G, self.keep, V, coef)}

    def grad_forms(self) -> Dict[nn.Parameter, object]:
        """W_i = onehot(x_i)^T G_i: factors with one-hot left rows (layers/shared.py)."""
        if not self.module.weight.requires_grad:
            return {}
        return {self.module.weight: Factors(None, self.G, ids=self.ids, keep=self.keep)}
