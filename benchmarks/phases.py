"""Where one GPU's training step goes, phase by phase and kernel by kernel, for the step benchmarks' workloads.

    python benchmarks/phases.py --workload hf_llama:1024:8 --amp bf16 --modes nondp bk flash_bk --out phases.json

For each mode, on a fresh model (``profiling.step.Trainer``, the step the benchmarks time): one warm-up step,
then ``--steps`` steps with phase marks (``profiling.distributed.clocked_runs``):

    forward, backward (nondp) | norm_pass, clipped_grads, noise (DP modes), optimizer, zero_grad

each as host time (issuing the phase) and device time (CUDA events: its work, waits included); a phase
whose host time exceeds its device time is host-bound.  Then one more step under ``torch.profiler``: the
``--top`` operators by self device time, the number of operator calls and kernel launches, and the
kernels' busy time (the sum of their durations: the step's time if the host never kept the device waiting).
Times are medians over the steps, with their spread (min-max).  ``--workload NAME:T:B`` names a builder
of ``dpkernels.models.workloads`` (gpt2, llama, linear_stack, hf_llama, hf_gpt2, bert, dit, vit;
dit and vit take B only: ``dit::2``).  fp32 runs with TF32 off, as the benchmarks do.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
from typing import List

import torch

from dpkernels.models import workloads
from dpkernels.profiling.distributed import clocked_runs
from dpkernels.profiling.environment import versions
from dpkernels.profiling.step import Trainer

BUILDERS = ("gpt2", "llama", "linear_stack", "hf_llama", "hf_gpt2", "bert", "dit", "vit")


def build_workload(spec: str, small: bool):
    name, _, rest = spec.partition(":")
    T, _, B = rest.partition(":")
    if name not in BUILDERS:
        raise SystemExit(f"unknown workload {name!r}; choose one of {BUILDERS}")
    builder = getattr(workloads, name)
    if name in ("dit", "vit"):
        return builder(int(B), small)
    return builder(int(T), int(B), small)


def kernel_table(trainer: Trainer, top: int) -> dict:
    """One step under torch.profiler: the ``top`` operators by self device time, and call counts."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        trainer.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    events = prof.key_averages()
    device_time = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))  # noqa: E731
    rows = sorted(events, key=device_time, reverse=True)[:top]
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return {
        "operator_calls": sum(e.count for e in events if e.device_type.name == "CPU"),
        "kernel_launches": len(kernels),
        "kernel_busy_ms": sum(e.time_range.elapsed_us() for e in kernels) / 1e3,
        "top": [{"op": e.key, "calls": e.count, "self_device_ms": device_time(e) / 1e3, "self_host_ms": e.self_cpu_time_total / 1e3} for e in rows],
    }


def profile_mode(workload, mode: str, amp, steps: int, top: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainer = Trainer(workload, mode, device, amp_dtype=amp, max_grad_norm=1e-3)
    runs = clocked_runs(trainer, device, steps)
    out = {"mode": mode, "loss_call": trainer.loss_call}
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    for kind in ("host", "device") if device.type == "cuda" else ("host",):
        phases = list(runs[0][kind])
        table = {p: [run[kind][p] for run in runs] for p in phases}
        table["step"] = [sum(run[kind].values()) for run in runs]
        out[f"{kind}_ms"] = {p: {"median": statistics.median(v), "min": min(v), "max": max(v)} for p, v in table.items()}
    out["profile"] = kernel_table(trainer, top)
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def print_mode(result: dict, nondp_step: float) -> None:
    clock = result.get("device_ms") or result["host_ms"]
    step = clock["step"]["median"]
    ratio = f" = {step / nondp_step:.2f}x nondp" if nondp_step else ""
    print(f"\n## {result['mode']}: step {step:.1f} ms [{clock['step']['min']:.1f}-{clock['step']['max']:.1f}]{ratio}"
          + (f", peak {result['peak_mib']:.0f} MiB" if "peak_mib" in result else ""))
    print(f"   loss: {result['loss_call']}")
    for phase, dev in clock.items():
        host = result["host_ms"][phase]["median"]
        print(f"   {phase:14s} device {dev['median']:8.2f} ms   host {host:8.2f} ms" + ("   host-bound" if host > dev["median"] * 1.05 and "device_ms" in result else ""))
    prof = result["profile"]
    print(f"   {prof['operator_calls']} operator calls, {prof['kernel_launches']} kernel launches, kernels busy {prof['kernel_busy_ms']:.1f} ms "
          "(the device's own work, without waiting for the host); top operators by self device time:")
    for row in prof["top"]:
        print(f"     {row['self_device_ms']:8.2f} ms  x{row['calls']:<5d} {row['op'][:90]}")


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True, help="NAME:T:B, e.g. hf_llama:1024:8 (dit::2 for DiT-L at B 2)")
    parser.add_argument("--modes", nargs="+", default=["nondp", "bk", "flash_bk"])
    parser.add_argument("--amp", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--small", action="store_true", help="the workload scaled down (default on a CPU)")
    parser.add_argument("--out", help="JSON file for the results (written atomically)")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    workload = build_workload(args.workload, args.small or not torch.cuda.is_available())
    amp = torch.bfloat16 if args.amp == "bf16" else None
    results = []
    print(f"# {workload.name} {args.amp}: {versions()}")
    for mode in args.modes:
        results.append(profile_mode(workload, mode, amp, args.steps, args.top))
        nondp = next((r for r in results if r["mode"] == "nondp"), None)
        nondp_step = (nondp.get("device_ms") or nondp["host_ms"])["step"]["median"] if nondp else None
        print_mode(results[-1], nondp_step)
        sys.stdout.flush()
        if args.out:  # after every mode, so that a run stopped early keeps what it measured
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"workload": workload.name, "amp": args.amp, "environment": versions(), "modes": results}, f, indent=1)
            os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
