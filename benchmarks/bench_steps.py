"""Step-level benchmarks: one training step (forward, loss, backward, optimizer step) of every mode.

Workloads (dpkernels.models.workloads): GPT-2-small at T=1024 (B=16) and T=4096 (B=4), the seed-000
Llama-style model at T=16384 (B=1, and B=2 where the GPU has the memory), DiT-L (B=2), a stack of
8 Linear(1024, 1024) at T=4096 (B=4) and T=16384 (B=1), and an unmodified transformers
LlamaForCausalLM (d 1024, 8 layers, vocab 32000, untied, T=1024, B=8); scaled down on a CPU.
Precisions: fp32 with TF32 off (the anchors' setting) and bf16 autocast.

Each step's loss is what its user writes (``Workload.loss``): nondp the idiomatic non-private loss
on contiguous logits (or a transformers model's own labels= loss), Opacus modes Opacus's calls,
dpkernels modes the README's criterion call on [B, T, V] logits.  extra_info holds the loss call,
and the time and peak-memory ratios to the non-private step of the same workload and precision,
measured in the same run; for the two-pass modes (ghost, flash) also the floor of a two-pass step
(``step.pass_times``), printed as the test runs.

A quick subset on a GPU: ``-k`` selects workloads, modes and precisions (test ids are
``test_step[<workload>-<mode>-<precision>]``) and DPKERNELS_BENCH_ROUNDS=N fixes the timed rounds.
DPKERNELS_BENCH_ALL=1 also runs the steps ``SLOW`` leaves out.
"""

from __future__ import annotations

import gc
import math
import os

import pytest
import torch

from dpkernels import MODES, SINGLE_PROCESS_MODES
from dpkernels.models.workloads import step_workloads
from dpkernels.profiling import default_device
from dpkernels.profiling.step import STEP_MODES, Trainer, median_step_time_and_peak, pass_times

WORKLOADS = step_workloads(small=not torch.cuda.is_available())
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
OPACUS_MODES = ("opacus_hooks", "opacus_ghost")
# A clip norm small enough to bind for every sample of every workload: a benchmark that never clips
# would not show that clipping happened (the step's cost does not depend on it).
CLIP = 1e-3
# GPU memory (GiB) a workload needs in fp32 non-private training, where it exceeds an 80 GB card.
NEEDS_GIB = {"llama-T16384-B2": 110}
# Steps left out unless DPKERNELS_BENCH_ALL=1: Opacus ghost on the seed-000 Llama at B=2 takes about
# 55 s a step in fp32 on an H200 (6.7x non-private; five steps with the untimed ones, a third of the
# whole set's GPU time), and the same peer is measured at B=1.
SLOW = {("llama-T16384-B2", "opacus_ghost"): "Opacus ghost on llama-T16384-B2 (about 55 s a step on an H200) is measured at B=1"}


@pytest.fixture(scope="session", autouse=True)
def no_tf32():
    """fp32 means fp32: TF32 off for matmuls and convolutions, as in the anchors."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rounds_for(workload, mode: str = "nondp") -> int:
    """Timed rounds: DPKERNELS_BENCH_ROUNDS if set; else 5, or on a GPU 2 for the seed-000 Llama steps
    (seconds each) and 1 for Opacus ghost there."""
    if os.environ.get("DPKERNELS_BENCH_ROUNDS"):
        return int(os.environ["DPKERNELS_BENCH_ROUNDS"])
    if not (torch.cuda.is_available() and workload.B * workload.T >= 16384 and workload.name.startswith("llama")):
        return 5
    return 1 if mode == "opacus_ghost" else 2


def allocated_after_release() -> int:
    """Free what earlier tests left (reference cycles included); bytes still allocated (0 on CPU)."""
    gc.collect()
    if not torch.cuda.is_available():
        return 0
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def setup_peak(start: int, step_peak: int) -> int:
    """Peak bytes of a training setup: on GPU the step's peak allocation above what existed before the
    trainer was built (parameters, gradients, optimizer state, activations); on CPU the bytes the step
    itself adds at its peak (the live-tensor tracker sees only tensors created while it runs)."""
    return torch.cuda.max_memory_allocated() - start if torch.cuda.is_available() else step_peak


@pytest.fixture(scope="session")
def nondp_reference():
    """(median seconds, peak bytes) of the non-private step per (workload, precision), measured once per run."""
    cache = {}

    def get(workload, precision):
        key = (workload.name, precision)
        if key not in cache:
            start = allocated_after_release()
            trainer = Trainer(workload, "nondp", default_device(), PRECISIONS[precision])
            seconds, peak = median_step_time_and_peak(trainer, rounds_for(workload))
            cache[key] = (seconds, setup_peak(start, peak))
            del trainer
            allocated_after_release()
        return cache[key]

    return get


@pytest.fixture(scope="session")
def two_pass_floor():
    """The non-private step's passes (``step.pass_times``) per (workload, precision), measured once per run."""
    cache = {}

    def get(workload, precision):
        key = (workload.name, precision)
        if key not in cache:
            allocated_after_release()
            trainer = Trainer(workload, "nondp", default_device(), PRECISIONS[precision])
            cache[key] = pass_times(trainer, rounds_for(workload))
            del trainer
            allocated_after_release()
        return cache[key]

    return get


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("mode", STEP_MODES)
@pytest.mark.parametrize("workload", WORKLOADS, ids=[w.name for w in WORKLOADS])
def test_step(benchmark, measure, nondp_reference, two_pass_floor, capsys, workload, mode, precision):
    for package in workload.requires:
        pytest.importorskip(package)
    if (workload.name, mode) in SLOW and not os.environ.get("DPKERNELS_BENCH_ALL"):
        pytest.skip(f"{SLOW[workload.name, mode]}; DPKERNELS_BENCH_ALL=1 runs it")
    need = NEEDS_GIB.get(workload.name)
    if need and torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < need * 2**30:
        pytest.skip(f"{workload.name} needs about {need} GiB of GPU memory")
    base_time, base_peak = nondp_reference(workload, precision)
    start = allocated_after_release()
    try:
        trainer = Trainer(workload, mode, default_device(), PRECISIONS[precision], max_grad_norm=CLIP)
        seconds, peak = measure(trainer.step, rounds=rounds_for(workload, mode), workload=workload.name, mode=mode, precision=precision, B=workload.B, T=workload.T,
                                loss_call=trainer.loss_call, nondp_loss_call=workload.loss("nondp").call)
        total = setup_peak(start, peak)
        if mode in SINGLE_PROCESS_MODES:
            # a benchmark that never clips measures nothing: the clip norm must bind
            norms = trainer.model.per_sample_gradient_norms
            assert bool((norms > trainer.model.max_grad_norm).any()), f"{workload.name}/{mode}: no sample was clipped"
    except torch.cuda.OutOfMemoryError:
        if mode in OPACUS_MODES:
            pytest.skip(f"Opacus {mode} ran out of GPU memory on {workload.name}")
        raise
    finally:
        trainer = None
        allocated_after_release()
    benchmark.extra_info.update(nondp_seconds=base_time, time_ratio=seconds / base_time, setup_peak_bytes=total, memory_ratio=total / base_peak)
    if mode in MODES and MODES[mode].passes == 2:
        passes = two_pass_floor(workload, precision)
        benchmark.extra_info.update(passes_seconds=passes, two_pass_floor=passes["two_pass_floor"], two_backward_floor=passes["two_backward_floor"])
        timed = "not timed (--benchmark-disable)" if math.isnan(seconds) else f"{seconds / base_time:.2f}x non-private"
        line = (
            f"{workload.name} {precision} {mode}: {timed}; two-pass floor {passes['two_pass_floor']:.2f}x, "
            f"{passes['two_backward_floor']:.2f}x with norms at the weight gradients' cost "
            f"(forward {passes['forward'] * 1e3:.1f} ms, input-gradient pass {passes['input_backward'] * 1e3:.1f} ms, "
            f"full backward {passes['backward'] * 1e3:.1f} ms)"
        )
        with capsys.disabled():
            print("\n" + line)
