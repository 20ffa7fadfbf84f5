"""Launch heuristics for the Linear norm kernels: the cost rule and a fixed block-size table.

No autotuning: block sizes come from (T, d, p, dtype) buckets, and B enters only through two
occupancy choices against the device's program target (Gram BT in {16, 32, 64}; psg split or
not), so a batch size that changes every DP step picks among a few compiled variants, never
re-tunes, and no trial launch can leak into the results.

Kernels (see linear_norm.py):
    gram  sum over T-tile pairs (s, t) of <A_s A_t^T, G_s G_t^T>_F     2 B T^2 (d + p) flops
    psg   sum over (BP x BD) tiles of W_i = G_i^T A_i of ||tile||_F^2   2 B T d p flops
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .formulas import choose_method

KERNELS = ("auto", "gram", "psg")

# A T split stores every split's fp32 tiles: at most this many bytes (the kernels' extra memory).
SPLIT_BUFFER_BYTES = 12 * 2**20

# Tile sizes of the CPU PyTorch path (tiled.py): large tiles, since every tile step is one bmm call.
TILED_BT = 256
TILED_BPD = 256


@dataclass(frozen=True)
class GramConfig:
    """Gram-tile launch: BT rows per T tile (both tiles of a pair), BK columns of A or G per dot."""

    BT: int
    BK: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class PsgConfig:
    """Per-sample-gradient-tile launch: a BP x BD tile of W_i, BT rows per dot, TS rows per T split.

    The T axis is cut into ceil(T / TS) splits, one program each; TS >= T means no split.
    """

    BP: int
    BD: int
    BT: int
    TS: int
    num_warps: int = 4
    num_stages: int = 2

    def splits(self, T: int) -> int:
        """Number of T splits NS = ceil(T / TS) (at least 1)."""
        return max(1, cdiv(T, self.TS))


Config = Union[GramConfig, PsgConfig]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def interpreting() -> bool:
    """True when TRITON_INTERPRET is set the way Triton reads it (Triton kernels then run on CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")


# How much slower a Gram-kernel flop is than a per-sample-gradient-tile flop (measured on an H200 with
# ``python benchmarks/kernel_bench.py``: fp32 Gram 13-50% of its floor against 80-93% for the tiles;
# 16-bit Gram 65-80% against 85-100%, at shapes where the floor is >= 0.05 ms).
GRAM_FLOP_COST = {torch.float32: 3.0, torch.bfloat16: 1.5, torch.float16: 1.5}


def choose_kernel(B: int, T: int, d: int, p: int, dtype: Optional[torch.dtype] = None) -> str:
    """'gram' where its flops, weighted by GRAM_FLOP_COST[dtype], are fewer than the tiles' flops:
    c 2 B T^2 (d + p) < 2 B T d p, else 'psg'.  Without a dtype: the plain flop rule of
    formulas.choose_method (c = 1), which the CPU tiling uses."""
    if dtype is None:
        return "gram" if choose_method(B, T, d, p) == "ghost" else "psg"
    return "gram" if GRAM_FLOP_COST[dtype] * T * (d + p) < d * p else "psg"


def resolve_kernel(method: str, config: Optional[Config], B: int, T: int, d: int, p: int, dtype: Optional[torch.dtype] = None) -> str:
    """The kernel ("gram" or "psg") for ``method``; a given ``config`` must be of that kernel's type."""
    if method not in KERNELS:
        raise ValueError(f"method must be one of {KERNELS}, got {method!r}")
    kernel = choose_kernel(B, T, d, p, dtype) if method == "auto" else method
    if config is not None and not isinstance(config, GramConfig if kernel == "gram" else PsgConfig):
        raise ValueError(f"kernel {kernel!r} cannot run with {config!r}")
    return kernel


def block(n: int, low: int, high: int) -> int:
    """Next power of two >= n, clamped to [low, high] (tl.dot needs every block dim >= 16)."""
    return max(low, min(high, 1 << max(0, n - 1).bit_length()))


def gram_config(B: int, T: int, d: int, p: int, dtype: torch.dtype, programs: int) -> GramConfig:
    """Gram blocks: BT <= 64 (two BT x BT fp32 accumulators live in registers), halved down to 16
    while the B * NT (NT + 1) / 2 tile pairs (NT = ceil(T / BT)) fill fewer than ``programs``."""
    BT = block(T, 16, 64)
    while BT > 16 and B * cdiv(T, BT) * (cdiv(T, BT) + 1) // 2 < programs:
        BT //= 2
    if dtype == torch.float32:
        return GramConfig(BT=BT, BK=block(max(d, p), 16, 32), num_warps=4, num_stages=3)
    return GramConfig(BT=BT, BK=block(max(d, p), 16, 64), num_warps=4, num_stages=4)


def split_for(tiles: int, T: int, BT: int, programs: int) -> int:
    """Number of T ranges NS so that about ``programs`` programs run, each range >= 4 dot steps."""
    return max(1, min(cdiv(programs, max(tiles, 1)), T // (4 * BT)))


def psg_config(B: int, T: int, d: int, p: int, dtype: torch.dtype, programs: int) -> PsgConfig:
    """Per-sample-gradient blocks and the T split.

    16-bit inputs (tensor cores): 128 x 256 tiles of W_i with 8 warps, unless those tiles would need a
    T split where 128 x 128 tiles (4 warps) would not; BT = 64, 3 stages.  fp32 inputs (exact ieee
    dot on CUDA cores): 64 x 64 tiles, BT = 32, 3 stages.  When the B * NP * ND tiles fill fewer than
    ``programs``, T is split into NS ranges of TS rows (a multiple of BT) so that about ``programs``
    programs run, as long as the split's fp32 tile partials (NS * tiles * BP * BD * 4 bytes) stay within
    SPLIT_BUFFER_BYTES.
    (Chosen from ``python benchmarks/kernel_bench.py --tune`` on an H200.)
    """
    if dtype == torch.float32:
        BP, BD, BT, warps = block(p, 16, 64), block(d, 16, 64), block(T, 16, 32), 4
    else:
        BT = block(T, 16, 64)
        BP, BD, warps = block(p, 16, 128), block(d, 16, 256), 8
        BD_small = block(d, 16, 128)
        wide_splits = split_for(B * cdiv(p, BP) * cdiv(d, BD), T, BT, programs)
        narrow_splits = split_for(B * cdiv(p, BP) * cdiv(d, BD_small), T, BT, programs)
        if wide_splits > 1 and narrow_splits == 1:
            BD, warps = BD_small, 4
    tiles = B * cdiv(p, BP) * cdiv(d, BD)
    NS = min(split_for(tiles, T, BT, programs), max(1, SPLIT_BUFFER_BYTES // (tiles * BP * BD * 4)))
    TS = cdiv(cdiv(T, NS), BT) * BT
    return PsgConfig(BP=BP, BD=BD, BT=BT, TS=TS, num_warps=warps, num_stages=3)


def tiled_gram_config(T: int, d: int, p: int) -> GramConfig:
    """CPU tiles for the Gram path: BT rows per tile, and all of d (or p) in one K step."""
    return GramConfig(BT=min(TILED_BT, max(T, 1)), BK=max(d, p, 1))


def tiled_psg_config(T: int, d: int, p: int) -> PsgConfig:
    """CPU tiles for the per-sample-gradient path (no T split on CPU)."""
    return PsgConfig(BP=min(TILED_BPD, p), BD=min(TILED_BPD, d), BT=min(4 * TILED_BT, max(T, 1)), TS=max(T, 1))
