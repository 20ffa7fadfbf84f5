"""The clipping coefficient of every sample, Opacus's flat rule:

    c_i = min(1, C / (||g_i|| + 1e-6))        norms ||g_i||: [B] -> c: [B]

The float64 oracle (dpkernels/reference.py) states the same rule on its own; tests pin both.
"""

from __future__ import annotations

import torch

CLIP_EPS = 1e-6  # Opacus's: keeps C / ||g_i|| finite for a zero gradient


def clip_coefficients(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """c_i = min(1, C / (||g_i|| + 1e-6)).  norms: [B] -> [B], same dtype."""
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
