"""Where an FSDP2 step's time goes, phase by phase (``python -m dpkernels.profiling.distributed``).

Under torchrun, one process per GPU (or per CPU rank with gloo).  ``phase_profile``: each mode on a
fresh sharded model (``sharding.shard_blocks``), one warm-up step, then timed steps whose phase
boundaries are marked on the host (``time.perf_counter``: the time spent issuing the phase) and on
the device (CUDA events on the current stream: the time its work took, waits included):

    forward        the forward pass and the loss
    backward       nondp's backward (gradients reduce-scattered by FSDP2)
    norm_pass      DP modes: the backward pass with the hooks, up to the per-sample norms
    clipped_grads  DP modes: the rest of ``loss.backward()`` (ghost's second backward; bookkeeping's
                   clipped sums and their mean over ranks)
    noise          the DP optimizer's ``pre_step``: noise and the division by the batch size
    optimizer      the wrapped optimizer's step (Adam)
    zero_grad

With ``--count-ops``, one more step, untimed, counts each phase's collectives (and their input bytes) and host
synchronisations (``.item()``, ``bool(tensor)``) with a dispatch mode.  Times are the median over the
timed steps, for every rank; peak memory is the CUDA allocator's over the timed steps.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from .experiments import AMP, MODELS
from .runner import build_trainer
from .sharding import gather_floats, max_over_ranks, start
from .step import phased_step


class PhaseClock:
    """Phase boundaries of steps: ``mark(name)`` ends the phase ``name`` (host clock, and a CUDA event)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: List[tuple] = []

    def mark(self, name: str) -> None:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.marks.append((name, time.perf_counter(), event))

    def durations(self) -> Dict[str, Dict[str, float]]:
        """{"host": {phase: ms}, "device": {phase: ms}} between consecutive marks (device: CUDA only)."""
        if self.cuda:
            torch.cuda.synchronize()
        host, device = {}, {}
        for (_, t0, e0), (name, t1, e1) in zip(self.marks, self.marks[1:]):
            host[name] = (t1 - t0) * 1e3
            if self.cuda:
                device[name] = e0.elapsed_time(e1)
        return {"host": host, "device": device}


def clocked_step(trainer, clock: PhaseClock) -> None:
    """One optimizer step of a ``profiling.step.Trainer`` (``step.phased_step``) with ``clock`` marks
    between its phases: a DP mode's backward after the norm pass is "clipped_grads", its
    ``pre_step`` "noise"."""
    names = {"backward": "clipped_grads" if hasattr(trainer.optimizer, "pre_step") else "backward", "clipping": "noise"}
    phased_step(trainer, lambda phase, micro_batch, loss: clock.mark(names.get(phase, phase)))


class OpCounter(TorchDispatchMode):
    """Collectives (count and input bytes) and host synchronisations, per phase (``phase`` is set
    from outside as the step goes)."""

    SYNCS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.item")  # of a tensor on a device (not CPU)

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.counts: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if "c10d" in name and "wait" not in name and "wrap" not in name:
            self.counts[self.phase][name] += 1
            tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, torch.Tensor)]
            self.counts[self.phase][name + " MB"] += sum(t.numel() * t.element_size() for t in tensors) / 2**20
        elif name in self.SYNCS and args and args[0].device.type != "cpu":
            self.counts[self.phase]["host syncs"] += 1
        return func(*args, **(kwargs or {}))


class CountingClock(PhaseClock):
    """A PhaseClock that moves an OpCounter on to the next of ``phases`` at each mark."""

    def __init__(self, device: torch.device, counter: OpCounter, phases: List[str]):
        super().__init__(device)
        self.counter, self.phases = counter, phases

    def mark(self, name: str) -> None:
        super().mark(name)
        following = self.phases[self.phases.index(name) + 1 :] if name in self.phases else self.phases
        self.counter.phase = following[0] if following else "after"


PHASES = {"nondp": ["forward", "backward", "optimizer", "zero_grad"], "dp": ["forward", "norm_pass", "clipped_grads", "noise", "optimizer", "zero_grad"]}


def opacus_optimizer(optimizer):
    """Opacus's own ``FSDPOptimizerFastGradientClipping`` in place of dpkernels' (full-shape noise on
    every rank, a copy of every gradient shard), with the same settings and accountant hook.  It fails
    where a rank's shard of a parameter is empty (fewer rows than ranks; torch 2.13 on CPU): the sum
    plus noise then comes out replicated, which an in-place optimizer update refuses."""
    from opacus.optimizers import FSDPOptimizerFastGradientClipping

    theirs = FSDPOptimizerFastGradientClipping(
        optimizer.original_optimizer, noise_multiplier=optimizer.noise_multiplier, max_grad_norm=optimizer.max_grad_norm,
        expected_batch_size=optimizer.expected_batch_size, loss_reduction=optimizer.loss_reduction,
        generator=optimizer.generator, secure_mode=optimizer.secure_mode,
    )
    theirs.step_hook = optimizer.step_hook
    return theirs


def clocked_runs(trainer, device: torch.device, steps: int) -> List[Dict[str, Dict[str, float]]]:
    """One warm-up step (the batch-dimension probe, Triton autotuning), the CUDA peak-memory statistics
    reset, then ``steps`` clocked steps: each one's ``PhaseClock.durations()``."""
    clocked_step(trainer, PhaseClock(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for _ in range(steps):
        clock = PhaseClock(device)
        clocked_step(trainer, clock)
        runs.append(clock.durations())
    return runs


def phase_profile(spec: dict, mode: str, device: torch.device, steps: int, count_ops: bool = True) -> dict:
    """Per-phase times (median of ``steps`` after one warm-up; every rank), peak memory and (``count_ops``:
    one more step) per-phase collectives of ``mode`` (``MODE:opacus``: with Opacus's FSDP optimizer)
    for a profiler ``spec``."""
    name, _, variant = mode.partition(":")
    trainer = build_trainer({**spec, "mode": name, "sharded": True}, device)
    if variant == "opacus":
        trainer.optimizer = opacus_optimizer(trainer.optimizer)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of mode {name} (known: opacus)")
    runs = clocked_runs(trainer, device, steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    counter = OpCounter()
    if count_ops:
        with counter:
            clocked_step(trainer, CountingClock(device, counter, PHASES["nondp" if name == "nondp" else "dp"]))
    out = {"mode": mode, "peak_mb": max_over_ranks([peak], device)[0], "ops_rank0": {k: dict(v) for k, v in counter.counts.items()}}
    for clock_kind in ("host", "device") if device.type == "cuda" else ("host",):
        phases = list(runs[0][clock_kind])
        medians = [statistics.median(run[clock_kind][p] for run in runs) for p in phases]
        totals = [statistics.median(sum(run[clock_kind].values()) for run in runs)]
        every = [gather_floats(v, device) for v in medians + totals]
        out[f"{clock_kind}_ms"] = {p: ranks for p, ranks in zip(phases + ["step"], every)}
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def slowest(result: dict, phase: str) -> Optional[float]:
    """A phase's time (ms) on the slowest rank: the device clock on CUDA, else the host's."""
    clock = result["device_ms"] if result.get("device_ms") else result["host_ms"]
    return max(clock[phase]) if phase in clock else None


def phase_table(records: List[dict]) -> str:
    """Markdown tables of ``main``'s JSON records: per run and mode, the step and each phase on the
    slowest rank, x nondp, tokens/s and peak memory per GPU; then, for runs of one model and global
    batch on several GPU counts including 1, speed-up and efficiency t_1 / (N t_N) per mode."""
    columns = ["forward", "backward", "norm_pass", "clipped_grads", "noise", "optimizer", "zero_grad"]
    lines = ["| GPUs | B/GPU | T | layers | mode | step ms | x nondp | " + " | ".join(columns) + " | tokens/s | peak GiB/GPU | collectives (clipping, noise) | host syncs |",
             "|" + "---|" * (12 + len(columns))]
    steps = {}
    for record in records:
        c = record["config"]
        base = next((slowest(r, "step") for r in record["modes"] if r["mode"] == "nondp" and "error" not in r), None)
        for r in record["modes"]:
            head = f"| {c['gpus']} | {c['batch']} | {c['seq_len']} | {c['layers'] or 'all'} | {r['mode']} |"
            if "error" in r:
                lines.append(f"{head} {r['error'][:120]} |")
                continue
            step = slowest(r, "step")
            steps[(c["model"], c["layers"], c["seq_len"], c["global_batch"], r["mode"], c["gpus"])] = step
            phases = " | ".join("" if slowest(r, p) is None else f"{slowest(r, p):.1f}" for p in columns)
            ops = r["ops_rank0"]
            coll = [sum(v for k, v in ops.get(p, {}).items() if "c10d" in k and not k.endswith(" MB")) for p in ("clipped_grads", "noise")]
            syncs = sum(v.get("host syncs", 0) for v in ops.values())
            ratio = f"{step / base:.2f}" if base else ""
            tokens = c["global_batch"] * c["seq_len"] / (step / 1e3)
            lines.append(f"{head} {step:.1f} | {ratio} | {phases} | {tokens:.0f} | {r['peak_mb'] / 1024:.1f} | {coll[0]}, {coll[1]} | {syncs} |")
    scaling = ["", "| model, layers, T, global batch | mode | GPUs | step ms | speed-up | efficiency |", "|---|---|---|---|---|---|"]
    for (model, layers, T, batch, mode, gpus), step in sorted(steps.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        one = steps.get((model, layers, T, batch, mode, 1))
        if one is not None and gpus > 1:
            scaling.append(f"| {model}, {layers or 'all'}, {T}, {batch} | {mode} | 1 -> {gpus} | {one:.1f} -> {step:.1f} | {one / step:.2f}x | {one / (gpus * step):.0%} |")
    return "\n".join(lines + (scaling if len(scaling) > 3 else []))


def main(argv=None) -> int:
    """``torchrun --nproc-per-node N -m dpkernels.profiling.distributed [options]``: per-phase profile
    of FSDP2 steps, one JSON for all modes (written by rank 0); ``--table FILE...``: their tables."""
    parser = argparse.ArgumentParser(prog="python -m dpkernels.profiling.distributed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["nondp", "ghost_fsdp", "flash_fsdp", "bk_fsdp", "flash_bk_fsdp"], help="nondp and *_fsdp modes; MODE:opacus runs MODE with Opacus's FSDP optimizer")
    parser.add_argument("--model", default="llama3", choices=MODELS)
    parser.add_argument("--layers", type=int, help="decoder layers of llama3 (default 32)")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2, help="samples per rank")
    parser.add_argument("--size", choices=("small", "full"), help="default: full on CUDA, small on CPU")
    parser.add_argument("--amp", choices=sorted(AMP), default="bf16", help="FSDP2 mixed-precision parameter dtype (default bf16)")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode, after one warm-up")
    parser.add_argument("--count-ops", action="store_true", help="one more step per mode, counting collectives and host syncs per phase")
    parser.add_argument("--out", help="JSON file (rank 0 writes it after each mode)")
    parser.add_argument("--table", nargs="+", metavar="FILE", help="print the tables of these JSON files and exit (no process group)")
    args = parser.parse_args(argv)
    if args.table:
        print(phase_table([json.load(open(path)) for path in args.table]))
        return 0
    if not args.out:
        parser.error("--out is required (or --table)")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    device = start(device_type)
    spec = {"model": args.model, "layers": args.layers, "seq_len": args.seq, "batch": args.batch, "size": args.size or ("full" if device_type == "cuda" else "small"),
            "amp": args.amp, "optimizer": args.optimizer}
    record = {"config": {**spec, "gpus": dist.get_world_size(), "global_batch": args.batch * dist.get_world_size(), "steps": args.steps,
                         "device": torch.cuda.get_device_name(device) if device_type == "cuda" else "cpu"}, "modes": []}
    for mode in args.modes:
        try:
            record["modes"].append(phase_profile(spec, mode, device, args.steps, args.count_ops))
        except Exception as error:  # recorded; the other modes go on (a rank that fails alone stops the run)
            record["modes"].append({"mode": mode, "error": f"{type(error).__name__}: {error}"})
            gc.collect()
            if device_type == "cuda":
                torch.cuda.empty_cache()
        if dist.get_rank() == 0:
            with open(args.out, "w") as f:
                json.dump(record, f, indent=1)
            print(json.dumps(record["modes"][-1]), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
