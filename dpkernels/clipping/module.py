"""The module wrapper shared by every dpkernels mode: hooks, per-sample norms, coefficients.

One DP step, as data:

    forward    forward hooks keep each trainable layer's inputs A              [all modes]
    backward   backward hooks see each layer's output gradient G:
                 view = samples_of(layer, A, G)   (dpkernels.layers)
                 record view.norm_sq()            (per parameter, [B] each)
                 bookkeeping modes keep the view; ghost modes drop it
    then       ||g_i||^2 = sum over parameters (a few batched ops), c_i = min(1, C / (||g_i|| + 1e-6))
               ghost: a second backward of sum_i c_i loss_i        (clipping/ghost.py)
               bk:    p.grad += view.clipped_grad(c) per layer      (clipping/bookkeeping.py)
    optimizer  Opacus's (batched loops): noise, division by the expected batch size, accountant

Under ``loss_reduction="mean"`` the hooks see G / B, so norms are scaled by B^2 and coefficients by B.
Parameters of the root module itself: recomputed per sample after backward (root.py).
One sample (B = 1, one process): no caching, an ordinary backward and one global norm (single.py).
FSDP2 (``sharded``): each rank clips its own samples; bookkeeping's sums are averaged into the shards.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import nn
from torch.utils._pytree import tree_map

from ..errors import LayerInputError, NonFiniteNormError, TiedParameterError, UnsupportedModuleError
from ..layers import layer_type, rule_for, samples_of
from ..layers.linear import install_weight_grad_skipping, uninstall_weight_grad_skipping
from .coefficients import clip_coefficients
from .loss import guard_outputs
from .root import RootForward, rng_states, root_parameter_names
from .sharded import mean_over_ranks_into_shards


def trainable_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Every module that owns a trainable parameter directly (recurse=False), with its name."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def has_root_parameters(model: nn.Module) -> bool:
    """The root owns trainable parameters directly and is no layer with a rule (clipping/root.py)."""
    return rule_for(model) is None and bool(root_parameter_names(model))


def check_supported(model: nn.Module, sharded: bool) -> None:
    """Raise one error listing every trainable module that has no per-sample rule (the root's own
    parameters have one, by re-running the model per sample, except on an FSDP2-sharded model)."""
    bad = [
        f"{name or '<root>'} ({layer_type(m).__module__}.{layer_type(m).__name__})"
        for name, m in trainable_layers(model)
        if rule_for(m) is None and (m is not model or sharded)
    ]
    if bad:
        raise UnsupportedModuleError(
            "these modules own trainable parameters but have no per-sample gradient rule: "
            + ", ".join(bad)
            + ". Freeze them (requires_grad_(False)), replace them with supported layers "
            "(Linear, Embedding, LayerNorm, RMSNorm, GroupNorm, Conv1d, Conv2d, or a type with an "
            "Opacus grad sampler), or register an Opacus grad sampler for their type."
        )


def check_untied(model: nn.Module) -> None:
    """Raise if a trainable parameter is owned by several module paths (tied weights, shared modules)."""
    owners: Dict[int, List[str]] = {}
    for mod_name, m in model.named_modules(remove_duplicate=False):
        for p_name, p in m.named_parameters(recurse=False, remove_duplicate=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    tied = [names for names in owners.values() if len(names) > 1]
    if tied:
        groups = "; ".join(" = ".join(names) for names in tied)
        raise TiedParameterError(
            f"tied or shared trainable parameters are not supported: {groups}. Per-sample norms "
            "of a shared parameter need the sum of its gradients from every use; untie them "
            "(copy the weight) or freeze them."
        )


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
        object.__setattr__(self, "keep_samples", keep_samples)
        object.__setattr__(self, "linear_norm", linear_norm)
        # under FSDP the ordinary gradient is reduced across ranks, so one local sample is not the
        # batch: the single-sample shortcut (clipping/single.py) applies on one process only
        object.__setattr__(self, "sharded", sharded)
        object.__setattr__(self, "_inputs", {})
        object.__setattr__(self, "_param_norm_sq", [])  # (layer name, param, per-sample squared norm [B])
        object.__setattr__(self, "_scale", 1)
        object.__setattr__(self, "_kept", [])
        object.__setattr__(self, "_layer_names", {})
        object.__setattr__(self, "single_sample_step", False)
        object.__setattr__(self, "_root_forward", None)  # clipping/root.py, for a root with its own parameters

    # ---- hooks -------------------------------------------------------------------------------
    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True, force_functorch: bool = False) -> None:
        """Forward and backward hooks on every module that owns trainable parameters directly."""
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        self._module.autograd_grad_sample_hooks = []
        self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
        for name, layer in trainable_layers(self._module):
            if layer is self._module and has_root_parameters(layer):
                continue  # recorded by forward() instead (clipping/root.py)
            self._layer_names[layer] = name or "<root>"
            self.autograd_grad_sample_hooks.append(layer.register_forward_hook(self.capture_activations_hook))
            self.autograd_grad_sample_hooks.append(layer.register_full_backward_hook(self.capture_backprops_hook))
            if layer_type(layer) is nn.Linear:
                install_weight_grad_skipping(layer, self)
        self.enable_hooks()

    def remove_hooks(self) -> None:
        super().remove_hooks()
        for layer in self._layer_names:
            if layer_type(layer) is nn.Linear:
                uninstall_weight_grad_skipping(layer)

    def wants_weight_grads(self) -> bool:
        """Whether autograd's own weight gradients are used: in ghost's second pass and at B = 1."""
        return not self.hooks_enabled or self.single_sample_step

    def forward(self, *args, **kwargs):
        self._inputs.clear()  # inputs of a forward pass that never got a backward pass
        self.single_sample_step = False
        self._root_forward = None
        record_root = self.hooks_enabled and self._module.training and torch.is_grad_enabled() and has_root_parameters(self._module)
        rng_before = rng_states(self._module) if record_root else []
        output = self._module(*args, **kwargs)
        guard_outputs(self, output)  # a plain loss's backward is refused (clipping/loss.py)
        if record_root and not self.single_sample_step:
            detached = tree_map(lambda x: x.detach() if torch.is_tensor(x) else x, (args, kwargs))
            self._root_forward = RootForward(self._module, *detached, output, rng_before)
        return output

    def capture_activations_hook(self, module: nn.Module, forward_input, _forward_output) -> None:
        if not (self.hooks_enabled and module.training and torch.is_grad_enabled()):
            return
        if not self.sharded and forward_input[0].shape[0 if self.batch_first else 1] == 1:
            # one sample: its gradient is the ordinary gradient (clipping/single.py); cache nothing
            self.single_sample_step = True
            return
        if module in self._inputs:
            raise TiedParameterError(
                f"layer {self._layer_names[module]} ({type(module).__name__}) ran twice in one forward "
                "pass; a reused layer's per-sample norm needs the sum of both uses' gradients. "
                "Use a separate layer for each call."
            )
        self._inputs[module] = tuple(t.detach() if torch.is_tensor(t) else t for t in forward_input)

    def capture_backprops_hook(self, module: nn.Module, _grad_input, grad_output) -> None:
        if not self.hooks_enabled:
            return
        name = self._layer_names[module]
        if self.single_sample_step and module not in self._inputs:
            return
        if module not in self._inputs:
            raise RuntimeError(
                f"layer {name}: backward reached it without a recorded input; run the forward pass "
                "through the wrapped model in train mode with gradients enabled, once per backward"
            )
        inputs = self._inputs.pop(module)
        G = grad_output[0].detach()
        if not self.batch_first:
            inputs = tuple(t.movedim(1, 0) if torch.is_tensor(t) else t for t in inputs)
            G = G.movedim(1, 0)
        scale = G.shape[0] if self.loss_reduction == "mean" else 1
        try:
            view = samples_of(module, inputs, G, linear_method=self.linear_norm, keep=self.keep_samples)
            norms = view.norm_sq()
        except LayerInputError as e:
            raise LayerInputError(f"layer {name} ({type(module).__name__}): {e}") from None
        self._param_norm_sq.extend((name, p, sq) for p, sq in norms.items())
        self._scale = scale
        if self.keep_samples:
            self._kept.append((view, scale))

    # ---- norms and coefficients ----------------------------------------------------------------
    def get_norm_sample(self) -> torch.Tensor:
        """||g_i|| over every trainable parameter, [B]; raises NonFiniteNormError on NaN/Inf.

        The per-parameter squared norms are scaled and reduced in a few batched operations here,
        not per layer in the hooks; each parameter's ``_norm_sample`` (Opacus's attribute) is a row of it.
        """
        if self._root_forward is not None:
            self._add_root_samples()
        if not self._param_norm_sq:
            raise RuntimeError("no per-sample norms: call backward on a loss of the wrapped model first")
        self._check_one_batch_size()
        first = self._param_norm_sq[0][2]
        dt = torch.float64 if any(sq.dtype == torch.float64 for _, _, sq in self._param_norm_sq) else first.dtype
        table = torch.stack([sq.to(first.device, dt) for _, _, sq in self._param_norm_sq])  # [params, B]
        table *= self._scale * self._scale
        total = table.sum(0)
        if not bool(torch.isfinite(total).all()):
            raise NonFiniteNormError(self._describe_non_finite(table))
        for (_, p, _), row in zip(self._param_norm_sq, table.sqrt()):
            p._norm_sample = row.to(p.dtype)
        norms = total.sqrt()
        self.per_sample_gradient_norms = norms
        return norms

    def _add_root_samples(self) -> None:
        """The root's own parameters (clipping/root.py): per-sample gradients by re-running the model
        on each sample with the hooks off; their norms join the table, bookkeeping keeps them."""
        root, self._root_forward = self._root_forward, None
        self.disable_hooks()
        try:
            view = root.samples()
        finally:
            self.enable_hooks()
        self._scale = root.batch_size if self.loss_reduction == "mean" else 1
        self._param_norm_sq.extend(("<root>", p, sq) for p, sq in view.norm_sq().items())
        if self.keep_samples:
            self._kept.append((view, self._scale))

    def _check_one_batch_size(self) -> None:
        sizes = {name: sq.shape[0] for name, _, sq in self._param_norm_sq}
        if len(set(sizes.values())) > 1:
            raise LayerInputError(
                f"layers saw different batch sizes {sizes}: every trainable layer must be called on "
                "inputs whose first dimension is the batch (e.g. expand position ids to [B, T] before "
                "a position Embedding, instead of broadcasting its [T, d] output)"
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

    def get_clipping_coef(self) -> torch.Tensor:
        """c_i = min(1, C / (||g_i|| + 1e-6)), [B]."""
        return clip_coefficients(self.get_norm_sample(), self.max_grad_norm)

    def add_clipped_grads(self, coef: torch.Tensor) -> None:
        """Bookkeeping: p.grad += sum_i c_i g_i for every kept layer (uses, then drops, the views)."""
        kept, self._kept[:] = list(self._kept), []
        scaled = {scale: coef * scale for scale in {scale for _, scale in kept}}
        clipped = ((p, g.to(p.dtype)) for view, scale in kept for p, g in view.clipped_grad(scaled[scale]).items())
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
        """Drop cached inputs, norms and kept views (end of a step, or a refused step)."""
        self._inputs.clear()
        self._param_norm_sq.clear()
        self._kept.clear()
        self.single_sample_step = False
        self._root_forward = None
