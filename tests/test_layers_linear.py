"""nn.Linear per-sample norms (ghost, direct, auto) and clipped gradients vs the float64 oracle."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dpkernels.errors import LayerInputError
from dpkernels.kernels import weight_norm_sq
from dpkernels.kernels.formulas import choose_method
from dpkernels.layers.linear import LinearSamples
from dpkernels.profiling import peak_memory
from dpkernels.reference import layer_per_sample_grads
from dpkernels.testing import assert_rel_close, check_against_oracle

PRIMES_AND_EDGES = [1, 2, 3, 5, 7, 13, 31, 61, 64]
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@st.composite
def linear_case(draw):
    """(layer, x, G): B in [0, 8], input rank 2/3/4, T up to 64 with primes, d, p in [1, 48], bias, dtype."""
    B = draw(st.integers(0, 8))
    rank = draw(st.sampled_from([2, 3, 4]))
    if rank == 2:
        lead = ()
    elif rank == 3:
        lead = (draw(st.one_of(st.sampled_from(PRIMES_AND_EDGES), st.integers(1, 64))),)
    else:
        lead = (draw(st.integers(1, 4)), draw(st.integers(1, 16)))
    d, p = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    layer = nn.Linear(d, p, bias=draw(st.booleans())).to(dtype)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=dtype))
    x = torch.randn(B, *lead, d, generator=gen, dtype=dtype)
    G = torch.randn(B, *lead, p, generator=gen, dtype=dtype)
    return layer, x, G


def magnitude(layer, x, G):
    """Per-sample gradients with every summand made positive: the scale rounding is held to."""
    return layer_per_sample_grads(layer, (x.abs(),), G.abs())


@given(linear_case(), st.sampled_from(["auto", "ghost", "direct"]))
def test_norms_and_clipped_grads_match_oracle(case, method):
    layer, x, G = case
    coef = torch.rand(x.shape[0], dtype=G.dtype)
    check_against_oracle(LinearSamples(layer, (x,), G, method=method), layer, (x,), G, coef, magnitude(layer, x, G))


@given(linear_case())
def test_kept_per_sample_gradients_match_oracle(case):
    """keep=True (bookkeeping) holds per-sample gradients where T (d + p) >= d p, else (A, G)."""
    layer, x, G = case
    B, d, p = x.shape[0], layer.in_features, layer.out_features
    view = LinearSamples(layer, (x,), G, keep=True)
    T = math.prod(x.shape[1:-1])
    assert (view.W is not None) == (choose_method(B, T, d, p) == "direct")
    check_against_oracle(view, layer, (x,), G, torch.rand(B, dtype=G.dtype), magnitude(layer, x, G))


def test_bias_norm_is_norm_of_sum_not_sum_of_norms():
    """The bias gradient of a sample is sum_t g_t; with g_t = -g_{t+1} its norm is 0, not 2||g||."""
    layer = nn.Linear(3, 4).double()
    g = torch.randn(1, 1, 4, dtype=torch.float64)
    G = torch.cat([g, -g], dim=1)
    norms = LinearSamples(layer, (torch.randn(1, 2, 3, dtype=torch.float64),), G).norm_sq()
    assert norms[layer.bias].item() == pytest.approx(0.0, abs=1e-24)


def test_method_is_chosen_per_call_from_the_shapes():
    """T changes between steps: the choice follows it (never cached on the layer)."""
    d = p = 64
    assert choose_method(4, 8, d, p) == "ghost"
    assert choose_method(4, 512, d, p) == "direct"
    layer = nn.Linear(d, p).double()
    for T in (8, 512, 8):
        x, G = torch.randn(2, T, d, dtype=torch.float64), torch.randn(2, T, p, dtype=torch.float64)
        auto = LinearSamples(layer, (x,), G).norm_sq()[layer.weight]
        forced = weight_norm_sq(x, G, choose_method(2, T, d, p))
        other = weight_norm_sq(x, G, "direct" if choose_method(2, T, d, p) == "ghost" else "ghost")
        assert torch.equal(auto, forced)
        assert_rel_close(f"T={T}", auto, other, torch.float64)


def test_low_precision_norms_accumulate_in_float32():
    """bf16 inputs: norms are float32 and within 2x of plain bf16 PyTorch's error."""
    layer = nn.Linear(32, 24).bfloat16()
    x, G = torch.randn(3, 200, 32).bfloat16(), torch.randn(3, 200, 24).bfloat16()
    ref = layer_per_sample_grads(layer, (x,), G)["weight"].reshape(3, -1).pow(2).sum(1)
    got = LinearSamples(layer, (x,), G).norm_sq()[layer.weight]
    plain_bf16 = torch.bmm(G.transpose(1, 2), x).pow(2).sum((1, 2))
    assert got.dtype == torch.float32
    assert (got.double() - ref).abs().max() <= 2 * (plain_bf16.double() - ref).abs().max() + 1e-6


@pytest.mark.parametrize("shape", [(5,), (0,)], ids=["rank1", "scalar-like"])
def test_rank_one_input_is_refused(shape):
    layer = nn.Linear(5, 2)
    x = torch.randn(*shape) if shape != (0,) else torch.randn(())
    with pytest.raises(LayerInputError, match=r"\[B, \.\.\., 5\]"):
        LinearSamples(layer, (x,), torch.randn(2))


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        weight_norm_sq(torch.randn(1, 2, 3), torch.randn(1, 2, 4), "einsum")


def test_ghost_memory_scales_with_t_squared_not_with_d_times_p():
    """The Gram strategy never materialises per-sample gradients: its extra memory is at most the two
    B x T x T Grams and a copy of the inputs, whatever d p is (a "ghost" that is really a bmm holds B d p)."""
    B, T, d, p = 4, 8, 512, 512
    A, G = torch.randn(B, T, d), torch.randn(B, T, p)
    with peak_memory(torch.device("cpu")) as ghost:
        weight_norm_sq(A, G, "ghost")
    with peak_memory(torch.device("cpu")) as direct:
        weight_norm_sq(A, G, "direct")
    assert ghost["peak_bytes"] <= 4 * (2 * B * T * T + B * T * (d + p))
    assert direct["peak_bytes"] >= B * d * p * 4 > 10 * ghost["peak_bytes"]


def test_flash_on_cpu_holds_tiles_not_t_by_t_grams():
    """The flash path's CPU tiling: memory O(tile), far below one B x T x T Gram (268 MB here)."""
    B, T, d, p = 4, 4096, 16, 16
    A, G = torch.randn(B, T, d), torch.randn(B, T, p)
    with peak_memory(torch.device("cpu")) as flash:
        got = weight_norm_sq(A, G, "flash")
    assert flash["peak_bytes"] < 16 * 2**20
    assert_rel_close("flash vs direct", got, weight_norm_sq(A.double(), G.double(), "direct"), torch.float32)
