"""nn.Linear per-sample norms (ghost, direct, auto) and clipped gradients vs the float64 oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dpkernels.errors import LayerInputError
from dpkernels.layers.linear import LinearSamples, choose_method, weight_norm_sq
from dpkernels.reference import layer_per_sample_grads
from dpkernels.testing import assert_rel_close

PRIMES_AND_EDGES = [1, 2, 3, 5, 7, 13, 31, 61, 64]
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@st.composite
def linear_case(draw):
    B = draw(st.integers(0, 8))
    rank = draw(st.sampled_from([2, 3, 4]))
    if rank == 2:
        lead = ()
    elif rank == 3:
        lead = (draw(st.one_of(st.sampled_from(PRIMES_AND_EDGES), st.integers(1, 64))),)
    else:
        lead = (draw(st.integers(1, 4)), draw(st.integers(1, 16)))
    d, p = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    bias = draw(st.booleans())
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    return B, lead, d, p, bias, dtype


def make(B, lead, d, p, bias, dtype):
    layer = nn.Linear(d, p, bias=bias).to(dtype)
    x = torch.randn(B, *lead, d, dtype=dtype)
    G = torch.randn(B, *lead, p, dtype=dtype)
    return layer, x, G


@given(linear_case(), st.sampled_from(["auto", "ghost", "direct"]))
def test_norms_match_oracle(case, method):
    B, lead, d, p, bias, dtype = case
    layer, x, G = make(*case)
    ref = layer_per_sample_grads(layer, (x,), G)
    got = LinearSamples(layer, (x,), G, method=method).norm_sq()
    assert set(got) == set(layer.parameters())
    for name, param in layer.named_parameters():
        expected = ref[name].flatten(1).pow(2).sum(1)
        assert got[param].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_rel_close(f"{name} norm^2 ({method})", got[param], expected, dtype)


@given(linear_case(), st.booleans())
def test_clipped_grad_matches_oracle(case, keep):
    """keep=True (bookkeeping) holds per-sample gradients where T (d + p) >= d p, else (A, G)."""
    B, lead, d, p, bias, dtype = case
    layer, x, G = make(*case)
    coef = torch.rand(B, dtype=torch.float64)
    ref = layer_per_sample_grads(layer, (x,), G)
    view = LinearSamples(layer, (x,), G, keep=keep)
    T = x[0].numel() // d if B else 1
    assert (view.W is not None) == (keep and choose_method(B, T, d, p) == "direct")
    norms = view.norm_sq()
    for name, param in layer.named_parameters():
        assert_rel_close(f"{name} norm^2 (keep={keep})", norms[param], ref[name].flatten(1).pow(2).sum(1), dtype)
    got = view.clipped_grad(coef.to(dtype))
    for name, param in layer.named_parameters():
        expected = torch.einsum("b...,b->...", ref[name], coef)
        assert_rel_close(f"clipped {name}", got[param], expected, dtype)


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
