"""Benchmark of the flash Linear norm against PyTorch baselines and the machine's roofline (CUDA only).

    python benchmarks/kernel_bench.py --out DIR [--dtypes bfloat16 float32] [--tune]

A script run by its path, with dpkernels installed (``pip install -e .``) or on PYTHONPATH: never
imported as ``benchmarks.kernel_bench`` (the Opacus wheel installs a top-level ``benchmarks`` package).

Per shape (B, T, d, p) and dtype, timed with triton.testing.do_bench (median ms):
    flash  flash_weight_norm_sq(A, G) (the kernel picked by the cost rule)
    bmm    W = torch.bmm(G^T, A) [B, p, d], then ||W_i||^2            (materialised per-sample grads)
    gram   einsum Grams A A^T, G G^T [B, T, T], then sum of the product (Opacus ghost clipping;
           skipped when 2 B T^2 * 4 bytes > 8 GB)
and the extra GPU memory of one call (peak allocated minus allocated before, MB).

Ceilings, measured once: device-to-device copy bandwidth (read + write bytes of a 2 GiB copy) and
matmul rates of 8192^3 GEMMs in fp32 (TF32 off), tf32 and bf16.  Floor of a case:
    max((bytes(A) + bytes(G)) / bandwidth, min(2 B T d p, 2 B T^2 (d + p)) / rate(dtype))
with rate(float32) the fp32 (no TF32) GEMM rate, since the kernels use the exact fp32 dot.

Writes DIR/flash_norm.json and DIR/flash_norm.md (each via a temp file and os.replace).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from dpkernels.kernels import flash_linear_norm_sq, flash_weight_norm_sq
from dpkernels.kernels.heuristics import GramConfig, PsgConfig, cdiv, choose_kernel
from dpkernels.profiling.report import write_atomic

T_VALUES = (256, 1024, 4096, 16384, 32768)
B_VALUES = (1, 8, 32)
DP_VALUES = ((256, 256), (1024, 1024), (4096, 4096), (8192, 8192), (768, 3072))
# Inputs per case at most 2^28 (bf16) / 2^27 (fp32) elements of the larger of A, G; fp32 cases also
# at most 2 TFLOP (the exact fp32 dot runs on CUDA cores): keeps the sweep under 4 minutes on an H100.
MAX_ELEMENTS = {torch.bfloat16: 2**28, torch.float32: 2**27}
MAX_FP32_FLOP = 2e12
BASELINE_BYTES = 8 * 2**30
MB = 2**20


def flops(B: int, T: int, d: int, p: int) -> float:
    """Flops of the cheaper exact strategy: min(2 B T d p, 2 B T^2 (d + p))."""
    return float(min(2 * B * T * d * p, 2 * B * T * T * (d + p)))


def sweep(dtype: torch.dtype) -> List[tuple]:
    """The (B, T, d, p) cases run for ``dtype``."""
    cases = []
    for d, p in DP_VALUES:
        for T in T_VALUES:
            for B in B_VALUES:
                if B * T * max(d, p) > MAX_ELEMENTS[dtype]:
                    continue
                if dtype == torch.float32 and flops(B, T, d, p) > MAX_FP32_FLOP:
                    continue
                cases.append((B, T, d, p))
    return cases


def median_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def extra_mb(fn: Callable[[], object]) -> float:
    """Peak GPU memory allocated by one call beyond what was allocated before it (MB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MB


def gemm_tflops(dtype: torch.dtype, tf32: bool, n: int = 8192) -> float:
    """TFLOP/s of an n^3 matmul in ``dtype`` (TF32 tensor cores iff ``tf32`` for float32)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        ms = median_ms(lambda: a @ b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n**3 / ms / 1e9


def copy_gbps(nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def ceilings() -> Dict[str, float]:
    return {
        "copy_GBps": copy_gbps(),
        "fp32_TFLOPs": gemm_tflops(torch.float32, tf32=False),
        "tf32_TFLOPs": gemm_tflops(torch.float32, tf32=True),
        "bf16_TFLOPs": gemm_tflops(torch.bfloat16, tf32=False),
    }


def bmm_norm_sq(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Baseline: materialise W = G^T A [B, p, d] in the input dtype, then ||W_i||^2 in fp32."""
    W = torch.bmm(G.transpose(1, 2), A)
    return torch.linalg.vector_norm(W.flatten(1), dim=1, dtype=torch.float32).square()


def gram_norm_sq(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Baseline (Opacus ghost clipping): <A A^T, G G^T>_F with both [B, T, T] Grams in memory."""
    ga = torch.einsum("bti,bsi->bts", A, A)
    gg = torch.einsum("bti,bsi->bts", G, G)
    return (ga * gg).sum(dim=(1, 2), dtype=torch.float32)


def measure(fn: Callable[[], torch.Tensor]) -> Dict[str, Optional[float]]:
    """{"ms", "extra_MB"} of one provider, or None values (with "error") when it runs out of memory."""
    try:
        mem = extra_mb(fn)
        return {"ms": median_ms(fn), "extra_MB": mem}
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        return {"ms": None, "extra_MB": None, "error": str(err).splitlines()[0]}


def run_case(B: int, T: int, d: int, p: int, dtype: torch.dtype, ceil: Dict[str, float]) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    A = torch.randn(B, T, d, device="cuda", dtype=dtype, generator=gen)
    G = torch.randn(B, T, p, device="cuda", dtype=dtype, generator=gen)
    rate = ceil["bf16_TFLOPs" if dtype == torch.bfloat16 else "fp32_TFLOPs"]
    nbytes = (A.numel() + G.numel()) * A.element_size()
    floor_ms = max(nbytes / ceil["copy_GBps"] / 1e6, flops(B, T, d, p) / rate / 1e9)
    row = {"B": B, "T": T, "d": d, "p": p, "dtype": str(dtype).replace("torch.", ""),
           "kernel": choose_kernel(B, T, d, p, dtype), "floor_ms": floor_ms}
    row["flash"] = measure(lambda: flash_weight_norm_sq(A, G))
    row["bmm"] = measure(lambda: bmm_norm_sq(A, G)) if B * d * p * 4 <= BASELINE_BYTES else None
    row["gram"] = measure(lambda: gram_norm_sq(A, G)) if 2 * B * T * T * 4 <= BASELINE_BYTES else None
    if row["flash"]["ms"]:
        row["pct_of_floor"] = 100.0 * floor_ms / row["flash"]["ms"]
    if row["bmm"] and row["bmm"]["ms"]:
        ref = bmm_norm_sq(A, G)
        row["rel_diff_vs_bmm"] = ((flash_weight_norm_sq(A, G) - ref).abs() / ref).max().item()
    return row


def fmt(x: Optional[float], spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    c = result["ceilings"]
    lines = [
        f"# Flash Linear norm on {result['device']}",
        "",
        f"copy {c['copy_GBps']:.0f} GB/s, fp32 {c['fp32_TFLOPs']:.1f}, tf32 {c['tf32_TFLOPs']:.1f}, "
        f"bf16 {c['bf16_TFLOPs']:.1f} TFLOP/s (torch {result['torch']}, triton {result['triton']})",
        "",
        "| B | T | d | p | dtype | kernel | flash ms | % of floor | flash extra MB | bmm ms | bmm extra MB "
        "| gram ms | gram extra MB | rel. diff vs bmm |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["cases"]:
        bmm, gram = r["bmm"] or {}, r["gram"] or {}
        lines.append(
            f"| {r['B']} | {r['T']} | {r['d']} | {r['p']} | {r['dtype']} | {r['kernel']} | {fmt(r['flash']['ms'])} "
            f"| {fmt(r.get('pct_of_floor'), '.0f')} | {fmt(r['flash']['extra_MB'], '.1f')} | {fmt(bmm.get('ms'))} "
            f"| {fmt(bmm.get('extra_MB'), '.1f')} | {fmt(gram.get('ms'))} | {fmt(gram.get('extra_MB'), '.1f')} "
            f"| {fmt(r.get('rel_diff_vs_bmm'), '.1e')} |"
        )
    return "\n".join(lines) + "\n"


# --tune: candidate launch configurations timed on a few shapes, to set heuristics.py's table.
TUNE_SHAPES = {
    torch.bfloat16: [(1, 16384, 4096, 4096), (8, 4096, 1024, 1024), (16, 1024, 768, 3072), (1, 32768, 1024, 1024)],
    torch.float32: [(1, 16384, 1024, 1024), (8, 4096, 1024, 1024), (16, 1024, 768, 3072)],
}
TUNE_PSG = {
    torch.bfloat16: [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 4, 4), (128, 256, 64, 8, 3),
                     (256, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 4, 3)],
    torch.float32: [(64, 64, 32, 4, 2), (64, 64, 32, 4, 3), (128, 64, 32, 8, 2), (64, 128, 32, 8, 2),
                    (128, 128, 32, 8, 2), (64, 64, 16, 4, 3), (32, 64, 32, 4, 3)],
}
TUNE_GRAM_SHAPES = {torch.bfloat16: [(32, 256, 4096, 4096), (8, 1024, 8192, 8192)], torch.float32: [(32, 256, 1024, 1024)]}
TUNE_GRAM = [(64, 64, 8, 3), (64, 32, 4, 3), (32, 64, 4, 3), (64, 128, 8, 3), (32, 32, 4, 4), (64, 64, 4, 4)]


def tune(dtype: torch.dtype) -> List[dict]:
    """ms of every candidate configuration on TUNE_SHAPES (the T split chosen as psg_config does)."""

    programs = 2 * torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for B, T, d, p in TUNE_SHAPES[dtype]:
        A = torch.randn(B, T, d, device="cuda", dtype=dtype)
        G = torch.randn(B, T, p, device="cuda", dtype=dtype)
        ref_ms = median_ms(lambda: bmm_norm_sq(A, G))
        for BP, BD, BT, warps, stages in TUNE_PSG[dtype]:
            tiles = B * cdiv(p, BP) * cdiv(d, BD)
            NS = max(1, min(cdiv(programs, tiles), T // (4 * BT)))
            TS = cdiv(cdiv(T, NS), BT) * BT
            cfg = PsgConfig(BP=BP, BD=BD, BT=BT, TS=TS, num_warps=warps, num_stages=stages)
            ms = median_ms(lambda: flash_linear_norm_sq(A, G, False, "psg", cfg))
            rows.append({"kernel": "psg", "shape": [B, T, d, p], "dtype": str(dtype), "config": [BP, BD, BT, TS, warps, stages], "ms": ms, "bmm_ms": ref_ms})
    for B, T, d, p in TUNE_GRAM_SHAPES[dtype]:
        A = torch.randn(B, T, d, device="cuda", dtype=dtype)
        G = torch.randn(B, T, p, device="cuda", dtype=dtype)
        for BT, BK, warps, stages in TUNE_GRAM:
            if dtype == torch.float32 and BK > 32:
                continue
            cfg = GramConfig(BT=BT, BK=BK, num_warps=warps, num_stages=stages)
            ms = median_ms(lambda: flash_linear_norm_sq(A, G, False, "gram", cfg))
            rows.append({"kernel": "gram", "shape": [B, T, d, p], "dtype": str(dtype), "config": [BT, BK, warps, stages], "ms": ms})
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/kernel_bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for flash_norm.json and flash_norm.md")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--tune", action="store_true", help="time candidate launch configurations instead (writes tune.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the benchmark needs a CUDA device")
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False
    os.makedirs(args.out, exist_ok=True)
    if args.tune:
        rows = [row for name in args.dtypes for row in tune(getattr(torch, name))]
        write_atomic(Path(args.out) / "tune.json", json.dumps(rows, indent=1))
        for r in rows:
            print(r["kernel"], r["dtype"], r["shape"], r["config"], f"{r['ms']:.3f} ms", f"bmm {r.get('bmm_ms', float('nan')):.3f}")
        return
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "ceilings": ceilings(), "cases": []}
    for name in args.dtypes:
        dtype = getattr(torch, name)
        for B, T, d, p in sweep(dtype):
            result["cases"].append(run_case(B, T, d, p, dtype, result["ceilings"]))
            torch.cuda.empty_cache()
    write_atomic(Path(args.out) / "flash_norm.json", json.dumps(result, indent=1))
    write_atomic(Path(args.out) / "flash_norm.md", markdown(result))


if __name__ == "__main__":
    main()
