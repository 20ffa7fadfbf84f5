"""Memory snapshots of a training step, and the breakdown of a step's peak by component.

A snapshot (taken between the phases of a step) records the measured total and the bytes held by
each component, in MB (2**20 bytes):

    total                 measured: ``torch.cuda.memory_allocated`` on GPU; on CPU the live-tensor
                          tracker of ``memory.py``, seeded with the storages that exist when it
                          starts (parameters, buffers, batch), so that it counts every live tensor
    parameters            the model's parameters and buffers
    gradients             ``p.grad`` (and Opacus's ``p.summed_grad``)
    optimizer_state       every tensor in ``optimizer.state`` (Adam's moments; none for plain SGD)
    batch                 the inputs and targets
    autograd_activations  tensors saved by autograd for the backward pass (found by walking the
                          graph from the loss: every node's saved tensors)
    clipping_cache        tensors cached by the clipping algorithm: dpkernels' ``_inputs`` (layer
                          inputs A) and ``_kept`` (bookkeeping views: A and G, or per-sample
                          gradients); Opacus's ``module.activations`` and ``p.grad_sample``
    norm_buffers          per-sample norms: dpkernels' ``_param_norm_sq``, ``p._norm_sample``,
                          ``per_sample_gradient_norms``
    unattributed          total - sum of the above: the loss, allocator workspaces, and tensors only
                          a local variable holds (in a norm pass after an earlier micro-batch, the
                          accumulated gradients that dpkernels sets aside until the pass ends)

Every tensor storage is counted once, in the first component above that holds it: a layer input
that autograd saves and the clipping algorithm also caches counts as an autograd activation, and
``clipping_cache_shared`` reports such shared bytes (not part of the sum).

The breakdown of a step (``step_breakdown``) is the composition of its peak: the components at the
largest snapshot, plus ``temporaries`` = measured peak - largest snapshot total (memory allocated
and freed between two snapshots, e.g. Gram matrices inside the norm pass).  By construction
components + unattributed + temporaries = peak; the identified components alone add up to the
peak within ``TOLERANCE`` (the bound on |unattributed| / total that the tests check on CPU; the
largest measured on the models here is 0.5% of a snapshot and 0.2% of a step's peak, in bk's norm
pass).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .memory import TensorMemoryTracker
from .step import phased_step

MB = 2**20
TOLERANCE = 0.02  # |unattributed| <= 2% of the step's peak (CPU, deterministic tracker)

COMPONENTS = (
    "parameters",
    "gradients",
    "optimizer_state",
    "batch",
    "autograd_activations",
    "clipping_cache",
    "norm_buffers",
)

# the snapshot taken at the end of each phase of ``step.phased_step``, in order (a micro-batch repeats
# forward..backward)
SNAPSHOT_AFTER = {
    "start": "start",
    "forward": "after_forward",
    "norm_pass": "after_norm_pass",
    "backward": "after_backward",
    "clipping": "after_clipping",
    "optimizer": "after_optimizer_step",
    "zero_grad": "after_zero_grad",
}
PHASES = tuple(SNAPSHOT_AFTER.values())


# ---- measured totals ------------------------------------------------------------------------------


class SeededTracker(TensorMemoryTracker):
    """``TensorMemoryTracker`` that also counts storages alive before it starts (``adopt``).

    Adopted storages stay counted for the tracker's life, and views of them (``weight.t()``) are
    not counted again.
    """

    def adopt(self, tensors: Iterable[torch.Tensor]) -> None:
        for key, nbytes in storages(tensors).items():
            if key not in self._live:
                self._live[key] = [nbytes, 1]  # one reference that is never released
                self.current += nbytes
        self.peak = max(self.peak, self.current)


class Meter:
    """Live tensor bytes on one device: ``current()``, ``peak()`` since ``reset_peak()``, and on
    CUDA ``reserved_peak()`` (``max_memory_reserved``: allocated plus the allocator's cached blocks)."""

    def __init__(self, device: torch.device, existing: Iterable[torch.Tensor]):
        self.device = device
        self.tracker: Optional[SeededTracker] = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        else:
            self.tracker = SeededTracker()
            self.tracker.adopt(existing)

    @property
    def source(self) -> str:
        return "cuda_allocator" if self.tracker is None else "tensor_tracker"

    def current(self) -> int:
        if self.tracker is None:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return self.tracker.current

    def peak(self) -> int:
        if self.tracker is None:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return self.tracker.peak

    def reserved_peak(self) -> Optional[int]:
        return torch.cuda.max_memory_reserved(self.device) if self.tracker is None else None

    @contextmanager
    def active(self) -> Iterator["Meter"]:
        """Counting is on inside the block (the CPU tracker is a dispatch mode; CUDA always counts)."""
        if self.tracker is None:
            yield self
        else:
            with self.tracker:
                yield self


# ---- which tensors each component holds -------------------------------------------------------------


def storages(tensors: Iterable[torch.Tensor]) -> Dict[int, int]:
    """{storage data_ptr: storage nbytes} of the distinct, non-empty storages behind ``tensors``
    (a DTensor's: its local shard's)."""
    out = {}
    for t in tensors:
        s = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
        if s.nbytes() and s.data_ptr():
            out[s.data_ptr()] = s.nbytes()
    return out


def tensors_in(obj, depth: int = 4) -> Iterator[torch.Tensor]:
    """Tensors reachable from ``obj`` through lists, tuples, dict values and plain objects' attributes
    (never through modules: their parameters are counted as parameters)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth == 0 or obj is None or isinstance(obj, (nn.Module, str, int, float, bool)):
        return
    elif isinstance(obj, (list, tuple, set)):
        for item in obj:
            yield from tensors_in(item, depth - 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_in(item, depth - 1)
    elif hasattr(obj, "__dict__"):
        yield from tensors_in(vars(obj), depth - 1)


def saved_by_node(node) -> List[torch.Tensor]:
    """Tensors an autograd node holds for its backward ([] once the graph is freed)."""
    found: List[torch.Tensor] = []
    try:
        if hasattr(node, "saved_tensors"):  # a Python autograd.Function; ctx attributes too
            found += list(node.saved_tensors) + list(tensors_in(vars(node)))
        for name in dir(node):
            if name.startswith("_saved_"):
                found += list(tensors_in(getattr(node, name), 1))
    except RuntimeError:  # "Trying to backward through the graph a second time": already freed
        return []
    return found


def autograd_saved(roots: Iterable) -> List[torch.Tensor]:
    """Every tensor saved by the autograd graphs under ``roots`` (grad_fn nodes)."""
    seen, stack, found = {}, [r for r in roots if r is not None], []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node  # kept referenced so that ids stay unique during the walk
        found += saved_by_node(node)
        stack += [n for n, _ in node.next_functions if n is not None]
    return found


def clipping_cache(model: nn.Module) -> List[torch.Tensor]:
    """Tensors the clipping algorithm caches between forward, backward and the optimizer step."""
    found = list(tensors_in(model.__dict__.get("_inputs"))) + list(tensors_in(model.__dict__.get("_kept")))
    for m in model.modules():
        found += list(tensors_in(m.__dict__.get("activations")))
    for p in model.parameters():
        found += list(tensors_in(p.__dict__.get("grad_sample")))
        found += list(tensors_in(p.__dict__.get("_current_grad_sample")))
    return found


def norm_buffers(model: nn.Module) -> List[torch.Tensor]:
    per_param = [sq for _, _, sq in model.__dict__.get("_param_norm_sq", [])]  # entries also name the parameter
    found = per_param + list(tensors_in(model.__dict__.get("per_sample_gradient_norms")))
    for p in model.parameters():
        found += list(tensors_in(p.__dict__.get("_norm_sample")))
    return found


def gradients(model: nn.Module) -> List[torch.Tensor]:
    found = []
    for p in model.parameters():
        found += [t for t in (p.grad, p.__dict__.get("summed_grad")) if isinstance(t, torch.Tensor)]
    return found


def component_tensors(trainer, roots: Iterable) -> Dict[str, List[torch.Tensor]]:
    """{component: tensors} for a ``profiling.step.Trainer`` whose autograd graphs start at ``roots``."""
    model = trainer.model
    return {
        "parameters": list(model.parameters()) + list(model.buffers()),
        "gradients": gradients(model),
        "optimizer_state": list(tensors_in(trainer.optimizer.state)),
        "batch": list(trainer.batch),
        "autograd_activations": autograd_saved(roots),
        "clipping_cache": clipping_cache(model),
        "norm_buffers": norm_buffers(model),
    }


def attribute(groups: Dict[str, List[torch.Tensor]]) -> Dict[str, int]:
    """Bytes per component, each storage counted once (in the first component holding it), plus
    ``clipping_cache_shared``: bytes the clipping cache holds that an earlier component also holds."""
    counted: Dict[int, int] = {}
    out = {}
    for name in COMPONENTS:
        held = storages(groups[name])
        out[name] = sum(n for k, n in held.items() if k not in counted)
        if name == "clipping_cache":
            out["clipping_cache_shared"] = sum(n for k, n in held.items() if k in counted)
        counted.update(held)
    return out


# ---- snapshots of a step -------------------------------------------------------------------------------


def graph_root(loss):
    """The grad_fn of a loss: a tensor, or a DP loss wrapper holding ``loss_per_sample``."""
    return getattr(loss, "loss_per_sample", loss).grad_fn


class Recorder:
    """Takes snapshots of a Trainer's memory: ``snapshot(phase, step, micro_batch)``.

    ``roots`` are the grad_fns of the losses whose graphs are alive (set by the step loop).
    """

    def __init__(self, trainer, meter: Meter):
        self.trainer, self.meter = trainer, meter
        self.roots: list = []
        self.snapshots: List[dict] = []
        self.position = (0, 0)  # (step, micro_batch) of the next snapshot

    def snapshot(self, phase: str) -> dict:
        total = self.meter.current()
        held = attribute(component_tensors(self.trainer, self.roots))
        components = {name: held[name] / MB for name in COMPONENTS}
        snap = {
            "step": self.position[0],
            "micro_batch": self.position[1],
            "phase": phase,
            "total_mb": total / MB,
            "components_mb": components,
            "unattributed_mb": total / MB - sum(components.values()),
            "clipping_cache_shared_mb": held["clipping_cache_shared"] / MB,
        }
        self.snapshots.append(snap)
        return snap


def instrumented_step(trainer, recorder: Recorder, step: int, micro_batches: int) -> None:
    """One optimizer step of ``micro_batches`` forward+backward passes (``step.phased_step``), with a
    snapshot after each phase (PHASES).  after_norm_pass: inside the backward of dpkernels' and Opacus's
    ghost modes and bk, once every per-sample norm is known; after_backward: dpkernels modes have clipped
    by then; after_clipping: after Opacus's ``pre_step`` (per-sample clipping for Opacus hooks, noise and
    scaling for every DP mode); nondp has no after_norm_pass or after_clipping.  Autograd's saved tensors
    are walked from the live loss's graph, from forward to the end of its backward."""

    def snapshot(phase: str, micro_batch: int, loss) -> None:
        recorder.position = (step, micro_batch)
        if phase == "forward":
            recorder.roots = [graph_root(loss)]
        elif phase == "backward":
            recorder.roots = []
        recorder.snapshot(SNAPSHOT_AFTER[phase])

    phased_step(trainer, snapshot, micro_batches)


def largest(snapshots: List[dict]) -> dict:
    return max(snapshots, key=lambda s: s["total_mb"])


def step_breakdown(snapshots: List[dict], peak_mb: float) -> dict:
    """The composition of a measured peak (MB): components at the largest snapshot + temporaries."""
    top = largest(snapshots)
    return {
        "peak_mb": peak_mb,
        "largest_snapshot": top["phase"],
        "components_mb": dict(top["components_mb"]),
        "temporaries_mb": peak_mb - top["total_mb"],
        "unattributed_mb": top["unattributed_mb"],
        "clipping_cache_shared_mb": top["clipping_cache_shared_mb"],
        "tolerance": TOLERANCE,
    }
