"""The root module's own parameters: a bare ``nn.Parameter`` on the model itself (a ViT's class token
or position embedding), which no layer rule covers because the root's forward is the whole model.

Sample i's gradient of a root parameter P is the vector-Jacobian product

    g_i = (d y_i / d P)^T G_i      y_i: the model's output for sample i alone   [1, ...]
                                   G_i: sample i's rows of d loss / d output    [1, ...]

so it is computed by running the model again on each sample alone (hooks off) and backpropagating
G_i to P only.  This is exact when the forward treats samples independently and draws no random
numbers, and both are checked: the forward must leave the random number generators untouched, and
the outputs of the samples run alone must reproduce the batch's output.  Cost: B forward and
backward passes of one sample each, once per step; the other layers keep their own rules.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import LayerInputError, UnsupportedModuleError
from ..layers.materialised import MaterialisedGrads


def root_parameter_names(model: nn.Module) -> List[str]:
    """Names of the trainable parameters the root owns directly (recurse=False)."""
    return [n for n, p in model.named_parameters(recurse=False) if p.requires_grad]


def rng_states(model: nn.Module) -> list:
    """The CPU generator's state and that of every GPU holding the model's parameters."""
    states = [torch.random.get_rng_state()]
    for device in sorted({p.device for p in model.parameters() if p.is_cuda}, key=str):
        states.append(torch.cuda.get_rng_state(device))
    return states


def sample(x, i: int, B: int):
    """Sample i of a batch-first tensor [B, ...] -> [1, ...]; other values are passed unchanged."""
    return x[i : i + 1] if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == B else x


class RootForward:
    """One forward call of the root, recorded for its per-sample vector-Jacobian products.

    args, kwargs: the forward's inputs; outputs: its floating-point output tensors [B, ...] (flattened
    from any output structure); grads: their gradients, filled in by tensor hooks during backward.
    """

    def __init__(self, model: nn.Module, args, kwargs, output, rng_before: list):
        self.model, self.args, self.kwargs = model, args, kwargs
        flat = [t for t in tree_flatten(output)[0] if torch.is_tensor(t) and t.requires_grad]
        if any(not torch.equal(a, b) for a, b in zip(rng_before, rng_states(model))):
            raise UnsupportedModuleError(
                "the model's forward draws random numbers (dropout?), so the per-sample gradients of the "
                f"root's own parameters {root_parameter_names(model)} cannot be recomputed exactly: set "
                "dropout to 0 or model.eval() for those modules, or move the parameters into a supported layer"
            )
        self.outputs = [t.detach() for t in flat]
        self.grads: List[Optional[torch.Tensor]] = [None] * len(flat)
        for k, t in enumerate(flat):
            t.register_hook(self._grad_hook(k))

    def _grad_hook(self, k: int):
        def store(grad: torch.Tensor) -> None:
            self.grads[k] = grad.detach() if self.grads[k] is None else self.grads[k] + grad.detach()

        return store

    @property
    def batch_size(self) -> int:
        return self.outputs[0].shape[0]

    def samples(self) -> MaterialisedGrads:
        """Per-sample gradients {name: [B, *shape]} of the root's own trainable parameters."""
        names = root_parameter_names(self.model)
        params = [getattr(self.model, n) for n in names]
        used = [k for k, g in enumerate(self.grads) if g is not None]
        B = self.batch_size
        if any(t.dim() == 0 or t.shape[0] != B for t in self.outputs):
            raise LayerInputError(f"the model's outputs must all start with the batch dimension ({B}) for the root's parameters {names}")
        per_sample: Dict[str, list] = {n: [] for n in names}
        rows = [[] for _ in self.outputs]
        for i in range(B):
            with torch.enable_grad():
                out = [t for t in tree_flatten(self.model(*tree_map(lambda x: sample(x, i, B), self.args), **tree_map(lambda x: sample(x, i, B), self.kwargs)))[0] if torch.is_tensor(t) and t.requires_grad]
            grads = torch.autograd.grad([out[k] for k in used], params, [self.grads[k][i : i + 1] for k in used], allow_unused=True)
            for n, p, g in zip(names, params, grads):
                per_sample[n].append(torch.zeros_like(p) if g is None else g)
            for k, t in enumerate(out):
                rows[k].append(t.detach())
        self._check_samples_independent(rows)
        return MaterialisedGrads(self.model, {n: torch.stack(gs) if gs else params[j].new_zeros((0, *params[j].shape)) for j, (n, gs) in enumerate(per_sample.items())})

    def _check_samples_independent(self, rows: list) -> None:
        """The samples run alone must give the batch's output (up to the rounding of other kernel
        shapes): a forward that mixes samples (batch statistics) has no per-sample gradients."""
        for batch_out, alone in zip(self.outputs, rows):
            if not alone:
                continue
            alone = torch.cat(alone)
            tolerance = 1e-2 if batch_out.dtype in (torch.bfloat16, torch.float16) else 1e-4
            error = (alone.double() - batch_out.double()).norm()
            if error > tolerance * batch_out.double().norm() + 1e-12:
                raise LayerInputError(
                    f"the model's output for each sample alone differs from its output in the batch (relative "
                    f"difference {float(error / (batch_out.double().norm() + 1e-300)):.2g}): its forward mixes samples, "
                    f"so the root's parameters {root_parameter_names(self.model)} have no per-sample gradients"
                )
