"""The batch dimension of every layer call, proven rather than guessed.

A tensor whose first size equals B may be per-sample data or not (T5's bucket ids are [T, T]; with
T == B nothing in the shapes tells them apart).  So, once per input signature, the model runs on
the batch's second sample and on its first two (no_grad, random number generators restored), and
every hooked layer call records the shapes of its inputs and outputs.  A dimension that is 1 in the
first run and 2 in the second is that leaf's batch dimension; a leaf whose shape did not change is
shared by every sample (position ids [1, T], bucket ids [T, T]); any other change means the batch is
folded with another dimension ([B T, d]), which no rule can split.  The second sample's output must
be the same alone and in the pair (unless the forward draws random numbers): a forward that mixes
samples (a layer called on one sample's data for all) has no per-sample gradients and is refused.

A layer with a rule called on shared inputs (a position Embedding on [1, T] ids, broadcast over the
batch) is made per-sample by expanding its output to the batch ([1, T, D] -> [B, T, D], [T, D] ->
[B, T, D]): sample i's gradient is then its own row.  That is done only where a third run (two
samples, the layer's output expanded) reproduces the second run's output; otherwise the layer's
per-sample gradients come from per-sample runs of the whole model (layers/func.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

FOLDED = "folded"  # a leaf whose batch is folded with another dimension


def rng_states(model: nn.Module) -> list:
    """The CPU generator's state and that of every GPU holding the model's parameters."""
    states = [torch.random.get_rng_state()]
    for device in sorted({p.device for p in model.parameters() if p.is_cuda}, key=str):
        states.append((device, torch.cuda.get_rng_state(device)))
    return states


def set_rng_states(states: list) -> None:
    torch.random.set_rng_state(states[0])
    for device, state in states[1:]:
        torch.cuda.set_rng_state(state, device)


def same_rng_states(a: list, b: list) -> bool:
    return torch.equal(a[0], b[0]) and all(torch.equal(x[1], y[1]) for x, y in zip(a[1:], b[1:]))


def batch_size(args, kwargs, batch_dim: int) -> Optional[int]:
    """B: the batch dimension's size in the model's first tensor input (None if it has no tensor)."""
    for x in tree_flatten((args, kwargs))[0]:
        if torch.is_tensor(x) and x.dim() > batch_dim:
            return x.shape[batch_dim]
    return None


def some_samples(tree, B: int, batch_dim: int, start: int, n: int):
    """The model's inputs cut to samples start .. start + n - 1 (tensors with B at ``batch_dim``)."""
    return tree_map(lambda x: x.narrow(batch_dim, start, n) if torch.is_tensor(x) and x.dim() > batch_dim and x.shape[batch_dim] == B else x, tree)


def signature(args, kwargs, B: int) -> tuple:
    """What the probe's result depends on: the inputs' structure, dtypes and shapes, with every size
    equal to B marked (so that a new B reuses the probe, but T == B does not)."""
    leaves, spec = tree_flatten((args, kwargs))

    def key(x):
        if torch.is_tensor(x):
            return (tuple("B" if s == B else s for s in x.shape), x.dtype, str(x.device))
        return x if isinstance(x, (int, float, bool, str, type(None))) else type(x).__name__

    return (str(spec), tuple(key(x) for x in leaves))


def shapes(tree) -> list:
    """Shapes of the tensor leaves of a pytree (None for other leaves)."""
    return [tuple(x.shape) if torch.is_tensor(x) else None for x in tree_flatten(tree)[0]]


def leaf_dim(one, two):
    """The batch dimension of a leaf from its shapes with 1 and 2 samples: an int, None (shared), FOLDED."""
    if one == two:
        return None
    if one is None or two is None or len(one) != len(two):
        return FOLDED
    changed = [d for d, (a, b) in enumerate(zip(one, two)) if a != b]
    return changed[0] if len(changed) == 1 and one[changed[0]] == 1 and two[changed[0]] == 2 else FOLDED


@dataclass
class CallPlan:
    """One layer call: the batch dimension of each input and output leaf, and how it is handled:
    "rule" / "func" (batched), "expand" (shared inputs, output expanded), "rerun" (per-sample runs of
    the model), or "refuse" (``reason``)."""

    in_dims: list
    out_dims: list
    how: str
    reason: str = ""


@dataclass
class Plan:
    calls: Dict[Tuple[nn.Module, int], CallPlan] = field(default_factory=dict)
    root_out_dims: list = field(default_factory=list)


@dataclass
class Recording:
    """What the hooks record during a probe run: (module, input shapes, output shapes) per call."""

    expand: frozenset = frozenset()
    expand_to: int = 2
    calls: List[tuple] = field(default_factory=list)


def sample_alone_matches(alone, pair, dims) -> bool:
    """The second sample's output leaves alone ([1, ...] at each batch dimension) equal its rows in
    the pair's (up to the rounding of other kernel shapes)."""
    for x, y, d in zip(tree_flatten(alone)[0], tree_flatten(pair)[0], dims):
        if torch.is_tensor(x) and x.is_floating_point() and isinstance(d, int):
            y = y.narrow(d, 1, 1)
            tolerance = 1e-2 if x.dtype in (torch.bfloat16, torch.float16) else 1e-4
            if x.shape != y.shape or (x.double() - y.double()).norm() > tolerance * y.double().norm() + 1e-12:
                return False
    return True


def outputs_match(a, b) -> bool:
    """Two runs' outputs are the same (up to rounding for floating tensors)."""
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    if sa != sb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if torch.is_tensor(x) != torch.is_tensor(y):
            return False
        if not torch.is_tensor(x):
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point():
            tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(x.dtype, 1e-2)
            scale = float(x.abs().max()) if x.numel() else 0.0
            if not torch.allclose(x, y, rtol=tol, atol=tol * scale):
                return False
        elif not torch.equal(x, y):
            return False
    return True
