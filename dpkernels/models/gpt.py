"""A GPT-style decoder built from a config, with random weights (no download).

Token and position Embeddings, pre-norm blocks (LayerNorm or RMSNorm), causal self-attention
(one Linear for q, k, v; scaled_dot_product_attention), a GELU MLP, an untied head.
Input ids [B, T] -> logits [B, T, vocab].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 50257
    d: int = 768
    layers: int = 12
    heads: int = 12
    max_len: int = 1024
    norm: str = "layernorm"  # or "rmsnorm"
    bias: bool = True


def make_norm(cfg: GPTConfig) -> nn.Module:
    return nn.LayerNorm(cfg.d, bias=cfg.bias) if cfg.norm == "layernorm" else nn.RMSNorm(cfg.d)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.d, 3 * cfg.d, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d, cfg.d, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = (t.view(B, T, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = make_norm(cfg)
        self.fc = nn.Linear(cfg.d, 4 * cfg.d, bias=cfg.bias)
        self.out = nn.Linear(4 * cfg.d, cfg.d, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d)
        self.pos = nn.Embedding(cfg.max_len, cfg.d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.d, cfg.vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # positions carry the batch dimension so that the position embedding has per-sample gradients
        positions = torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)
        x = self.tok(ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
