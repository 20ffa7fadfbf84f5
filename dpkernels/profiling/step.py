"""One training step of a workload in any mode: the unit the benchmarks and the profiler measure.

Modes: "nondp" (plain PyTorch), "opacus_hooks" and "opacus_ghost" (``opacus.PrivacyEngine``), and
every dpkernels mode (``dpkernels.MODES``).  A step is forward, backward, optimizer step, zero_grad.
A Trainer given ``shard`` (e.g. ``distributed.shard_blocks``) runs on an FSDP2-sharded model inside
a process group: "nondp" or a ``*_fsdp`` mode, each rank on its own batch of B samples.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from typing import Callable, Optional

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


class PerSampleLoss(nn.Module):
    """A criterion whose reduction='none' output is one loss per sample [B] (extra dims averaged).

    Opacus's ghost-mode criterion needs [B]; dpkernels folds extra dims itself.
    """

    def __init__(self, criterion_cls, reduction: str = "mean"):
        super().__init__()
        self.inner = criterion_cls(reduction="none")
        self.reduction = reduction

    def forward(self, output, target):
        per_sample = self.inner(output, target)
        if per_sample.dim() > 1:
            per_sample = per_sample.flatten(1).mean(1)
        if self.reduction == "none":
            return per_sample
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()


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
        criterion = PerSampleLoss(case.criterion)
        self.model, self.optimizer, self.criterion = model, optimizer, criterion
        if mode != "nondp":
            self._make_private(model, optimizer, criterion)

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
        self.criterion = out[2] if len(out) == 4 else criterion

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward_loss(self):
        *inputs, target = self.batch
        with self.autocast():
            return self.criterion(self.workload.case.logits_of(self.model(*inputs)), target)

    def step(self) -> None:
        loss = self.forward_loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


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
