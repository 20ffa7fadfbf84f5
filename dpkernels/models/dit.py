"""A DiT-style diffusion transformer built from a config, with random weights.

Patch embedding (Conv2d, stride = patch), learned position embedding (an Embedding over patch
indices, so it has per-sample gradients), timestep MLP, label Embedding, blocks with adaLN
conditioning (a Linear maps the condition to shift/scale/gate for attention and MLP; the
LayerNorms have no affine parameters), a final adaLN layer and an unpatchify.
Input: images [B, C, H, W], timesteps [B] (float), labels [B] (int) -> noise prediction [B, C, H, W].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DiTConfig:
    image: int = 256
    patch: int = 8
    channels: int = 3
    d: int = 1024
    layers: int = 24
    heads: int = 16
    classes: int = 1000

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the diffusion timestep.  t: [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    angles = t[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.d, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(cfg.d, 3 * cfg.d)
        self.proj = nn.Linear(cfg.d, cfg.d)
        self.norm2 = nn.LayerNorm(cfg.d, elementwise_affine=False, eps=1e-6)
        self.fc = nn.Linear(cfg.d, 4 * cfg.d)
        self.out = nn.Linear(4 * cfg.d, cfg.d)
        self.ada = nn.Linear(cfg.d, 6 * cfg.d)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = (t.view(B, T, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        h = modulate(self.norm2(x), shift2, scale2)
        return x + gate2[:, None] * self.out(F.gelu(self.fc(h), approximate="tanh"))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.patchify = nn.Conv2d(cfg.channels, cfg.d, cfg.patch, stride=cfg.patch)
        self.pos = nn.Embedding(cfg.tokens, cfg.d)
        self.t_fc1 = nn.Linear(256, cfg.d)
        self.t_fc2 = nn.Linear(cfg.d, cfg.d)
        self.label = nn.Embedding(cfg.classes, cfg.d)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(cfg.d, 2 * cfg.d)
        self.final = nn.Linear(cfg.d, cfg.patch * cfg.patch * cfg.channels)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        B, cfg = x.shape[0], self.cfg
        n = cfg.image // cfg.patch
        x = x.view(B, n, n, cfg.patch, cfg.patch, cfg.channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, cfg.channels, cfg.image, cfg.image)

    def forward(self, images: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.patchify(images).flatten(2).transpose(1, 2)
        positions = torch.arange(x.shape[1], device=x.device).repeat(x.shape[0], 1)
        x = x + self.pos(positions)
        c = self.t_fc2(F.silu(self.t_fc1(timestep_features(t, 256)))) + self.label(labels)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_ada(F.silu(c)).chunk(2, dim=-1)
        return self.unpatchify(self.final(modulate(self.final_norm(x), shift, scale)))
