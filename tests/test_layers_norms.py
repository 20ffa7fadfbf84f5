"""NormLayerSamples (LayerNorm, RMSNorm, GroupNorm) against the float64 per-sample oracle, and its input checks."""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from dpkernels.errors import LayerInputError
from dpkernels.layers.norms import NormLayerSamples
from dpkernels.reference import float64_copy, layer_per_sample_grads
from dpkernels.testing import check_against_oracle

SIZES = [1, 2, 3, 5, 7, 11, 13]


@st.composite
def norm_layers(draw, dtype):
    """(module, per-sample input shape): an affine LayerNorm / RMSNorm / GroupNorm with at least one parameter."""
    kind = draw(st.sampled_from(["layer", "rms", "group"]))
    if kind == "group":
        groups, per_group = draw(st.integers(1, 8)), draw(st.integers(1, 6))
        spatial = draw(st.lists(st.sampled_from(SIZES), max_size=2))
        assume(per_group * math.prod(spatial) > 1)  # torch refuses to normalise a group of one value
        eps = draw(st.sampled_from([1e-5, 1e-2]))
        return nn.GroupNorm(groups, groups * per_group, eps=eps, dtype=dtype), (groups * per_group, *spatial)
    shape = (*draw(st.lists(st.sampled_from(SIZES), max_size=1)), draw(st.integers(1, 48)))
    middle = draw(st.lists(st.sampled_from(SIZES), max_size=2))
    if kind == "layer":
        eps = draw(st.sampled_from([1e-5, 1e-2]))
        module = nn.LayerNorm(shape, eps=eps, bias=draw(st.booleans()), dtype=dtype)
    else:
        module = nn.RMSNorm(shape, eps=draw(st.sampled_from([None, 1e-6, 1e-2])), dtype=dtype)
    return module, (*middle, *shape)


@st.composite
def norm_cases(draw):
    """A norm layer, its input (offset and scaled, so normalising matters), output gradient and coefficients."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    module, sample_shape = draw(norm_layers(dtype))
    B = draw(st.integers(0, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    x = 3 * torch.randn(B, *sample_shape, generator=gen, dtype=dtype) + 1
    G = torch.randn(B, *sample_shape, generator=gen, dtype=dtype)
    coef = torch.rand(B, generator=gen, dtype=dtype)
    return module, x, G, coef


def summand_magnitudes(module, x, G):
    """{name: [B, *shape]}: the per-sample gradients with positive summands, sum_n |g| |x_hat| and sum_n |g|.

    x_hat comes from torch's own layer with a unit affine map; G |x_hat| / x_hat = |G| sign(x_hat).
    """
    unit = float64_copy(module)
    with torch.no_grad():
        unit.weight.fill_(1.0)
        if getattr(unit, "bias", None) is not None:
            unit.bias.zero_()
        x_hat = unit(x.double())
    magnitude = layer_per_sample_grads(module, (x,), G.abs())
    magnitude["weight"] = layer_per_sample_grads(module, (x,), G.abs() * x_hat.sign())["weight"]
    return magnitude


@given(norm_cases())
def test_norm_layer_matches_oracle(case):
    module, x, G, coef = case
    magnitude = summand_magnitudes(module, x, G)
    check_against_oracle(NormLayerSamples(module, (x,), G), module, (x,), G, coef, magnitude)


@pytest.mark.parametrize(
    "module",
    [
        nn.LayerNorm(4, elementwise_affine=False),
        nn.RMSNorm(4, elementwise_affine=False),
        nn.GroupNorm(2, 4, affine=False),
    ],
)
def test_no_affine_parameters_gives_empty_dicts(module):
    view = NormLayerSamples(module, (torch.randn(3, 4),), torch.randn(3, 4))
    assert view.norm_sq() == {} and view.clipped_grad(torch.ones(3)) == {}


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_frozen_parameter_is_left_out(frozen):
    module = nn.LayerNorm(4)
    getattr(module, frozen).requires_grad_(False)
    view = NormLayerSamples(module, (torch.randn(3, 2, 4),), torch.randn(3, 2, 4))
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert list(view.norm_sq()) == trainable and list(view.clipped_grad(torch.ones(3))) == trainable


@pytest.mark.parametrize(
    "module, x_shape, G_shape, match",
    [
        (nn.LayerNorm(4), (3, 5), (3, 5), r"\[B, \.\.\., 4\]"),
        (nn.LayerNorm((3, 4)), (3, 4), (3, 4), r"\[B, \.\.\., 3, 4\]"),
        (nn.RMSNorm(4), (4,), (4,), "batch dimension first"),
        (nn.GroupNorm(2, 4), (3, 6, 5), (3, 6, 5), r"\[B, 4, \.\.\.\]"),
        (nn.GroupNorm(2, 4), (4,), (4,), r"\[B, 4, \.\.\.\]"),
        (nn.LayerNorm(4), (3, 4), (3, 2, 4), r"the input's shape \(3, 4\)"),
    ],
)
def test_bad_input_is_refused(module, x_shape, G_shape, match):
    with pytest.raises(LayerInputError, match=match):
        NormLayerSamples(module, (torch.randn(x_shape),), torch.randn(G_shape))
