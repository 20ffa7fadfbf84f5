"""One training step of a workload in any mode: the unit the benchmarks and the profiler measure.

Modes: "nondp" (plain PyTorch), "opacus_hooks" and "opacus_ghost" (``opacus.PrivacyEngine``), and
every dpkernels mode (``dpkernels.MODES``).  A step is forward, loss, backward, optimizer step,
zero_grad; its loss is what a user of that mode writes (``Workload.loss(mode)``, recorded as
``Trainer.loss_call``): the idiomatic non-private loss on contiguous logits for nondp and Opacus hooks,
Opacus's criterion call for Opacus ghost, dpkernels' criterion on the model's logits otherwise.
A Trainer given ``shard`` (e.g. ``sharding.shard_blocks``) runs on an FSDP2-sharded model inside
a process group: "nondp" or a ``*_fsdp`` mode, each rank on its own batch of B samples.
``phased_step`` is one step with a callback at the end of each phase, for the profiler's memory
snapshots (breakdown.py) and phase times (distributed.py).
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from typing import Callable, Iterator, Optional

import opacus
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..engine import PrivacyEngine
from ..modes import MODES, SINGLE_PROCESS_MODES
from ..models.workloads import Workload
from .environment import synchronize
from .memory import peak_memory

STEP_MODES = ("nondp", "opacus_hooks", "opacus_ghost") + SINGLE_PROCESS_MODES
SHARDED_MODES = ("nondp",) + tuple(sorted(name for name, mode in MODES.items() if mode.fsdp))


class Trainer:
    """``Trainer(workload, mode, device).step()`` runs one training step (noise 1.0, SGD).

    amp_dtype: run forward and loss under ``torch.autocast(device, amp_dtype)`` (e.g. torch.bfloat16).
    max_grad_norm: the clip norm C (the cost of a step does not depend on how many samples it clips).
    shard: applied to the model after it is built (FSDP2); then the global batch, from which the
    noise scale follows, is B x the process group's world size.
    """

    def __init__(
        self,
        workload: Workload,
        mode: str,
        device: torch.device,
        amp_dtype: Optional[torch.dtype] = None,
        seed: int = 0,
        max_grad_norm: float = 1.0,
        shard: Optional[Callable[[nn.Module], nn.Module]] = None,
    ):
        if mode not in STEP_MODES + SHARDED_MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {STEP_MODES + SHARDED_MODES[1:]}")
        allowed = SHARDED_MODES if shard else STEP_MODES
        if mode not in allowed:
            raise ValueError(f"mode {mode!r} cannot run {'on a sharded model' if shard else 'in one process'}; choose one of {allowed}")
        torch.manual_seed(seed)
        self.workload, self.mode, self.device, self.amp_dtype = workload, mode, device, amp_dtype
        self.max_grad_norm = max_grad_norm
        case = workload.case
        self.batch = tuple(t.to(device) for t in case.batch(workload.B))
        with torch.device(device):  # build on the device: no slow CPU init of large models
            model = case.build()
        self.world = 1
        if shard:
            model = shard(model)
            self.world = torch.distributed.get_world_size()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        self.loss = workload.loss(mode)
        self.loss_call = self.loss.call
        criterion = self.loss.criterion() if self.loss.criterion else None
        self.model, self.optimizer, self.criterion = model, optimizer, criterion
        if mode != "nondp":
            self._make_private(model, optimizer, criterion or workload.case.criterion())

    def _make_private(self, model, optimizer, criterion) -> None:
        global_batch = [t.cpu().repeat(self.world, *[1] * (t.dim() - 1)) for t in self.batch]
        loader = DataLoader(TensorDataset(*global_batch), batch_size=self.workload.B * self.world)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine() if self.mode in MODES else opacus.PrivacyEngine()
        grad_sample_mode = {"opacus_hooks": "hooks", "opacus_ghost": "ghost"}.get(self.mode, self.mode)
        out = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=criterion,
            noise_multiplier=1.0,
            max_grad_norm=self.max_grad_norm,
            grad_sample_mode=grad_sample_mode,
            poisson_sampling=False,
        )
        self.model, self.optimizer = out[0], out[1]
        self.criterion = out[2] if len(out) == 4 else None

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward_loss(self):
        with self.autocast():
            return self.loss.fn(self.model, self.criterion, self.batch)

    def step(self) -> None:
        loss = self.forward_loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def observe_norm_pass(model: nn.Module, callback: Callable[[], None]) -> Iterator[None]:
    """Call ``callback`` when the per-sample norms of a backward pass are complete, before the
    clipped gradient is formed: i.e. when ``get_clipping_coef`` is called (dpkernels' ghost and bk,
    Opacus's ghost).  Installed on the model object for the block; a no-op for other models."""
    original = getattr(type(model), "get_clipping_coef", None)
    if original is None:
        yield
        return

    def get_clipping_coef(*args, **kwargs):
        callback()
        return original(model, *args, **kwargs)

    object.__setattr__(model, "get_clipping_coef", get_clipping_coef)
    try:
        yield
    finally:
        model.__dict__.pop("get_clipping_coef", None)



def phased_step(trainer: Trainer, mark: Callable[[str, int, Optional[torch.Tensor]], None], micro_batches: int = 1) -> None:
    """One optimizer step of ``micro_batches`` forward+backward passes, calling ``mark(phase, k, loss)``
    as each phase ends (k: the micro-batch; loss: micro-batch k's loss at "forward", else None):

        start      before the first micro-batch
        forward    forward and loss of micro-batch k
        norm_pass  inside its backward, once every per-sample norm is known (``observe_norm_pass``)
        backward   the rest of its backward (dpkernels modes have clipped by then)
        clipping   DP optimizers only: Opacus's ``pre_step`` (per-sample clipping for Opacus hooks,
                   noise and the division by the batch size for every DP mode)
        optimizer  the (wrapped) optimizer's step
        zero_grad  ``zero_grad(set_to_none=True)``
    """
    optimizer = trainer.optimizer
    for k in range(micro_batches):
        if k == 0:
            mark("start", k, None)
        loss = trainer.forward_loss()
        mark("forward", k, loss)
        with observe_norm_pass(trainer.model, lambda: mark("norm_pass", k, None)):
            loss.backward()
        del loss
        mark("backward", k, None)
    last = micro_batches - 1
    if hasattr(optimizer, "pre_step"):
        proceed = optimizer.pre_step()
        mark("clipping", last, None)
        if proceed:
            optimizer.original_optimizer.step()
    else:
        optimizer.step()
    mark("optimizer", last, None)
    optimizer.zero_grad(set_to_none=True)
    mark("zero_grad", last, None)


def median_step_time_and_peak(trainer: Trainer, steps: int) -> tuple:
    """(median seconds of ``steps`` synchronised steps after one warm-up, bytes one more step adds at
    its peak: CUDA allocator on GPU, live-tensor tracker on CPU)."""
    trainer.step()
    times = []
    for _ in range(steps):
        synchronize()
        start = time.perf_counter()
        trainer.step()
        synchronize()
        times.append(time.perf_counter() - start)
    with peak_memory(trainer.device) as mem:
        trainer.step()
    return statistics.median(times), mem["peak_bytes"]


@contextlib.contextmanager
def input_gradients_only(model: nn.Module) -> Iterator[None]:
    """Inside the block, a forward and ``backward`` form input gradients only, as a two-pass step's
    extra pass does: the trainable parameters are frozen, and the output of each layer that owns one
    and is called on inputs without a gradient (the first layers: embeddings, patch projections) is
    made a new graph leaf, so the backward runs through every layer but forms no weight gradient and
    holds no more memory than a full backward.  Restores ``requires_grad`` on the way out."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    layers = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]

    def leaf(_module, _inputs, out):
        if torch.is_tensor(out) and out.is_floating_point() and not out.requires_grad:
            return out.detach().requires_grad_().clone()  # a clone: the model may change it in place
        return None

    handles = [m.register_forward_hook(leaf) for m in layers]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)


def pass_times(trainer: Trainer, rounds: int) -> dict:
    """Median seconds of the passes of a non-private step (a "nondp" Trainer), after one warm-up:

        forward         forward and loss
        backward        the full backward pass (input and weight gradients)
        input_backward  a backward pass that forms input gradients only, through every layer
                        (``input_gradients_only``: no weight gradients)

    A two-pass DP step needs at least forward + 2 input-gradient passes + 1 weight-gradient pass
    (= forward + input_backward + backward): ``two_pass_floor`` is that over forward + backward.
    Its first pass also forms the per-sample norms; where they cost what the weight gradients do (the
    "direct" norm: one per-sample GEMM of the dW GEMM's flops per Linear), the step is forward + 2 full
    backward passes: ``two_backward_floor`` = (forward + 2 backward) / (forward + backward).
    """
    times = {"forward": [], "backward": [], "input_backward": []}

    def timed(fn):
        synchronize()
        start = time.perf_counter()
        result = fn()
        synchronize()
        return result, time.perf_counter() - start

    for r in range(rounds + 1):
        loss, t_forward = timed(trainer.forward_loss)
        _, t_backward = timed(loss.backward)
        trainer.optimizer.zero_grad(set_to_none=True)
        with input_gradients_only(trainer.model):
            loss = trainer.forward_loss()
            _, t_input = timed(loss.backward)
        del loss
        if r:  # round 0 warms up
            for name, t in zip(times, (t_forward, t_backward, t_input)):
                times[name].append(t)
    out = {name: statistics.median(ts) for name, ts in times.items()}
    out["two_pass_floor"] = (out["forward"] + out["input_backward"] + out["backward"]) / (out["forward"] + out["backward"])
    out["two_backward_floor"] = (out["forward"] + 2 * out["backward"]) / (out["forward"] + out["backward"])
    return out
