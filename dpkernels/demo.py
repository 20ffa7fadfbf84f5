"""A short demo: a small GPT-style model trained a few steps in each mode.

For each mode it prints the relative error of the first step's update against the float64
oracle (noise 0, some samples clipped), the median time per step and the peak memory the step adds.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from . import SINGLE_PROCESS_MODES
from .models import GPT, GPTConfig
from .models.workloads import Workload
from .profiling.step import Trainer, median_step_time_and_peak
from .testing import Case, dp_update, oracle_update, total_norm


def gpt_case(vocab: int, d: int, layers: int, T: int) -> Case:
    cfg = GPTConfig(vocab=vocab, d=d, layers=layers, heads=max(1, d // 16), max_len=T)
    return Case(
        "gpt",
        lambda: GPT(cfg),
        lambda B: (torch.randint(0, vocab, (B, T)), torch.randint(0, vocab, (B, T))),
        logits_of=lambda out: out.transpose(1, 2),
    )


def oracle_error(case: Case, model: nn.Module, batch, mode: str) -> float:
    """||update - oracle|| / ||oracle|| over all parameters, float32 model vs float64 oracle."""
    C, expected, _ = oracle_update(model, batch, case, "mean")
    got = dp_update(model, batch, case, mode, C, "mean")
    diff = [got[n].double() - expected[n] for n in expected]
    return total_norm(diff) / total_norm(expected.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dpkernels demo", description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=101)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if min(args.batch, args.seq, args.d, args.layers, args.vocab, args.steps) < 1:
        parser.error("all sizes must be positive")

    torch.manual_seed(0)
    case = gpt_case(args.vocab, args.d, args.layers, args.seq)
    model = case.build()
    batch = case.batch(args.batch)
    device = torch.device(args.device)
    print(f"GPT-style model: d={args.d}, layers={args.layers}, vocab={args.vocab}, B={args.batch}, T={args.seq}, device={device}")
    workload = Workload("gpt", case, args.batch, args.seq)
    base_time, base_mem = median_step_time_and_peak(Trainer(workload, "nondp", device), args.steps)
    print(f"{'mode':10} {'error vs fp64 oracle':>21} {'ms/step':>9} {'x nondp':>8} {'peak MB':>9} {'x nondp':>8}")
    print(f"{'nondp':10} {'-':>21} {base_time * 1e3:9.1f} {1.0:8.2f} {base_mem / 2**20:9.2f} {1.0:8.2f}")
    for mode in SINGLE_PROCESS_MODES:
        error = oracle_error(case, model, batch, mode)
        t, mem = median_step_time_and_peak(Trainer(workload, mode, device), args.steps)
        print(f"{mode:10} {error:21.2e} {t * 1e3:9.1f} {t / base_time:8.2f} {mem / 2**20:9.2f} {mem / max(base_mem, 1):8.2f}")
    return 0
