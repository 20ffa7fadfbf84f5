"""Layers of other packages with dpkernels rules, against the float64 per-sample oracle:
``transformers`` Conv1D (a Linear with its weight stored [in, out]) and RMSNorms (T5, Llama family);
and the class-hierarchy lookup of rules (subclasses that keep or change their family's forward)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpkernels.layers import LinearSamples, NormLayerSamples, TransposedLinearSamples, rule_for
from dpkernels.reference import float64_copy, layer_per_sample_grads
from dpkernels.testing import check_against_oracle

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.t5.modeling_t5 import T5LayerNorm  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B, T, d, p", [(3, 5, 4, 6), (1, 1, 3, 2), (4, 4, 7, 3), (0, 3, 4, 5), (2, 13, 2, 2)])
@pytest.mark.parametrize("method, keep", [("auto", False), ("ghost", False), ("direct", False), ("auto", True)])
def test_conv1d_matches_oracle(dtype, B, T, d, p, method, keep):
    torch.manual_seed(0)
    module = Conv1D(p, d).to(dtype)
    x, G = torch.randn(B, T, d, dtype=dtype), torch.randn(B, T, p, dtype=dtype)
    coef = torch.rand(B, dtype=dtype)
    magnitude = layer_per_sample_grads(module, (x.abs(),), G.abs())
    view = TransposedLinearSamples(module, (x,), G, method=method, keep=keep)
    check_against_oracle(view, module, (x,), G, coef, magnitude)


def unit_magnitudes(module, x, G):
    """Per-sample gradients with positive summands: sum_n |g| |x_hat| (x_hat from the layer with w = 1)."""
    unit = float64_copy(module)
    with torch.no_grad():
        unit.weight.fill_(1.0)
        x_hat = unit(x.double())
    return layer_per_sample_grads(module, (x,), G.abs() * x_hat.sign())


@pytest.mark.parametrize("layer", [T5LayerNorm, LlamaRMSNorm])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(3, 5, 8), (1, 1, 4), (4, 4, 2, 6), (0, 2, 3)])
def test_transformers_rmsnorms_match_oracle(layer, dtype, shape):
    """y = w * h(x) with h computed as each class computes it (float32 statistics)."""
    torch.manual_seed(0)
    module = layer(shape[-1], eps=1e-3).to(dtype)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
    x, G = 3 * torch.randn(shape, dtype=dtype) + 1, torch.randn(shape, dtype=dtype)
    coef = torch.rand(shape[0], dtype=dtype)
    assert rule_for(module) is NormLayerSamples
    check_against_oracle(NormLayerSamples(module, (x,), G), module, (x,), G, coef, unit_magnitudes(module, x, G))


def test_t5_layernorm_with_half_weights_multiplies_in_the_weights_dtype():
    """T5 casts h to the weight's dtype when that is bf16: the rule's h is the forward's h exactly."""
    module = T5LayerNorm(6).to(torch.bfloat16)
    x = torch.randn(2, 3, 6, dtype=torch.bfloat16)
    G = torch.randn(2, 3, 6, dtype=torch.bfloat16)
    w = module.weight
    y = module(x)
    (grad,) = torch.autograd.grad((y.float() * G.float()).sum(), w)  # the summed gradient autograd gives
    view = NormLayerSamples(module, (x,), G)
    assert torch.allclose(view.clipped_grad(torch.ones(2))[w].float(), grad.float(), rtol=1e-2, atol=1e-2)


class SameLinear(nn.Linear):
    """A subclass that keeps nn.Linear's forward (like NonDynamicallyQuantizableLinear)."""


class ScaledLinear(nn.Linear):
    """A subclass that changes the math: y = x (2 W)^T + b."""

    def forward(self, x):
        return F.linear(x, 2 * self.weight, self.bias)


def test_rules_are_found_through_the_class_hierarchy_only_for_the_same_function():
    assert rule_for(SameLinear(2, 3)) is LinearSamples
    assert rule_for(nn.MultiheadAttention(4, 2).out_proj) is LinearSamples
    assert rule_for(ScaledLinear(2, 3)) is None  # torch.func computes it (clipping/module.py)
    assert rule_for(Conv1D(3, 2)) is TransposedLinearSamples
