"""Small models for tests and the demo: an MLP, a conv net, and a two-branch model.

The two-branch model runs its layers in another order than it defines them, and its first layer is frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 12, hidden: int = 16, d_out: int = 5, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, bias=bias)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(torch.tanh(self.fc1(x))))


class ConvNet(nn.Module):
    """Conv2d (grouped), GroupNorm, Conv1d over rows, Linear head.  [B, 3, H, W] -> [B, classes]."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, groups=2)
        self.conv1d = nn.Conv1d(8, 6, 2, padding="same", padding_mode="reflect")
        self.head = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = self.conv1d(x.flatten(2))
        return self.head(x.mean(-1))


class TwoBranch(nn.Module):
    """Modules defined in one order and run in another; a frozen first layer; two branches summed."""

    def __init__(self, d_in: int = 10, d_out: int = 3):
        super().__init__()
        self.head = nn.Linear(8, d_out)
        self.branch_b = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8))
        self.branch_a = nn.Linear(8, 8, bias=False)
        self.stem = nn.Linear(d_in, 8)
        self.stem.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        return self.head(self.branch_a(h) + self.branch_b(h))
