"""Per-sample gradient norms and clipped gradients of ``nn.LayerNorm``, ``nn.RMSNorm`` and ``nn.GroupNorm``.

The layer is y = x_hat * w + b with x_hat the input normalised without the affine map, and w, b
broadcast over the positions that are not normalised together.  Notation (``B`` samples):
    x_hat: [B, N, P]  normalised input, P = number of entries of w (and b), N = positions sharing them
    G:     [B, N, P]  gradient of each sample's loss with respect to the layer output, same layout
Per-sample gradients: w_i = sum_n g_{i,n} * x_hat_{i,n}  [P] and b_i = sum_n g_{i,n}  [P].

These are as small as the parameters ([B, *param.shape]), so they are computed once, eagerly,
and the input and output gradient are dropped.
Layouts: LayerNorm/RMSNorm x: [B, *mid, *normalized_shape] -> N = prod(mid), P = prod(normalized_shape);
GroupNorm x: [B, C, *spatial] -> N = prod(spatial), P = C.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LayerInputError
from ..kernels.formulas import accumulation_dtype
from .materialised import MaterialisedGrads


def normalized_shape_of(module: nn.Module) -> tuple:
    """The trailing shape a LayerNorm / RMSNorm normalises (HF RMSNorms: the weight's shape)."""
    if hasattr(module, "normalized_shape"):
        return tuple(module.normalized_shape)
    return tuple(module.weight.shape)


def rms_eps(module: nn.Module, x: torch.Tensor) -> float:
    """nn.RMSNorm's epsilon (None: finfo(x.dtype).eps)."""
    return torch.finfo(x.dtype).eps if module.eps is None else module.eps


def check_shapes(module: nn.Module, x: torch.Tensor, G: torch.Tensor) -> None:
    """Raise LayerInputError unless x has the batched layout ``module`` normalises and G matches it."""
    if isinstance(module, nn.GroupNorm):
        ok = x.dim() >= 2 and x.shape[1] == module.num_channels
        expected = f"[B, {module.num_channels}, ...]"
    else:
        shape = normalized_shape_of(module)
        ok = x.dim() > len(shape) and tuple(x.shape[x.dim() - len(shape) :]) == shape
        expected = f"[B, ..., {', '.join(map(str, shape))}]"
    name = type(module).__name__
    if not ok:
        raise LayerInputError(
            f"{name} input must have shape {expected} with a batch dimension first, got {tuple(x.shape)}"
        )
    if G.shape != x.shape:
        raise LayerInputError(
            f"{name} output gradient must have the input's shape {tuple(x.shape)}, got {tuple(G.shape)}"
        )


# RMSNorms of ``transformers`` models, y = w * h(x), by qualified class name (transformers is never
# imported here) -> how their forward computes h (each checked against the oracle in tests):
#   "llama": h = (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype),  x32 = x in float32
#   "t5":    h = x * rsqrt(mean(x32^2) + eps)  (float32 statistic, x's dtype promoted with float32),
#            cast to the weight's dtype when that is float16 / bfloat16
HF_RMSNORMS = {
    "transformers.models.llama.modeling_llama.LlamaRMSNorm": "llama",
    "transformers.models.mistral.modeling_mistral.MistralRMSNorm": "llama",
    "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm": "llama",
    "transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm": "llama",
    "transformers.models.t5.modeling_t5.T5LayerNorm": "t5",
    "transformers.models.mt5.modeling_mt5.MT5LayerNorm": "t5",
}


def hf_rmsnorm_kind(module: nn.Module):
    kind = type(module)
    return HF_RMSNORMS.get(f"{kind.__module__}.{kind.__qualname__}")


def normalised_input(module: nn.Module, x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """x_hat: the input normalised without the affine map, computed in dtype ``dt``.  x: [B, ...] -> same shape."""
    xd = x.to(dt)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(xd, module.num_groups, None, None, module.eps)
    shape = normalized_shape_of(module)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(xd, shape, None, None, module.eps)
    hf = hf_rmsnorm_kind(module)
    if hf == "llama":
        x32 = x.to(torch.float32)
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)).to(x.dtype).to(dt)
    if hf == "t5":
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x_hat = x * torch.rsqrt(variance + module.variance_epsilon)
        if module.weight.dtype in (torch.float16, torch.bfloat16):
            x_hat = x_hat.to(module.weight.dtype)
        return x_hat.to(dt)
    return F.rms_norm(xd, shape, None, rms_eps(module, x))


def as_rows(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like the input, as [B, N, P] (see the module docstring)."""
    B = t.shape[0]
    if isinstance(module, nn.GroupNorm):
        C = module.num_channels
        return t.reshape(B, C, math.prod(t.shape[2:])).transpose(1, 2)
    P = math.prod(normalized_shape_of(module))
    return t.reshape(B, math.prod(t.shape[1:]) // P, P)


class NormLayerSamples(MaterialisedGrads):
    """The per-sample gradients of one LayerNorm / RMSNorm / GroupNorm call, materialised ([B, *param.shape])."""

    def __init__(self, module: nn.Module, inputs, G: torch.Tensor):
        x = inputs[0]
        check_shapes(module, x, G)
        dt = accumulation_dtype(x, G)
        B = x.shape[0]
        rows = as_rows(module, G.to(dt))
        grads = {}
        if module.weight is not None and module.weight.requires_grad:
            x_hat = as_rows(module, normalised_input(module, x, dt))
            grads["weight"] = (rows * x_hat).sum(dim=1).reshape(B, *module.weight.shape)
        if getattr(module, "bias", None) is not None and module.bias.requires_grad:
            grads["bias"] = rows.sum(dim=1).reshape(B, *module.bias.shape)
        super().__init__(module, grads)
