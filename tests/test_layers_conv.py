"""ConvSamples (Conv1d, Conv2d) against the float64 per-sample oracle, and its input checks."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dpkernels.errors import LayerInputError
from dpkernels.layers.conv import ConvSamples
from dpkernels.reference import layer_per_sample_grads
from dpkernels.testing import check_against_oracle

LENGTHS = {1: [1, 2, 3, 5, 7, 11, 13, 17], 2: [1, 2, 3, 5, 7]}


@st.composite
def spatial_dim(draw, ndim, padding, padding_mode):
    """(length, kernel, dilation, stride, padding) of one spatial dim, valid for ``padding``/``padding_mode``."""
    length = draw(st.sampled_from(LENGTHS[ndim]))
    most_pad = {"reflect": length - 1, "circular": length}.get(padding_mode, 6)
    if padding == "same":  # pads d (k - 1) in all, the larger half on the right
        kernel = draw(st.integers(1, min(5, 2 * most_pad + 1)))
        dilation = draw(st.integers(1, 3 if kernel == 1 else min(3, 2 * most_pad // (kernel - 1))))
        return length, kernel, dilation, 1, 0
    pad = 0 if padding == "valid" else draw(st.integers(0, min(2, most_pad)))
    span = length + 2 * pad
    kernel = draw(st.integers(1, min(5, span)))
    dilation = draw(st.integers(1, 3 if kernel == 1 else min(3, (span - 1) // (kernel - 1))))
    return length, kernel, dilation, draw(st.integers(1, 3)), pad


@st.composite
def conv_layers(draw, ndim, dtype):
    """(module, per-sample input shape): a Conv1d/Conv2d with 1, 2 or C_in (depthwise) groups."""
    padding = draw(st.sampled_from(["int", "same", "valid"]))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    dims = [draw(spatial_dim(ndim, padding, padding_mode)) for _ in range(ndim)]
    length, kernel, dilation, stride, pad = zip(*dims)
    grouping = draw(st.sampled_from(["one", "two", "depthwise"]))
    if grouping == "one":
        c_in, c_out, groups = draw(st.integers(1, 48)), draw(st.integers(1, 48)), 1
    elif grouping == "two":
        c_in, c_out, groups = 2 * draw(st.integers(1, 24)), 2 * draw(st.integers(1, 24)), 2
    else:
        c_in = draw(st.integers(1, 24))
        c_out, groups = c_in * draw(st.integers(1, 2)), c_in
    conv = {1: nn.Conv1d, 2: nn.Conv2d}[ndim]
    module = conv(
        c_in,
        c_out,
        kernel,
        stride=stride,
        padding=pad if padding == "int" else padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=padding_mode,
        dtype=dtype,
    )
    return module, (c_in, *length)


@st.composite
def conv_cases(draw, ndim):
    """A conv layer, its input, output gradient and coefficients, and the norm method to use."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    module, sample_shape = draw(conv_layers(ndim, dtype))
    B = draw(st.integers(0, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    x = torch.randn(B, *sample_shape, generator=gen, dtype=dtype)
    out_shape = module(torch.zeros(1, *sample_shape, dtype=dtype)).shape[1:]
    G = torch.randn(B, *out_shape, generator=gen, dtype=dtype)
    coef = torch.rand(B, generator=gen, dtype=dtype)
    return module, x, G, coef, draw(st.sampled_from(["auto", "ghost", "direct"]))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("ndim", [1, 2])
@given(data=st.data())
def test_conv_matches_oracle(ndim, data):
    module, x, G, coef, method = data.draw(conv_cases(ndim))
    magnitude = layer_per_sample_grads(module, (x.abs(),), G.abs())  # padding commutes with abs
    check_against_oracle(ConvSamples(module, (x,), G, method=method), module, (x,), G, coef, magnitude)


def test_frozen_parameters_are_left_out():
    module = nn.Conv1d(2, 3, 3)
    module.weight.requires_grad_(False)
    view = ConvSamples(module, (torch.randn(4, 2, 7),), torch.randn(4, 3, 5))
    assert list(view.norm_sq()) == [module.bias] and list(view.clipped_grad(torch.ones(4))) == [module.bias]


@pytest.mark.parametrize(
    "module, x_shape, G_shape, match",
    [
        (nn.Conv1d(2, 3, 3), (2, 7), (3, 5), r"rank 3, \[B, 2, \*spatial\].*unsqueeze"),
        (nn.Conv2d(2, 3, 3), (2, 7, 7), (3, 5, 5), r"rank 4, \[B, 2, \*spatial\]"),
        (nn.Conv2d(2, 3, 3), (4, 5, 7, 7), (4, 3, 5, 5), r"\[B, 2, \*spatial\]"),
        (nn.Conv1d(2, 3, 3), (4, 2, 7), (4, 2, 5), r"\[4, 3, \*spatial_out\]"),
        (nn.Conv1d(2, 3, 3), (4, 2, 7), (4, 3, 6), "has 6 positions .* to 5"),
    ],
)
def test_bad_input_is_refused(module, x_shape, G_shape, match):
    with pytest.raises(LayerInputError, match=match):
        ConvSamples(module, (torch.randn(x_shape),), torch.randn(G_shape))
