"""The rule of ``nn.Linear`` and ``transformers``' Conv1D: A, G, per-sample norms, clipped gradients.

Notation (one call of the layer, ``B`` samples):
    A: [B, T, d]  layer input (rank-2 inputs have T = 1, rank >= 4 inputs fold the middle dims into T)
    G: [B, T, p]  gradient of each sample's loss with respect to the layer output
Per-sample gradients: W_i = G_i^T A_i  [p, d] and b_i = sum_t g_{i,t}  [p].

The norms and clipped sums are the formulas of ``kernels/`` (ghost, direct, or the flash kernels);
this file decides, per call, which form the per-sample gradients are kept in, and owns the Linear
forward that skips autograd's weight gradients in a norms pass.
"""

from __future__ import annotations

import types
from typing import Dict

import torch
from torch import nn

from ..kernels import flash_weight_norm_sq, weight_norm_sq
from ..kernels.formulas import (
    as_sequence,
    bias_grads,
    choose_method,
    clipped_sum,
    clipped_weight_grad,
    common_dtype,
    per_sample_weight_grads,
    sum_sq,
)
from .shared import Factors


class LinearSamples:
    """The per-sample gradients of one ``nn.Linear`` call (or a ``transformers`` ``Conv1D``, see below).

    Kept as the factors (A, G), or, when ``keep`` is set (bookkeeping) and the per-sample gradients
    are cheaper than the factors (T (d + p) >= d p, where "direct" is chosen), as W_i [B, p, d]
    themselves: computed once by one bmm (the flops of the dW GEMM they replace), they give the norm
    and the clipped sum sum_i c_i W_i without a further GEMM, and take less memory than A and G.

    ``transposed``: the weight is stored [d, p] (``transformers.pytorch_utils.Conv1D``, y = x W + b):
    the same math, with every weight gradient transposed; norms are unchanged.
    """

    transposed = False

    def __init__(self, module: nn.Module, inputs, G: torch.Tensor, method: str = "auto", keep: bool = False):
        self.module = module
        p, d = module.weight.shape[::-1] if self.transposed else module.weight.shape
        A = as_sequence(inputs[0], d, f"{type(module).__name__} input")
        G = as_sequence(G, p, f"{type(module).__name__} output gradient")
        self.A, self.G = common_dtype(A, G)
        self.method = method
        with_bias = module.bias is not None and module.bias.requires_grad
        self.b = bias_grads(self.G) if with_bias else None  # [B, p], small
        self.W = None
        B, T, d = self.A.shape
        if keep and module.weight.requires_grad and choose_method(B, T, d, G.shape[-1]) == "direct":
            self.W = per_sample_weight_grads(self.A, self.G)
            self.A = self.G = None  # W and b are all that is still needed

    def _oriented(self, g: torch.Tensor) -> torch.Tensor:
        """A weight gradient [..., p, d] in the layout of the stored weight."""
        return g.transpose(-1, -2) if self.transposed else g

    def norm_sq(self) -> Dict[nn.Parameter, torch.Tensor]:
        weight, bias = self.module.weight, self.module.bias
        out = {bias: sum_sq(self.b)} if self.b is not None else {}
        if not weight.requires_grad:
            return out
        if self.W is not None:
            out[weight] = sum_sq(self.W)
        elif self.method == "flash":
            out[weight] = flash_weight_norm_sq(self.A, self.G)
        else:
            out[weight] = weight_norm_sq(self.A, self.G, self.method)
        return out

    def clipped_grad(self, coef: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
        weight, bias = self.module.weight, self.module.bias
        out = {bias: clipped_sum(self.b, coef)} if self.b is not None else {}
        if self.W is not None:
            out[weight] = self._oriented(clipped_sum(self.W, coef))
        elif weight.requires_grad:
            out[weight] = self._oriented(clipped_weight_grad(self.A, self.G, coef))
        return out

    def grad_forms(self) -> Dict[nn.Parameter, object]:
        """Each parameter's per-sample gradients as factors or materialised (layers/shared.py)."""
        weight, bias = self.module.weight, self.module.bias
        out = {bias: self.b} if self.b is not None else {}
        if self.W is not None:
            out[weight] = self._oriented(self.W)
        elif weight.requires_grad:
            # W_i = G_i^T A_i [p, d]; stored [d, p]: W_i^T = A_i^T G_i
            out[weight] = Factors(self.A, self.G) if self.transposed else Factors(self.G, self.A)
        return out


class TransposedLinearSamples(LinearSamples):
    """``transformers.pytorch_utils.Conv1D``: y = x W + b with W stored [d, p] (GPT-2's layers)."""

    transposed = True


class LinearInputGradOnly(torch.autograd.Function):
    """y = x W^T + b whose backward skips dW and db unless ``owner.wants_weight_grads()``.

    In a norms pass (ghost pass 1, bookkeeping) autograd's own weight gradients are thrown away:
    the clipped ones are formed from (A, G) instead.  Skipping them saves one 2 B T d p GEMM per
    Linear layer.  x: [B, ..., d], weight: [p, d], bias: [p] or None -> [B, ..., p].
    """

    @staticmethod
    def forward(ctx, x, weight, bias, owner):
        ctx.save_for_backward(x, weight)
        ctx.owner, ctx.has_bias = owner, bias is not None
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, G):
        sink = getattr(ctx, "output_grad_sink", None)
        if sink is not None:  # set by send_output_grad: the owner takes G here instead of from a tensor hook
            sink(G)
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (G @ weight.to(G.dtype)).to(x.dtype)
        if ctx.owner.wants_weight_grads():
            G2 = G.reshape(-1, G.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_w = (G2.t() @ x.reshape(-1, x.shape[-1]).to(G.dtype)).to(weight.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = G2.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None


def send_output_grad(y: torch.Tensor, owner, sink) -> bool:
    """If ``y`` is the output of a ``LinearInputGradOnly`` call of ``owner``'s, have its backward pass
    its output gradient G to ``sink(G)`` (what a tensor hook on ``y`` would receive, without a hook's
    cost) and return True; else False."""
    node = y.grad_fn
    if type(node) is not LinearInputGradOnly._backward_cls or node.owner is not owner:
        return False
    node.output_grad_sink = sink
    return True


def forward_skipping_weight_grads(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's forward through LinearInputGradOnly; ``module.dpkernels_owner`` decides about dW.

    A transposed layer (``transformers`` Conv1D, W stored [d, p]) passes the view W^T: its gradient
    flows back transposed, or not at all.  Where the owner wants weight gradients already at forward
    time (hooks off: ghost's second pass on a new graph, per-sample re-runs under torch.func), the
    layer's own forward."""
    if not module.dpkernels_owner.may_skip_weight_grads():
        return type(module).forward(module, x)
    weight = module.weight.t() if module.dpkernels_transposed else module.weight
    return LinearInputGradOnly.apply(x, weight, module.bias, module.dpkernels_owner)


def install_weight_grad_skipping(module: nn.Module, owner, transposed: bool = False) -> None:
    """Route ``module``'s forward through LinearInputGradOnly (bound to the module, so copies stay correct)."""
    object.__setattr__(module, "dpkernels_owner", owner)  # plain attributes, not registered submodules
    object.__setattr__(module, "dpkernels_transposed", transposed)
    module.forward = types.MethodType(forward_skipping_weight_grads, module)


def uninstall_weight_grad_skipping(module: nn.Module) -> None:
    for name in ("forward", "dpkernels_owner", "dpkernels_transposed"):
        module.__dict__.pop(name, None)
