"""Layer-level benchmarks: per-sample squared gradient norms, one provider per strategy.

Linear (2D and 3D inputs) over a sweep of (B, T, d, p): Opacus's own Gram einsum norm sampler, our
ghost (Gram), direct (bmm), flash (Triton on GPU, the same tiling on CPU) and auto; Embedding,
LayerNorm, RMSNorm and Conv2d with dpkernels' rules.  Each case id spells its shape and dtype
(the ids are the baseline keys).  extra_info: shapes, dtype, provider, peak bytes one call adds.
"""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample.linear import compute_linear_norm_sample
from torch import nn

from dpkernels.functional import linear_norm_sq
from dpkernels.layers import samples_of
from dpkernels.profiling import default_device

GPU = torch.cuda.is_available()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (B, T, d, p); T = 1 is the 2D (rank-2 input) case.
LINEAR_SHAPES = (
    [(16, 1024, 768, 3072), (4, 4096, 1024, 1024), (1, 16384, 1024, 1024), (1, 32768, 4096, 4096), (32, 256, 1024, 1024), (256, 1, 4096, 4096)]
    if GPU
    else [(4, 64, 48, 96), (2, 256, 64, 64), (1, 509, 32, 32), (32, 1, 128, 128)]
)
LINEAR_PROVIDERS = ("opacus", "ghost", "direct", "flash", "auto")
GRAM_BYTES_LIMIT = 16 * 2**30


def case_id(B, T, d, p, dtype):
    return f"B{B}-T{T}-d{d}-p{p}-{dtype}"


def opacus_norm_sq(A, G):
    layer = nn.Linear(A.shape[-1], G.shape[-1], bias=False, device=A.device, dtype=A.dtype)
    x = A[:, 0] if A.shape[1] == 1 else A
    g = G[:, 0] if G.shape[1] == 1 else G
    return compute_linear_norm_sample(layer, [x], g)[layer.weight] ** 2


@pytest.mark.parametrize("provider", LINEAR_PROVIDERS)
@pytest.mark.parametrize("B, T, d, p, dtype", [pytest.param(*s, dt, id=case_id(*s, dt)) for s in LINEAR_SHAPES for dt in DTYPES])
def test_linear_norm(measure, provider, B, T, d, p, dtype):
    gram_bytes = 2 * B * T * T * 4
    if provider in ("opacus", "ghost") and gram_bytes > GRAM_BYTES_LIMIT:
        pytest.skip(f"two B x T x T Grams need {gram_bytes / 2**30:.0f} GiB")
    dev = default_device()
    A = torch.randn(B, T, d, device=dev, dtype=DTYPES[dtype])
    G = torch.randn(B, T, p, device=dev, dtype=DTYPES[dtype])
    fn = (lambda: opacus_norm_sq(A, G)) if provider == "opacus" else (lambda: linear_norm_sq(A, G, provider))
    measure(fn, rounds=10 if GPU else 2, provider=provider, B=B, T=T, d=d, p=p, dtype=dtype)


def layer_case(kind: str, dtype: torch.dtype, dev):
    """(layer, inputs, G) for one non-Linear layer family at a size that fills the device."""
    B, T, d = (8, 1024, 1024) if GPU else (4, 64, 32)
    if kind == "embedding":
        V = 50257 if GPU else 503
        layer = nn.Embedding(V, d, device=dev, dtype=dtype)
        return layer, (torch.randint(0, V, (B, T), device=dev),), torch.randn(B, T, d, device=dev, dtype=dtype)
    if kind in ("layernorm", "rmsnorm"):
        layer = (nn.LayerNorm if kind == "layernorm" else nn.RMSNorm)(d, device=dev, dtype=dtype)
        return layer, (torch.randn(B, T, d, device=dev, dtype=dtype),), torch.randn(B, T, d, device=dev, dtype=dtype)
    C, H = (64, 64) if GPU else (8, 16)
    layer = nn.Conv2d(C, C, 3, padding=1, device=dev, dtype=dtype)
    return layer, (torch.randn(B, C, H, H, device=dev, dtype=dtype),), torch.randn(B, C, H, H, device=dev, dtype=dtype)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("kind", ["embedding", "layernorm", "rmsnorm", "conv2d"])
def test_layer_norm(measure, kind, dtype):
    layer, inputs, G = layer_case(kind, DTYPES[dtype], default_device())
    measure(lambda: samples_of(layer, inputs, G).norm_sq(), rounds=10 if GPU else 2, kind=kind, dtype=dtype, shape=list(G.shape))
