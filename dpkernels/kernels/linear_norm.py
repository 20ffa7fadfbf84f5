"""Triton kernels for the per-sample squared norms of an ``nn.Linear`` gradient.

    A: [B, T, d]  layer input,  G: [B, T, p]  output gradient (any strides, fp32 / bf16 / fp16)
    W_i = G_i^T A_i  [p, d],    b_i = sum_t g_{i,t}  [p]
    weight_sq[i] = ||W_i||_F^2, bias_sq[i] = ||b_i||^2   (float32)

Two exact kernels, both writing one fp32 partial per program with plain stores (no atomics);
the partials are reduced with torch afterwards in a fixed order, so results are deterministic.

    gram  grid (B * NT * NT,), NT = ceil(T / BT): program (i, s, t) with s <= t computes
          c_st <A_s A_t^T, G_s G_t^T>_F and c_st sum(G_s G_t^T), c_st = 1 if s = t else 2;
          programs with s > t store 0.  Tiles hold BT x BT fp32 in registers; no T x T Gram
          ever reaches memory.
    psg   grid (B * NP * ND * NS,): program (i, P-tile, D-tile, split k) accumulates the
          BP x BD tile of G_i^T A_i over its T range [k TS, min((k + 1) TS, T)) in BT-row dot
          steps (tiles ordered in bands of TILE_GROUP P-tiles for L2 reuse).  Without a split
          (NS = 1) it stores ||tile||_F^2; with a split it stores the tile itself and torch sums
          the NS tiles before squaring (norms do not add over T).
          Programs with D-tile 0 also store the column sums of their G tile (the bias partial).

fp32 inputs use the exact ieee dot (no TF32); 16-bit inputs use tensor cores with fp32
accumulation.  Program ids and tile base offsets are int64, so B * T * d may exceed 2^31; offsets
inside a tile are int32 (tile_addressable copies the rare input whose strides would overflow them).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .heuristics import Config, GramConfig, PsgConfig, cdiv, gram_config, interpreting, psg_config, resolve_kernel


@triton.jit
def _dot(b_x, b_y, b_acc, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """b_acc + b_x @ b_y in fp32.  DOT_F32 upcasts the operands first (mixed dtypes, or bf16 in
    the interpreter, whose bf16 dot multiplies the raw bit patterns)."""
    if DOT_F32:
        b_x = b_x.to(tl.float32)
        b_y = b_y.to(tl.float32)
    return tl.dot(b_x, b_y, b_acc, input_precision=PRECISION)


@triton.jit
def _gram_tile(p_x, s_t, s_k, T, K, n_k, i_s, i_t,
               BT: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """S = X_s X_t^T for the row tiles s, t of BT rows, summed over n_k column chunks of BK.

    p_x: base pointer of one sample X [T, K] (strides s_t, s_k); i_s, i_t: int64 tile ids.
    Returns [BT, BT] fp32 (rows >= T and columns >= K load as 0).
    """
    o_r = tl.arange(0, BT)
    o_c = tl.arange(0, BK)
    m_s = i_s * BT + o_r < T
    m_t = i_t * BT + o_r < T
    o_x = o_r[:, None] * s_t + o_c[None, :] * s_k
    p_s = p_x + i_s * BT * s_t
    p_t = p_x + i_t * BT * s_t
    b_s = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, n_k):
        m_k = i_k * BK + o_c < K
        b_xs = tl.load(p_s + o_x, mask=m_s[:, None] & m_k[None, :], other=0.0)
        b_xt = tl.load(p_t + o_x, mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_s = _dot(b_xs, tl.trans(b_xt), b_s, PRECISION, DOT_F32)
        p_s += BK * s_k
        p_t += BK * s_k
    return b_s


@triton.jit
def _gram_norm_kernel(
    A, G, W_PART, BIAS_PART,
    T, D, P, NT,
    s_ab, s_at, s_ad, s_gb, s_gt, s_gp,
    BT: tl.constexpr, BK: tl.constexpr,
    WITH_BIAS: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """W_PART[n] = c_st <A_s A_t^T, G_s G_t^T>_F, BIAS_PART[n] = c_st sum(G_s G_t^T).

    Program n -> sample i = n // NT^2, tile pair (s, t) = ((n // NT) % NT, n % NT);
    c_st = 2 for s < t, 1 for s = t; for s > t no chunk is loaded and 0 is stored.
    W_PART, BIAS_PART: [B * NT * NT] fp32.
    """
    i_n = tl.program_id(0).to(tl.int64)
    i_b = i_n // (NT * NT)
    i_s = (i_n // NT) % NT
    i_t = i_n % NT
    n_d = tl.where(i_s <= i_t, tl.cdiv(D, BK), 0)
    n_p = tl.where(i_s <= i_t, tl.cdiv(P, BK), 0)
    b_sa = _gram_tile(A + i_b * s_ab, s_at, s_ad, T, D, n_d, i_s, i_t, BT, BK, PRECISION, DOT_F32)
    b_sg = _gram_tile(G + i_b * s_gb, s_gt, s_gp, T, P, n_p, i_s, i_t, BT, BK, PRECISION, DOT_F32)
    c_st = tl.where(i_s < i_t, 2.0, 1.0)
    tl.store(W_PART + i_n, tl.sum(b_sa * b_sg) * c_st)
    if WITH_BIAS:
        tl.store(BIAS_PART + i_n, tl.sum(b_sg) * c_st)


@triton.jit
def _grouped_tile(j, NP, ND, GROUP: tl.constexpr):
    """Tile j of an NP x ND grid -> (i_p, i_d), column-major inside row bands of GROUP P-tiles, so that
    programs running together share GROUP tiles of G and few tiles of A in L2 (as in Triton's matmul)."""
    band = GROUP * ND
    first = (j // band) * GROUP
    rows = tl.minimum(NP - first, GROUP)
    return first + (j % band) % rows, (j % band) // rows


@triton.jit
def _psg_norm_kernel(
    A, G, W_PART, BIAS_PART,
    T, D, P, NP, ND, NS, TS,
    s_ab, s_at, s_ad, s_gb, s_gt, s_gp,
    BP: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
    SPLIT: tl.constexpr, WITH_BIAS: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """One BP x BD tile of W_i = G_i^T A_i over the T range [k TS, min((k + 1) TS, T)).

    Program n = (i * NP * ND + j) * NS + k, with tile j -> (i_p, i_d) grouped by _grouped_tile.
    SPLIT = False: W_PART[n] = ||tile||_F^2 (W_PART: [B * NP * ND] fp32).
    SPLIT = True:  W_PART[n] = tile (W_PART: [B * NP * ND * NS, BP * BD] fp32, zero outside p, d).
    i_d = 0 programs store the column sums of their G rows: BIAS_PART[i, k, i_p BP : (i_p + 1) BP]
    (BIAS_PART: [B, NS, NP * BP] fp32, zero beyond p).
    """
    i_n = tl.program_id(0).to(tl.int64)
    i_k = (i_n % NS).to(tl.int32)
    i_b = i_n // (NS * ND * NP)
    i_p, i_d = _grouped_tile((i_n // NS) % (NP * ND), NP, ND, GROUP)
    o_r = tl.arange(0, BT)
    o_p = tl.arange(0, BP)
    o_d = tl.arange(0, BD)
    m_p = i_p * BP + o_p < P
    m_d = i_d * BD + o_d < D
    t_start = i_k * TS
    n_t = tl.minimum(t_start + TS, T) - t_start
    p_g = G + i_b * s_gb + t_start.to(tl.int64) * s_gt + i_p * BP * s_gp + o_r[:, None] * s_gt + o_p[None, :] * s_gp
    p_a = A + i_b * s_ab + t_start.to(tl.int64) * s_at + i_d * BD * s_ad + o_r[:, None] * s_at + o_d[None, :] * s_ad
    b_w = tl.zeros([BP, BD], dtype=tl.float32)
    b_bias = tl.zeros([BP], dtype=tl.float32)
    for i_t in range(0, tl.cdiv(n_t, BT)):
        m_t = i_t * BT + o_r < n_t
        b_g = tl.load(p_g, mask=m_t[:, None] & m_p[None, :], other=0.0)
        b_a = tl.load(p_a, mask=m_t[:, None] & m_d[None, :], other=0.0)
        b_w = _dot(tl.trans(b_g), b_a, b_w, PRECISION, DOT_F32)
        if WITH_BIAS:
            b_bias += tl.sum(b_g.to(tl.float32), axis=0)
        p_g += BT * s_gt
        p_a += BT * s_at
    if SPLIT:
        tl.store(W_PART + i_n * (BP * BD) + o_p[:, None] * BD + o_d[None, :], b_w)
    else:
        tl.store(W_PART + i_n, tl.sum(b_w * b_w))
    if WITH_BIAS:
        if i_d == 0:
            tl.store(BIAS_PART + (i_b * NS + i_k) * (NP * BP) + i_p * BP + o_p, b_bias)


Norms = Tuple[torch.Tensor, Optional[torch.Tensor]]
INT32_MAX = 2**31 - 1
TILE_GROUP = 8  # P-tiles per band of the psg program order (_grouped_tile)


def tile_addressable(X: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """X, or a contiguous copy of X if the offsets inside a rows x cols tile overflow int32.

    The kernels add int32 in-tile offsets (r s_t + c s_k) to int64 tile base pointers; only
    exotic strides (a row stride above 2^31 / BT) need the copy.  X: [B, T, K].
    """
    _, s_t, s_k = X.stride()
    return X if (rows - 1) * s_t + (cols - 1) * s_k <= INT32_MAX else X.contiguous()


@functools.lru_cache(maxsize=None)
def _cuda_programs(index: int) -> int:
    """Programs that fill one wave twice over: 2 x the SM count of CUDA device ``index``."""
    return 2 * torch.cuda.get_device_properties(index).multi_processor_count


def programs_target(device: torch.device) -> int:
    """How many programs a launch should reach before splitting work further (1 off CUDA)."""
    if device.type != "cuda":
        return 1
    return _cuda_programs(device.index if device.index is not None else torch.cuda.current_device())


def dot_mode(a_dtype: torch.dtype, g_dtype: torch.dtype) -> Tuple[str, bool]:
    """(input_precision, DOT_F32).  fp32 -> exact "ieee"; 16-bit -> tensor cores (the default
    "tf32" setting only affects fp32 operands); mixed dtypes, or bf16 under the interpreter,
    -> operands upcast to fp32 with "ieee"."""
    dot_f32 = a_dtype != g_dtype or (interpreting() and torch.bfloat16 in (a_dtype, g_dtype))
    return ("ieee" if dot_f32 or a_dtype == torch.float32 else "tf32"), dot_f32


def gram_norm_sq(A: torch.Tensor, G: torch.Tensor, with_bias: bool, cfg: GramConfig) -> Norms:
    """Launch the Gram-tile kernel and reduce its [B, NT^2] partials.  -> ([B], [B] or None) fp32."""
    B, T, d = A.shape
    p = G.shape[-1]
    A, G = tile_addressable(A, cfg.BT, cfg.BK), tile_addressable(G, cfg.BT, cfg.BK)
    NT = cdiv(T, cfg.BT)
    precision, dot_f32 = dot_mode(A.dtype, G.dtype)
    w_part = torch.empty(B * NT * NT, dtype=torch.float32, device=A.device)
    bias_part = torch.empty(B * NT * NT, dtype=torch.float32, device=A.device) if with_bias else w_part
    _gram_norm_kernel[(B * NT * NT,)](
        A, G, w_part, bias_part, T, d, p, NT, *A.stride(), *G.stride(),
        BT=cfg.BT, BK=cfg.BK, WITH_BIAS=with_bias, PRECISION=precision, DOT_F32=dot_f32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    weight = w_part.view(B, -1).sum(1)
    return weight, (bias_part.view(B, -1).sum(1) if with_bias else None)


def psg_norm_sq(A: torch.Tensor, G: torch.Tensor, with_bias: bool, cfg: PsgConfig) -> Norms:
    """Launch the per-sample-gradient-tile kernel and reduce its partials.  -> ([B], [B] or None) fp32.

    NS = 1: partials [B, NP ND] of squared tile norms, summed.
    NS > 1: tiles [B, NP ND, NS, BP BD], summed over the splits, then squared and summed.
    Bias: column sums [B, NS, NP BP], summed over the splits, then squared and summed.
    """
    B, T, d = A.shape
    p = G.shape[-1]
    A, G = tile_addressable(A, cfg.BT, cfg.BD), tile_addressable(G, cfg.BT, cfg.BP)
    NP, ND, NS = cdiv(p, cfg.BP), cdiv(d, cfg.BD), cfg.splits(T)
    n = B * NP * ND * NS
    precision, dot_f32 = dot_mode(A.dtype, G.dtype)
    w_part = torch.empty((n, cfg.BP * cfg.BD) if NS > 1 else (n,), dtype=torch.float32, device=A.device)
    bias_part = torch.empty((B, NS, NP * cfg.BP), dtype=torch.float32, device=A.device) if with_bias else w_part
    _psg_norm_kernel[(n,)](
        A, G, w_part, bias_part, T, d, p, NP, ND, NS, cfg.TS, *A.stride(), *G.stride(),
        BP=cfg.BP, BD=cfg.BD, BT=cfg.BT, GROUP=TILE_GROUP,
        SPLIT=NS > 1, WITH_BIAS=with_bias, PRECISION=precision, DOT_F32=dot_f32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if NS > 1:
        weight = w_part.view(B, NP * ND, NS, -1).sum(2).square_().sum((1, 2))
    else:
        weight = w_part.view(B, -1).sum(1)
    return weight, (bias_part.sum(1).square_().sum(1) if with_bias else None)


def linear_norm_sq(
    A: torch.Tensor, G: torch.Tensor, with_bias: bool, method: str = "auto", config: Optional[Config] = None
) -> Norms:
    """(||G_i^T A_i||_F^2, ||sum_t g_{i,t}||^2 or None) by the Triton kernels, both [B] fp32.

    A: [B, T, d], G: [B, T, p] with B, T, d, p >= 1 on one CUDA device (or CPU when interpreting).
    method: "gram", "psg" or "auto" (heuristics.choose_kernel); config overrides the block table.
    """
    B, T, d = A.shape
    p = G.shape[-1]
    dtype = torch.float32 if torch.float32 in (A.dtype, G.dtype) else A.dtype
    kernel = resolve_kernel(method, config, B, T, d, p, dtype)
    guard = torch.cuda.device(A.device) if A.is_cuda else contextlib.nullcontext()
    with guard:
        if kernel == "gram":
            return gram_norm_sq(A, G, with_bias, config or gram_config(B, T, d, p, dtype, programs_target(A.device)))
        return psg_norm_sq(A, G, with_bias, config or psg_config(B, T, d, p, dtype, programs_target(A.device)))
