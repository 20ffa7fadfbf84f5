"""The module wrapper shared by every dpkernels mode: hooks, per-sample norms, coefficients.

One DP step, as data:

    forward    the batch dimension of every layer call is proven (clipping/batch.py, once per input
               signature); a forward hook keeps each call of a trainable layer (inputs, batch
               dimensions) and puts a tensor hook on its outputs (a Linear's own backward,
               LinearInputGradOnly, hands G over instead)                    [all modes]
    backward   the tensor hooks see each call's output gradient G:
                 view = samples_of(layer, A, G)   (dpkernels.layers), or torch.func (layers/func.py)
                 record view.norm_sq()            (per parameter, [B] each)
                 bookkeeping modes keep the view; ghost modes drop it
    then       a parameter used by several calls (tied, a layer called twice): cross terms between
               its uses (layers/shared.py); ||g_i||^2 = sum over parameters (a few batched ops),
               c_i = min(1, C / (||g_i|| + 1e-6))
               ghost: a second backward of sum_i c_i loss_i        (clipping/ghost.py)
               bk:    p.grad += view.clipped_grad(c) per call       (clipping/bookkeeping.py)
    optimizer  Opacus's (batched loops): noise, division by the expected batch size, accountant

Output gradients are taken by tensor hooks (not module backward hooks), so an in-place operation
after a layer (ReLU(inplace=True), ``x += shortcut``) is fine: a tensor hook registered before it
receives the gradient with respect to the value before it.
Modules owning parameters without a rule (the root included) get per-sample gradients by torch.func
over their recorded call; a layer called on inputs shared by all samples has its output expanded to
the batch, or, where that changes the model, its per-sample gradients from torch.func over the root.
Under ``loss_reduction="mean"`` the hooks see G / B, so norms are scaled by B^2 and coefficients by B.
One sample (B = 1, one process): no caching, an ordinary backward and one global norm (single.py).
FSDP2 (``sharded``): each rank clips its own samples; bookkeeping's sums are averaged into the shards;
every layer input has the batch first (no probe: ranks may see different shapes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import LayerInputError, NonFiniteNormError, TiedParameterError, UnsupportedModuleError
from ..layers import LinearSamples, TransposedLinearSamples, layer_type, rule_for, samples_of
from ..layers.func import FuncSamples, unit_parameter_names, unit_recurses
from ..layers.linear import install_weight_grad_skipping, send_output_grad, uninstall_weight_grad_skipping
from ..layers.shared import cross_term
from .coefficients import clip_coefficients
from .loss import guard_outputs
from .sharded import mean_over_ranks_into_shards
from .batch import (
    FOLDED,
    CallPlan,
    Plan,
    Recording,
    batch_size,
    leaf_dim,
    outputs_match,
    rng_states,
    same_rng_states,
    sample_alone_matches,
    set_rng_states,
    shapes,
    signature,
    some_samples,
)


@dataclass
class Call:
    """One call of a hooked module in this forward pass.

    leaves, spec: its (args, kwargs) flattened, tensors detached (``versions``: their version
    counters then); in_dims / out_dims: the batch dimension of each input / output leaf;
    outputs: the output leaves (detached; torch.func calls only, else None); grads: their gradients,
    filled in by tensor hooks.
    """

    module: nn.Module
    name: str
    how: str
    leaves: list
    spec: object
    versions: list
    in_dims: list
    outputs: list
    out_dims: list
    names: List[str] = field(default_factory=list)  # torch.func: parameters differentiated (dotted)
    grads: list = field(default_factory=list)
    out_versions: list = field(default_factory=list)
    waiting: int = 0
    done: bool = False


def trainable_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Every module that owns a trainable parameter directly (recurse=False), with its name."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def hooked_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The trainable layers that get hooks: all but the children of a torch.func unit that covers its
    whole subtree (nn.MultiheadAttention), and the root when it has no rule (recorded by forward())."""
    inside = {id(c) for m in model.modules() if unit_recurses(m) for c in m.modules() if c is not m}
    return [(n, m) for n, m in trainable_layers(model) if id(m) not in inside and not (m is model and rule_for(m) is None)]


def check_supported(model: nn.Module, sharded: bool) -> None:
    """Raise one error listing every trainable module without a layer rule that torch.func cannot serve:
    on an FSDP2-sharded model, or owning a parameter that another module owns too (an alias)."""
    owners: Dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    bad = [
        f"{name or '<root>'} ({layer_type(m).__module__}.{layer_type(m).__name__})"
        for name, m in trainable_layers(model)
        if rule_for(m) is None and (sharded or any(owners[id(p)] > 1 for p in m.parameters(recurse=False)))
    ]
    if bad:
        raise UnsupportedModuleError(
            "these modules own trainable parameters but have no per-sample gradient rule usable here (an "
            "FSDP2-sharded model, or parameters aliasing those of other modules, as Opacus's DPLSTM/DPGRU/DPRNN "
            "do): " + ", ".join(bad) + ". Freeze them (requires_grad_(False)), replace them "
            "with supported layers (Linear, Embedding, LayerNorm, RMSNorm, GroupNorm, Conv1d, Conv2d, or a "
            "type with an Opacus grad sampler), or register an Opacus grad sampler for their type."
        )


def check_untied(model: nn.Module) -> None:
    """On an FSDP2-sharded model, raise if a trainable parameter is owned by several module paths."""
    owners: Dict[int, List[str]] = {}
    for mod_name, m in model.named_modules(remove_duplicate=False):
        for p_name, p in m.named_parameters(recurse=False, remove_duplicate=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    tied = [names for names in owners.values() if len(names) > 1]
    if tied:
        groups = "; ".join(" = ".join(names) for names in tied)
        raise TiedParameterError(
            f"tied or shared trainable parameters are not supported on an FSDP2-sharded model: {groups}. "
            "Untie them (copy the weight) or freeze them."
        )


@lru_cache(maxsize=None)
def positional_spec(n: int):
    """The pytree spec of ``(args, kwargs)`` for n positional leaves and no keyword arguments."""
    return tree_flatten(((0,) * n, {}))[1]


def call_leaves(args: tuple, kwargs: dict, output) -> tuple:
    """(input leaves, their spec, output leaves) of one layer call.  The common call, tensors in and
    one tensor out, skips pytree flattening (it runs for every layer call of every step)."""
    if not kwargs and torch.is_tensor(output) and all(torch.is_tensor(a) for a in args):
        return list(args), positional_spec(len(args)), [output]
    leaves, spec = tree_flatten((args, kwargs))
    return leaves, spec, tree_flatten(output)[0]


def trainable_own(module: nn.Module) -> list:
    """The module's own parameters that require a gradient now."""
    return [p for p in module._parameters.values() if p is not None and p.requires_grad]


def behind_identity(output):
    """(output, its leaves) with every tensor leaf that needs a gradient replaced by an identity view:
    a tensor hook on the view sees only the gradient from outside the module, not that from the
    module's other outputs computed from the same tensor."""
    leaves, spec = tree_flatten(output)
    leaves = [y.view_as(y) if torch.is_tensor(y) and y.requires_grad else y for y in leaves]
    return tree_unflatten(leaves, spec), leaves


def expand_to_batch(x: torch.Tensor, like_leading_one: bool, B: int) -> torch.Tensor:
    """A tensor shared by every sample as a batch (a view): [1, ...] -> [B, ...], else [...] -> [B, ...]."""
    return x.expand(B, *x.shape[1:]) if like_leading_one else x.unsqueeze(0).expand(B, *x.shape)


class HostFlag:
    """A CUDA bool that the host reads without waiting for the work queued after it.

    ``bool(t)`` of a CUDA tensor copies it to the host behind everything queued on its stream so far,
    so the host waits for all of that too: in bookkeeping, the clipped sums that are queued between the
    norms and their finiteness check.  ``post(t)`` queues the copy into pinned host memory as soon as
    ``t`` is computed, and an event marks it; ``bool(flag)`` waits for that event only, and the device
    goes on with the clipped sums while the host issues the noise and the optimizer's step.  One ATen
    call per check, as ``bool(t)`` (a copy instead of a scalar read): the pinned buffer, its numpy view
    and the event are made once per device (per wrapped model).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.host = torch.empty((), dtype=torch.bool, pin_memory=True)
        self.value = self.host.numpy()  # a view of the pinned buffer: read without an ATen call
        self.event = torch.cuda.Event()

    def post(self, flag: torch.Tensor) -> "HostFlag":
        self.host.copy_(flag, non_blocking=True)
        self.event.record(torch.cuda.current_stream(self.device))
        return self

    def __bool__(self) -> bool:
        self.event.synchronize()
        return bool(self.value)

    def __reduce__(self):
        """A copy (deepcopy, pickling: the event cannot be copied) is a flag of its own on the same
        device, holding this one's value."""
        return (HostFlag.holding, (self.device, bool(self)))

    @classmethod
    def holding(cls, device: torch.device, value: bool) -> "HostFlag":
        flag = cls(device)
        flag.value[()] = value
        return flag


class DPClippingModule(GradSampleModuleFastGradientClipping):
    """An Opacus fast-gradient-clipping module whose per-sample norms come from dpkernels' layer rules.

    Drop-in for ``opacus.grad_sample.GradSampleModuleFastGradientClipping`` (same constructor,
    ``get_norm_sample``, ``get_clipping_coef``, ``param._norm_sample``), plus:
      keep_samples:  keep every layer's per-sample view for bookkeeping (one backward pass)
      linear_norm:   "auto" (PyTorch ghost/direct by cost), "ghost", "direct" or "flash"
      sharded:       the model is sharded with FSDP2 (gradients are reduced across ranks)
    """

    def __init__(
        self,
        m: nn.Module,
        *,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        strict: bool = True,
        force_functorch: bool = False,
        max_grad_norm: float = 1.0,
        use_ghost_clipping: bool = True,
        keep_samples: bool = False,
        linear_norm: str = "auto",
        sharded: bool = False,
    ):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        check_supported(m, sharded)
        if sharded:
            check_untied(m)
        self._init_step_state(keep_samples, linear_norm, sharded)
        super().__init__(
            m,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            strict=strict,
            force_functorch=force_functorch,
            max_grad_norm=max_grad_norm,
            use_ghost_clipping=use_ghost_clipping,
        )

    def _init_step_state(self, keep_samples: bool, linear_norm: str, sharded: bool) -> None:
        # set before nn.Module.__init__ runs inside super().__init__, so stored via object.__setattr__
        state = dict(
            keep_samples=keep_samples,
            linear_norm=linear_norm,
            # under FSDP the ordinary gradient is reduced across ranks, so one local sample is not the
            # batch: the single-sample shortcut (clipping/single.py) applies on one process only
            sharded=sharded,
            _inputs={},  # (module, call index) -> Call, this forward's layer calls
            _calls_of={},  # module -> index of its last call in this forward
            _param_norm_sq=[],  # (layer name, param, per-sample squared norm [B])
            _scale=1,
            _kept=[],  # bookkeeping: the views whose clipped sums go into p.grad
            _shared=[],  # (layer name, view) of calls whose parameters have several uses
            _uses={},  # param -> number of calls using it in this forward
            _layer_names={},
            _rules={},  # hooked layer -> its per-sample rule (dpkernels.layers), or None: torch.func
            _plans={},  # input signature -> Plan (clipping/batch.py)
            _plan=None,
            _recording=None,
            _batch=None,
            _root_call=None,
            _rerun=set(),  # modules whose per-sample gradients come from torch.func over the root
            _rng_at_call={},
            _finite=None,  # (the norms are finite: a bool tensor or HostFlag, the [entries, B] table), see check_norms_finite
            _host_flags={},  # CUDA device -> its HostFlag
            single_sample_step=False,
        )
        for key, value in state.items():
            object.__setattr__(self, key, value)

    # ---- hooks -------------------------------------------------------------------------------
    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True, force_functorch: bool = False) -> None:
        """A forward hook on every module that owns trainable parameters directly (see hooked_layers)."""
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        self._module.autograd_grad_sample_hooks = []
        self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
        for name, layer in hooked_layers(self._module):
            self._layer_names[layer] = name or "<root>"
            rule = self._rules[layer] = rule_for(layer)
            self.autograd_grad_sample_hooks.append(layer.register_forward_hook(self._forward_hook, with_kwargs=True))
            if rule is None:
                self.autograd_grad_sample_hooks.append(layer.register_forward_pre_hook(self._pre_hook))
            if rule in (LinearSamples, TransposedLinearSamples):
                install_weight_grad_skipping(layer, self, transposed=rule is TransposedLinearSamples)
        self.enable_hooks()

    def remove_hooks(self) -> None:
        super().remove_hooks()
        for layer in self._layer_names:
            uninstall_weight_grad_skipping(layer)

    def _rule(self, module: nn.Module) -> Optional[type]:
        """The layer's per-sample rule, looked up once when the hooks were added."""
        return self._rules[module] if module in self._rules else rule_for(module)

    def wants_weight_grads(self) -> bool:
        """Whether autograd's own weight gradients are used: in every backward except the norms pass of
        the returned criterion (so in ghost's second pass, at B = 1, and in a copy of the model, e.g.
        ``copy.deepcopy``, trained by a plain loss, whose layers still carry a reference to this wrapper)."""
        in_norms_pass = self.hooks_enabled and self.__dict__.get("_in_private_backward", False)
        return not in_norms_pass or self.single_sample_step

    def may_skip_weight_grads(self) -> bool:
        """At forward time: whether a Linear layer routes through ``LinearInputGradOnly`` (its backward then
        asks ``wants_weight_grads``); with the hooks off or at B = 1, the layer's own forward."""
        return self.hooks_enabled and not self.single_sample_step

    def _active(self, module: nn.Module) -> bool:
        """Whether this layer call is recorded: in a forward through this wrapper, of two samples or more."""
        return bool(self._batch) and self.hooks_enabled and module.training and torch.is_grad_enabled() and not self.single_sample_step

    def forward(self, *args, **kwargs):
        self.clear_step_state()  # state of a forward pass that never got a backward pass
        if self.hooks_enabled and self._module.training and torch.is_grad_enabled():
            output = self._recorded_forward(args, kwargs)
        else:
            output = self._module(*args, **kwargs)
        guard_outputs(self, output)  # a plain loss's backward is refused (clipping/loss.py)
        return output

    def _recorded_forward(self, args, kwargs):
        """The model's forward with every layer call recorded for the per-sample norms."""
        batch_dim = 0 if self.batch_first else 1
        B = batch_size(args, kwargs, batch_dim)
        if B is None:
            raise LayerInputError(f"the model's inputs hold no tensor with a batch dimension (dimension {batch_dim})")
        self._batch = B
        if B == 1 and not self.sharded:
            # one sample: its gradient is the ordinary gradient (clipping/single.py); cache nothing
            self.single_sample_step = True
        if B == 0 or self.single_sample_step:  # an empty batch: no sample, no norm, nothing to record
            return self._module(*args, **kwargs)
        self._plan = None if self.sharded else self._plan_for(args, kwargs, B, batch_dim)
        own = [n for n, p in self._module.named_parameters(recurse=False) if p.requires_grad] if rule_for(self._module) is None else []
        record_root = bool(own or self._plan_reruns())
        rng_before = rng_states(self._module) if record_root else None
        output = self._module(*args, **kwargs)
        if record_root:
            if not same_rng_states(rng_before, rng_states(self._module)):
                raise UnsupportedModuleError(
                    "the model's forward draws random numbers (dropout?), so the per-sample gradients of "
                    f"{own + sorted(self._layer_names[m] for m in self._rerun)} cannot be recomputed exactly: "
                    "set dropout to 0 or model.eval() for those modules, or move the parameters into a supported layer"
                )
            output = self._record_root(args, kwargs, output, own, B, batch_dim)
        return output

    # ---- the batch dimension of every call (clipping/batch.py) ----------------------------------
    def _plan_for(self, args, kwargs, B: int, batch_dim: int) -> Plan:
        key = signature(args, kwargs, B)
        if key not in self._plans:
            self._plans[key] = self._probe(args, kwargs, B, batch_dim)
        return self._plans[key]

    def _run_recorded(self, args, kwargs, expand=frozenset()):
        """One no_grad run of the model with the hooks recording shapes; the RNGs are left as found.
        -> (calls, output, whether the run drew random numbers)."""
        states = rng_states(self._module)
        object.__setattr__(self, "_recording", Recording(expand=frozenset(expand)))
        try:
            with torch.no_grad():
                output = self._module(*args, **kwargs)
            return self._recording.calls, output, not same_rng_states(states, rng_states(self._module))
        finally:
            object.__setattr__(self, "_recording", None)
            set_rng_states(states)

    def _probe(self, args, kwargs, B: int, batch_dim: int) -> Plan:
        """Run the model on its second sample and on its first two; each call's leaves' batch dimensions."""
        one, two = some_samples((args, kwargs), B, batch_dim, 1, 1), some_samples((args, kwargs), B, batch_dim, 0, 2)
        calls1, out1, random1 = self._run_recorded(*one)
        calls2, out2, random2 = self._run_recorded(*two)
        if [m for m, _, _ in calls1] != [m for m, _, _ in calls2]:
            raise LayerInputError(
                "the model calls its layers in a different order for one sample and for two; the batch "
                "dimension of its layers' inputs cannot be established"
            )
        plan = Plan(root_out_dims=[leaf_dim(a, b) for a, b in zip(shapes(out1), shapes(out2))])
        if not (random1 or random2 or sample_alone_matches(out1, out2, plan.root_out_dims)):
            shared = sorted({self._layer_names[m] for (m, a, _), (_, b, _) in zip(calls1, calls2) if a and a[0] == b[0]})
            raise LayerInputError(
                "the model's output for a sample alone differs from its output in a batch: its forward mixes "
                "samples (batch statistics, or a layer called on one sample's data for all"
                + (f"; layers called on inputs without a batch dimension: {shared}" if shared else "")
                + "), so it has no per-sample gradients"
            )
        counts: Dict[nn.Module, int] = {}
        for (m, in1, o1), (_, in2, o2) in zip(calls1, calls2):
            k = counts[m] = counts.get(m, -1) + 1
            out_dims = [leaf_dim(a, b) for a, b in zip(o1, o2)]
            plan.calls[(m, k)] = self._classify(m, [leaf_dim(a, b) for a, b in zip(in1, in2)], out_dims, [d for d, a in zip(out_dims, o1) if a is not None])
        shared = {m for (m, _), c in plan.calls.items() if c.how == "expand"}
        for m in shared:  # expand one layer's output only where that leaves the model's output unchanged
            try:
                same = outputs_match(out2, self._run_recorded(*two, expand={m})[1])
            except Exception:  # the expanded output does not fit where it is used
                same = False
            if not same:
                for (mm, _), c in plan.calls.items():
                    if mm is m:
                        c.how = "rerun"
        reruns = {m for (m, _), c in plan.calls.items() if c.how == "rerun"}
        for (m, _), c in plan.calls.items():
            if m in reruns:
                c.how = "rerun"  # every call of such a layer: the per-sample runs cover them all
        return plan

    def _classify(self, module: nn.Module, in_dims: list, out_dims: list, tensor_outs: list) -> CallPlan:
        """How one call is handled, from its leaves' batch dimensions (tensor_outs: the tensor outputs')."""
        if FOLDED in in_dims or FOLDED in out_dims:
            return CallPlan(in_dims, out_dims, "refuse", "its batch dimension is folded with another dimension "
                            "(e.g. [B*T, d]) or differs between one and two samples; call it on inputs that keep "
                            "the batch as its own dimension")
        if rule_for(module) is None:
            batched = all(d is not None for d in tensor_outs)
            return CallPlan(in_dims, out_dims, "func" if batched else "rerun")
        x_dim, y_dims = in_dims[0] if in_dims else None, tensor_outs
        if x_dim is not None and len(y_dims) == 1 and y_dims[0] is not None:
            return CallPlan(in_dims, out_dims, "rule")
        if x_dim is None and all(d is None for d in y_dims) and len(y_dims) == 1:
            return CallPlan(in_dims, out_dims, "expand")
        return CallPlan(in_dims, out_dims, "refuse", f"inputs with batch dimensions {in_dims} give outputs "
                        f"with batch dimensions {out_dims}; its rule needs the batch in its first input and its output")

    def _plan_reruns(self) -> bool:
        return self._plan is not None and any(c.how == "rerun" for c in self._plan.calls.values())

    def _call_plan(self, module: nn.Module, k: int, name: str, leaves: list, outputs: list) -> CallPlan:
        """This call's plan: from the probe, or (sharded) the batch first everywhere."""
        B = self._batch
        if self._plan is None:
            d = 0 if self.batch_first else 1
            plan = CallPlan([d if torch.is_tensor(x) else None for x in leaves], [d if torch.is_tensor(y) else None for y in outputs], "rule" if self._rule(module) is not None else "func")
        else:
            plan = self._plan.calls.get((module, k))
            if plan is None:
                raise LayerInputError(
                    f"layer {name} ({type(module).__name__}) ran more often than when the model was probed on "
                    "one and two samples: its forward's control flow depends on the batch"
                )
        if plan.how == "refuse":
            raise LayerInputError(f"layer {name} ({type(module).__name__}): {plan.reason}")
        for what, xs, dims in (("input", leaves, plan.in_dims), ("output", outputs, plan.out_dims)):
            for x, d in zip(xs, dims):
                if torch.is_tensor(x) and d is not None and (x.dim() <= d or x.shape[d] != B):
                    raise LayerInputError(
                        f"layer {name} ({type(module).__name__}): an {what} of shape {tuple(x.shape)} has no batch "
                        f"dimension of size {B} at dimension {d}; every trainable layer must be called on inputs "
                        "with the batch as their first dimension"
                    )
        return plan

    # ---- hooks -----------------------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, _args) -> None:
        if self._recording is None and self._active(module):
            self._rng_at_call[module] = rng_states(module)

    def _forward_hook(self, module: nn.Module, args, kwargs, output):
        if self._recording is not None:
            return self._record_shapes(module, args, kwargs, output)
        if not self._active(module):
            return None
        name = self._layer_names[module]
        leaves, spec, outputs = call_leaves(args, kwargs, output)
        k = self._calls_of[module] = self._calls_of.get(module, -1) + 1
        plan = self._call_plan(module, k, name, leaves, outputs)
        if plan.how == "rerun":
            self._rerun.add(module)
            return None
        in_dims, out_dims, result = list(plan.in_dims), list(plan.out_dims), None
        if plan.how == "expand":
            leading = outputs[0].dim() > 0 and outputs[0].shape[0] == 1 and leaves[0].dim() > 0 and leaves[0].shape[0] == 1
            result = expand_to_batch(outputs[0], leading, self._batch)
            leaves[0] = expand_to_batch(leaves[0], leading, self._batch)
            outputs, in_dims[0], out_dims = [result], 0, [0]
        names = []
        how = "rule" if self._rule(module) is not None else "func"
        if how == "func":
            result, outputs = behind_identity(output)
            if not same_rng_states(self._rng_at_call.pop(module), rng_states(module)):
                raise UnsupportedModuleError(
                    f"layer {name} ({type(module).__name__}) has no per-sample rule and its forward draws random "
                    "numbers (dropout?), so torch.func cannot recompute its per-sample gradients exactly: set its "
                    "dropout to 0, or freeze its parameters"
                )
            names = unit_parameter_names(module, unit_recurses(module))
            params = [module.get_parameter(n) for n in names]
        else:
            params = trainable_own(module)
        call = Call(
            module, name, how,
            [x.detach() if torch.is_tensor(x) else x for x in leaves], spec,
            [x._version if torch.is_tensor(x) else None for x in leaves],
            # only torch.func needs the outputs; a rule's view needs inputs and output gradients, and holding
            # its outputs would keep every layer's output alive until backward (a logits-sized tensor for a head)
            in_dims, [y.detach() if torch.is_tensor(y) and how == "func" else None for y in outputs], out_dims, names,
            grads=[None] * len(outputs),
        )
        self._inputs[(module, k)] = call
        for p in params:
            self._uses[p] = self._uses.get(p, 0) + 1
        self._watch(call, outputs)
        return result

    def _record_shapes(self, module: nn.Module, args, kwargs, output):
        rec = self._recording
        if module in rec.expand:
            y, x = output, tree_flatten(args)[0][0]
            output = expand_to_batch(y, y.dim() > 0 and y.shape[0] == 1 and x.dim() > 0 and x.shape[0] == 1, rec.expand_to)
        rec.calls.append((module, shapes((args, kwargs)), shapes(output)))
        return output if module in rec.expand else None

    def _watch(self, call: Call, outputs: list) -> None:
        """Tensor hooks on the floating outputs that need a gradient: they fill call.grads.  A Linear
        layer's own backward (LinearInputGradOnly) hands its output gradient over without a hook."""
        call.out_versions = [y._version if torch.is_tensor(y) else None for y in outputs]
        for j, y in enumerate(outputs):
            if torch.is_tensor(y) and y.requires_grad:
                call.waiting += 1
                store = self._grad_hook(call, j)
                if not (call.how == "rule" and send_output_grad(y, self, store)):
                    y.register_hook(store)

    def _grad_hook(self, call: Call, j: int):
        def store(grad: torch.Tensor) -> None:
            if not self.hooks_enabled or call.done:
                return  # ghost's second pass, per-sample re-runs
            call.grads[j] = grad.detach()
            call.waiting -= 1
            if call.waiting == 0 and call.how == "rule":
                self._finish(call)

        return store

    def _record_root(self, args, kwargs, output, own: List[str], B: int, batch_dim: int):
        """The root's call, for torch.func per-sample gradients of its own parameters and of the layers
        called on shared inputs whose output cannot be expanded ("rerun").  Returns the output with
        each tensor leaf behind an identity view: its gradient is then the one from outside the model
        only (a returned tensor may also feed other outputs, as T5's encoder states feed its decoder)."""
        leaves, spec = tree_flatten((args, kwargs))
        output, outputs = behind_identity(output)
        in_dims = [batch_dim if torch.is_tensor(x) and x.dim() > batch_dim and x.shape[batch_dim] == B else None for x in leaves]
        out_dims = self._plan.root_out_dims if self._plan is not None else [batch_dim] * len(outputs)
        prefix = {m: n for n, m in self._module.named_modules()}
        names = own + [f"{prefix[m]}.{n}" for m in self._rerun for n in unit_parameter_names(m, unit_recurses(m))]
        call = Call(
            self._module, "<root>", "func", [x.detach() if torch.is_tensor(x) else x for x in leaves], spec,
            [x._version if torch.is_tensor(x) else None for x in leaves], in_dims,
            [y.detach() if torch.is_tensor(y) else None for y in outputs], out_dims, names, grads=[None] * len(outputs),
        )
        self._root_call = call
        self._watch(call, outputs)
        return output

    # ---- views -----------------------------------------------------------------------------------
    def _finish(self, call: Call) -> None:
        """The call's per-sample view: its norms are recorded, and it is kept as bookkeeping needs."""
        call.done = True
        for x, v in zip(call.leaves, call.versions):
            if torch.is_tensor(x) and x._version != v:
                raise LayerInputError(
                    f"layer {call.name} ({type(call.module).__name__}): an input was modified in place after "
                    "the layer ran, so its per-sample gradients cannot be formed from it; make that operation "
                    "out of place"
                )
        try:
            view = self._view(call)
            norms = view.norm_sq()
        except LayerInputError as e:
            raise LayerInputError(f"layer {call.name} ({type(call.module).__name__}): {e}") from None
        self._param_norm_sq.extend((call.name, p, sq) for p, sq in norms.items())
        if self.keep_samples:
            self._kept.append(view)
        if any(self._uses.get(p, 0) > 1 for p in norms):
            self._shared.append((call.name, view))
        call.leaves = call.outputs = call.grads = []  # the view holds what is still needed

    def _view(self, call: Call):
        if call.how == "func":
            label = f"layer {call.name} ({type(call.module).__name__})" if call.module is not self._module else "the model"
            outputs = [y if torch.is_tensor(y) and y._version == v else None for y, v in zip(call.outputs, call.out_versions)]  # None: changed in place since
            return FuncSamples(call.module, call.names, call.leaves, call.spec, call.in_dims, outputs, call.out_dims, call.grads, label)
        args = call.leaves if call.spec is positional_spec(len(call.leaves)) else tree_unflatten(call.leaves, call.spec)[0]
        x, G = args[0], call.grads[0]
        x = x if call.in_dims[0] == 0 else x.movedim(call.in_dims[0], 0)
        G = G if call.out_dims[0] == 0 else G.movedim(call.out_dims[0], 0)
        return samples_of(call.module, (x, *args[1:]), G, linear_method=self.linear_norm, keep=self.keep_samples, rule=self._rule(call.module))

    # ---- norms and coefficients ----------------------------------------------------------------
    def get_norm_sample(self, check_finite: bool = True) -> torch.Tensor:
        """||g_i|| over every trainable parameter, [B]; raises NonFiniteNormError on NaN/Inf.

        The per-parameter squared norms are scaled and reduced in a few batched operations here,
        not per layer in the hooks; each parameter's ``_norm_sample`` (Opacus's attribute) is its row.
        check_finite=False leaves the check (a host synchronisation) to ``check_norms_finite``, which
        bookkeeping calls once the clipped gradients are queued and before any p.grad changes.
        """
        if self._batch == 0:
            self.per_sample_gradient_norms = torch.zeros(0)
            return self.per_sample_gradient_norms
        self._scale = self._batch if self.loss_reduction == "mean" else 1
        root = [self._root_call] if self._root_call is not None and self._root_call.names else []
        pending = [c for c in [*self._inputs.values(), *root] if not c.done and any(g is not None for g in c.grads)]
        self.disable_hooks()  # torch.func re-runs layers (layers/func.py): their hooks stay quiet
        try:
            for call in pending:
                self._finish(call)
        finally:
            self.enable_hooks()
        if not self._param_norm_sq:
            raise RuntimeError("no per-sample norms: call backward on a loss of the wrapped model first")
        self._add_cross_terms()
        if not self.sharded:
            self._check_every_gradient_has_samples()
        first = self._param_norm_sq[0][2]
        dt = torch.float64 if any(sq.dtype == torch.float64 for _, _, sq in self._param_norm_sq) else first.dtype
        table = torch.stack([sq.to(first.device, dt) for _, _, sq in self._param_norm_sq])  # [entries, B]
        table *= self._scale * self._scale
        total = table.sum(0)
        object.__setattr__(self, "_finite", (self._posted(torch.isfinite(total).all()), table))
        if check_finite:
            self.check_norms_finite()
        self._set_param_norms(table)
        norms = total.clamp(min=0).sqrt()
        self.per_sample_gradient_norms = norms
        return norms

    def _posted(self, finite: torch.Tensor):
        """``finite`` on its way to the host (a HostFlag) on a CUDA device; elsewhere the tensor itself."""
        if finite.device.type != "cuda":
            return finite
        if finite.device not in self._host_flags:
            self._host_flags[finite.device] = HostFlag(finite.device)
        return self._host_flags[finite.device].post(finite)

    def check_norms_finite(self) -> None:
        """Raise NonFiniteNormError if this step's per-sample norms hold a NaN or Inf (waits for the
        norms, not for the work queued after them: see HostFlag)."""
        if self._finite is None:  # an empty batch: no norms
            return
        finite, table = self._finite
        if not bool(finite):
            raise NonFiniteNormError(self._describe_non_finite(table))

    def _set_param_norms(self, table: torch.Tensor) -> None:
        """p._norm_sample = sqrt of the sum of p's rows of ``table`` [entries, B]: one square root over the
        table, each parameter with one entry taking its row (a view); several entries (a parameter with
        several uses and their cross terms) are summed first."""
        rows: Dict[nn.Parameter, list] = {}
        for i, (_, p, _) in enumerate(self._param_norm_sq):
            rows.setdefault(p, []).append(i)
        roots = table.clamp(min=0).sqrt()
        for p, idx in rows.items():
            norm = roots[idx[0]] if len(idx) == 1 else table[idx].sum(0).clamp(min=0).sqrt()
            p._norm_sample = norm if norm.dtype == p.dtype else norm.to(p.dtype)

    def _add_cross_terms(self) -> None:
        """2 <g_u, g_v> per sample for every pair of uses of a parameter (layers/shared.py)."""
        uses: Dict[nn.Parameter, list] = {}
        for name, view in self._shared:
            for p, form in view.grad_forms().items():
                uses.setdefault(p, []).append((name, form))
        for p, forms in uses.items():
            for a in range(len(forms)):
                for b in range(a + 1, len(forms)):
                    self._param_norm_sq.append((f"{forms[a][0]} x {forms[b][0]}", p, 2 * cross_term(forms[a][1], forms[b][1])))
        self._shared.clear()

    def _check_every_gradient_has_samples(self) -> None:
        """A parameter that autograd reached in this backward pass but no per-sample view covers would
        be clipped wrongly: refuse, naming it (a module using another module's weight directly)."""
        covered = {p for _, p, _ in self._param_norm_sq}
        missed = [n for n, p in self._module.named_parameters() if p.requires_grad and p.grad is not None and p not in covered]
        if missed:
            raise UnsupportedModuleError(
                f"parameters {missed} received gradients outside every recorded layer call (frozen when "
                "make_private wrapped the model and unfrozen since, or a forward that uses another module's "
                "parameters directly?), so they have no per-sample gradients; call make_private after "
                "unfreezing, call the layer that owns them, or freeze them"
            )

    def _describe_non_finite(self, table: torch.Tensor) -> str:
        bad = ~torch.isfinite(table)
        layers = sorted({self._param_norm_sq[i][0] for i in bad.any(1).nonzero().flatten().tolist()})
        samples = bad.any(0).nonzero().flatten().tolist()
        return (
            f"per-sample gradient norm is NaN or Inf for samples {samples} (batch positions) in layers "
            f"{layers}; the step was refused and gradients were left untouched. Check the inputs and "
            "the loss of those samples (or lower the learning rate / use loss scaling)."
        )

    def get_clipping_coef(self, check_finite: bool = True) -> torch.Tensor:
        """c_i = min(1, C / (||g_i|| + 1e-6)), [B] (check_finite: see ``get_norm_sample``)."""
        return clip_coefficients(self.get_norm_sample(check_finite), self.max_grad_norm)

    def add_clipped_grads(self, coef: torch.Tensor) -> None:
        """Bookkeeping: p.grad += sum_i c_i g_i for every kept call (uses, then drops, the views).

        The norms' finiteness (``check_norms_finite``) is checked before any p.grad changes.  Where no
        p.grad is held yet (the first micro-batch of a step), the clipped gradients are all queued on
        the device first: on CUDA the check waits for the norms only, so the device works through the
        sums while the host goes on to the optimizer's step; otherwise (accumulating, or FSDP2's
        bucketed sums) the check comes first and the sums one at a time."""
        kept, self._kept[:] = list(self._kept), []
        scaled = coef * self._scale
        clipped = ((p, g.to(p.dtype)) for view in kept for p, g in view.clipped_grad(scaled).items())
        if self.sharded or any(p.grad is not None for p in self.trainable_parameters):
            self.check_norms_finite()
        else:
            clipped = list(clipped)  # becomes p.grad: no memory beyond the gradients
            self.check_norms_finite()
        if self.sharded:  # FSDP2: the mean over ranks, bucketed, into the shards (clipping/sharded.py)
            clipped = mean_over_ranks_into_shards(clipped)
        for p, g in clipped:
            p.grad = g if p.grad is None else p.grad + g

    def fill_missing_grads(self) -> None:
        """Give every trainable parameter without a gradient a zero one (it still gets noise)."""
        for p in self.trainable_parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def clear_step_state(self) -> None:
        """Drop recorded calls, norms and kept views (end of a step, or a refused step)."""
        self._inputs.clear()
        self._calls_of.clear()
        self._param_norm_sq.clear()
        self._kept.clear()
        self._shared.clear()
        self._uses.clear()
        self._rerun.clear()
        self._rng_at_call.clear()
        self.single_sample_step = False
        object.__setattr__(self, "_root_call", None)
        object.__setattr__(self, "_finite", None)
        object.__setattr__(self, "_batch", None)
