"""pytest-benchmark fixtures that record time AND peak memory, with per-device baselines and gates.

What pytest-benchmark does not do, done here:
  * storage per device kind: baselines live in benchmarks/baselines/<device-slug>/ (cpu, h100, h200),
    set as the default ``--benchmark-storage``;
  * machine info gets the GPU, CUDA, torch, triton and dpkernels versions, and comparing against a
    baseline of another device kind is refused (an error, not pytest-benchmark's warning);
  * a memory gate: under ``--benchmark-compare``, a test whose peak memory exceeds its baseline by more
    than ``--memory-tolerance`` (default 2%) plus ``--memory-floor`` bytes fails, and a test missing
    from the baseline is an error; a missing or corrupt baseline file is a usage error;
  * ``measure``: warm-up, a synchronised timed callable for ``benchmark.pedantic``, one extra untimed
    call for peak memory (CUDA allocator on GPU, dpkernels' live-tensor tracker on CPU), extra_info.
Time regressions are gated by pytest-benchmark itself: ``--benchmark-compare-fail=median:25%``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dpkernels.profiling import default_device, device_slug, peak_memory, synchronize, versions

BASELINES = Path(__file__).parent / "baselines"


def pytest_addoption(parser):
    group = parser.getgroup("dpkernels benchmarks")
    group.addoption("--memory-tolerance", type=float, default=0.02, help="allowed relative peak-memory growth over the baseline (default 0.02)")
    group.addoption("--memory-floor", type=int, default=64 * 1024, help="allowed absolute peak-memory growth in bytes on top of the tolerance (default 64 KiB)")


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


def check_memory(config, fullname: str, peak: int) -> None:
    entry = baseline_entry(config, fullname)
    if entry is None:
        return
    base = entry["extra_info"]["peak_bytes"]
    limit = base * (1 + config.getoption("memory_tolerance")) + config.getoption("memory_floor")
    if peak > limit:
        pytest.fail(f"peak memory {peak / 2**20:.2f} MiB > baseline {base / 2**20:.2f} MiB + tolerance ({limit / 2**20:.2f} MiB)", pytrace=False)


@pytest.fixture
def measure(benchmark, request):
    """``measure(fn, rounds=5, warmup=1, **info)``: time ``fn`` with pytest-benchmark, then its peak memory.

    Returns (median seconds, peak bytes).  extra_info gets peak_bytes (what one call adds at its peak
    over the memory already allocated), peak_total_bytes on CUDA, the device and ``info``.
    """

    def run(fn, rounds: int = 5, warmup: int = 1, **info):
        def timed():
            fn()
            synchronize()

        for _ in range(warmup):
            timed()
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
        with peak_memory(default_device()) as mem:
            fn()
        peak = mem["peak_bytes"]
        benchmark.extra_info.update(peak_bytes=peak, memory_source=mem["source"], device=versions()["device"], **info)
        if default_device().type == "cuda":
            benchmark.extra_info["peak_total_bytes"] = torch.cuda.max_memory_allocated()
        check_memory(request.config, benchmark.fullname, peak)
        median = benchmark.stats.stats.median if benchmark.stats else float("nan")
        return median, peak

    return run
