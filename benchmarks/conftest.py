"""pytest-benchmark fixtures that record time, peak memory and work, with per-device baselines and gates.

What pytest-benchmark does not do, done here:
  * storage per device kind: baselines live in benchmarks/baselines/<device-slug>/ (cpu, h100, h200),
    set as the default ``--benchmark-storage``;
  * machine info gets the GPU, CUDA, torch, triton and dpkernels versions, and comparing against a
    baseline of another device kind is refused (an error, not pytest-benchmark's warning);
  * ``measure``: warm-up, a synchronised timed callable for ``benchmark.pedantic``, then one untimed
    call for peak memory (CUDA allocator on GPU, dpkernels' live-tensor tracker on CPU, Python's
    garbage collector paused so the peak is the same on every run) and one for the work: FLOPs
    (``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions, attention) and operator calls
    (every ATen operator dispatched; Triton kernels are neither), all in extra_info;
  * gates under ``--benchmark-compare`` (also with ``--benchmark-disable``, CI's fast mode), both ways:
      memory  |peak - baseline| <= baseline x ``--memory-tolerance`` + ``--memory-floor``; defaults
              0.5% + 0 bytes on the CPU tracker (deterministic), 2% + 64 KiB on the CUDA allocator
      work    FLOPs and operator calls within ``--work-tolerance`` (default 0.5%) of the baseline
    growth is a regression; a drop past the tolerance is an improvement the baseline has not
    recorded, and fails too (re-record: `tox -e bench-rebaseline`), so the baseline is a ratchet.
    A test missing from the baseline, or a baseline without work counts, is an error; a missing or
    corrupt baseline file is a usage error.
Time is gated by pytest-benchmark itself, on GPUs (``tox -e bench``: ``--benchmark-compare-fail``,
threshold from the run-to-run spread, see benchmarks/README.md); CPU CI runs in fast mode, untimed.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from dpkernels.profiling import default_device, device_slug, peak_memory, synchronize, versions

BASELINES = Path(__file__).parent / "baselines"


def pytest_addoption(parser):
    group = parser.getgroup("dpkernels benchmarks")
    group.addoption("--memory-tolerance", type=float, default=None, help="allowed relative peak-memory change from the baseline, either way (default 0.005 on the CPU tracker, 0.02 on CUDA)")
    group.addoption("--memory-floor", type=int, default=None, help="allowed absolute peak-memory change in bytes on top of the tolerance (default 0 on the CPU tracker, 64 KiB on CUDA)")
    group.addoption("--work-tolerance", type=float, default=0.005, help="allowed relative change of FLOPs and operator calls from the baseline, either way (default 0.005)")


def _compare_targets(config) -> list:
    """The baseline files ``--benchmark-compare`` will load (latest file, a number, a glob or a path)."""
    compare = config.getoption("benchmark_compare")
    folder = Path(config.getoption("benchmark_storage").replace("file://", ""))
    files = sorted(folder.glob("*/*.json"))
    if compare is True:
        return files[-1:]
    if os.path.isfile(str(compare)):
        return [Path(compare)]
    return [f for f in files if f.name.startswith(str(compare)) or f.match(str(compare)) or f.name.startswith(f"{str(compare):0>4}_")]


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if config.getoption("benchmark_storage", None) in (None, "file://./.benchmarks"):
        config.option.benchmark_storage = f"file://{BASELINES / device_slug()}"
    if not config.getoption("benchmark_compare", None):
        return
    targets = _compare_targets(config)
    if not targets:
        raise pytest.UsageError(
            f"--benchmark-compare: no baseline file for this device in {config.option.benchmark_storage}; "
            f"record one with `tox -e bench-baseline` (see benchmarks/README.md)"
        )
    for path in targets:
        try:
            data = json.loads(path.read_text())
            data["benchmarks"], data["machine_info"]["dpkernels"]["device_slug"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise pytest.UsageError(f"baseline {path} is unreadable or corrupt ({type(e).__name__}: {e}); re-record it with `tox -e bench-baseline`")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["dpkernels"] = versions()


def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info, compared_benchmark):
    ours = machine_info["dpkernels"]["device_slug"]
    theirs = compared_benchmark["machine_info"].get("dpkernels", {}).get("device_slug")
    if ours != theirs:
        raise pytest.UsageError(f"refusing to compare benchmarks on {ours!r} with a baseline recorded on {theirs!r}")


def baseline_entry(config, fullname: str):
    """The compared baseline record of this test (None when not comparing); a missing one is an error."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.compared_mapping:
        return None
    for mapping in session.compared_mapping.values():
        if fullname in mapping:
            return mapping[fullname]
    pytest.fail(f"{fullname} is not in the compared baseline: record a new baseline (tox -e bench-baseline)", pytrace=False)


# (relative tolerance, absolute floor in bytes) per memory source: the CPU tracker counts tensor
# storages and repeats exactly; the CUDA allocator rounds blocks and libraries keep workspaces
MEMORY_DEFAULTS = {"tensor_tracker": (0.005, 0), "cuda_allocator": (0.02, 64 * 1024)}
REFRESH = "if the change is intended, re-record this device's baseline: tox -e bench-rebaseline (benchmarks/README.md)"


def check_both_ways(what: str, value: float, base: float, tolerance: float, floor: float = 0, unit=lambda x: f"{x:,.0f}") -> None:
    """Fail if ``value`` is more than base x tolerance + floor above (a regression) or below (an
    improvement the baseline does not record) ``base``."""
    slack = base * tolerance + floor
    if value > base + slack:
        pytest.fail(f"{what} {unit(value)} > baseline {unit(base)} + {tolerance:.2%} ({value / base - 1 if base else float('inf'):+.2%}): a regression; {REFRESH}", pytrace=False)
    if value < base - slack:
        pytest.fail(f"{what} {unit(value)} < baseline {unit(base)} - {tolerance:.2%} ({value / base - 1:+.2%}): an improvement the baseline does not record; {REFRESH}", pytrace=False)


def check_memory(config, fullname: str, peak: int, source: str) -> None:
    entry = baseline_entry(config, fullname)
    if entry is None:
        return
    tolerance, floor = MEMORY_DEFAULTS[source]
    tolerance = config.getoption("memory_tolerance") if config.getoption("memory_tolerance") is not None else tolerance
    floor = config.getoption("memory_floor") if config.getoption("memory_floor") is not None else floor
    check_both_ways("peak memory", peak, entry["extra_info"]["peak_bytes"], tolerance, floor, unit=lambda b: f"{b / 2**20:.4f} MiB")


def check_work(config, fullname: str, work: dict) -> None:
    entry = baseline_entry(config, fullname)
    if entry is None:
        return
    missing = [k for k in work if k not in entry["extra_info"]]
    if missing:
        pytest.fail(f"{fullname}: the baseline has no {', '.join(missing)}; re-record it: tox -e bench-rebaseline", pytrace=False)
    for key, value in work.items():
        check_both_ways(key.replace("_", " "), value, entry["extra_info"][key], config.getoption("work_tolerance"))


class OperatorCounter(TorchDispatchMode):
    """Counts the ATen operator calls dispatched inside the ``with`` block (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def count_work(fn) -> dict:
    """{"flops": FLOPs of one call of ``fn``, "op_calls": ATen operator calls in it}."""
    with FlopCounterMode(display=False) as flops, OperatorCounter() as ops:
        fn()
    return {"flops": flops.get_total_flops(), "op_calls": ops.calls}


@pytest.fixture
def measure(benchmark, request):
    """``measure(fn, rounds=5, warmup=1, **info)``: time ``fn`` with pytest-benchmark, then its peak
    memory and its work (FLOPs, operator calls) in one untimed call each, gated on the baseline.

    Returns (median seconds, peak bytes).  extra_info gets peak_bytes (what one call adds at its peak
    over the memory already allocated), peak_total_bytes on CUDA, flops, op_calls, the device and ``info``.
    """

    def run(fn, rounds: int = 5, warmup: int = 1, **info):
        def timed():
            fn()
            synchronize()

        for _ in range(warmup):
            timed()
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
        gc.collect()
        gc.disable()  # a collection inside the call would free cycles at a moment that varies by run
        try:
            with peak_memory(default_device()) as mem:
                fn()
        finally:
            gc.enable()
        peak = mem["peak_bytes"]
        work = count_work(fn)
        synchronize()
        benchmark.extra_info.update(peak_bytes=peak, memory_source=mem["source"], device=versions()["device"], **work, **info)
        if default_device().type == "cuda":
            benchmark.extra_info["peak_total_bytes"] = torch.cuda.max_memory_allocated()
        check_memory(request.config, benchmark.fullname, peak, mem["source"])
        check_work(request.config, benchmark.fullname, work)
        median = benchmark.stats.stats.median if benchmark.stats else float("nan")
        return median, peak

    return run
