"""The benchmark gates as a user meets them: a memory regression fails its test, a test missing from
the baseline is an error, a corrupt or missing baseline and a baseline of another device are refused.

Each case runs pytest in a subprocess on a scratch copy of benchmarks/conftest.py and a one-test
benchmark whose allocation size comes from an environment variable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parent.parent / "benchmarks" / "conftest.py"
BENCH = '''
import os
import torch


def test_alloc(measure):
    n = int(os.environ.get("ALLOC_FLOATS", "262144"))
    measure(lambda: torch.ones(n).sum(), rounds=1)
'''
EXTRA = '''

def test_other(measure):
    measure(lambda: torch.ones(8).sum(), rounds=1)
'''


@pytest.fixture
def bench_dir(pytester):
    shutil.copy(CONFTEST, pytester.path / "conftest.py")
    pytester.makepyfile(bench_alloc=BENCH)
    pytester.makeini("[pytest]\npython_files = bench_*.py\naddopts = -p no:cacheprovider --import-mode=importlib\n")
    return pytester


def run(pytester, *args, floats=262144):
    pytester._monkeypatch.setenv("ALLOC_FLOATS", str(floats))
    return pytester.runpytest_subprocess("--benchmark-storage=file://baselines", *args)


def saved_baseline(pytester) -> Path:
    files = sorted((pytester.path / "baselines").glob("*/*.json"))
    assert len(files) == 1, files
    return files[0]


def test_same_memory_passes_and_growth_past_the_tolerance_fails(bench_dir):
    assert run(bench_dir, "--benchmark-save=base").ret == 0
    assert run(bench_dir, "--benchmark-compare").ret == 0
    grown = run(bench_dir, "--benchmark-compare", floats=2 * 262144)
    assert grown.ret == 1
    grown.stdout.fnmatch_lines(["*peak memory*> baseline*"])


def test_memory_gate_also_runs_in_fast_mode(bench_dir):
    assert run(bench_dir, "--benchmark-save=base").ret == 0
    fast = run(bench_dir, "--benchmark-disable", "--benchmark-compare", floats=4 * 262144)
    assert fast.ret == 1
    fast.stdout.fnmatch_lines(["*peak memory*> baseline*"])


def test_a_test_missing_from_the_baseline_is_an_error(bench_dir):
    assert run(bench_dir, "--benchmark-save=base").ret == 0
    bench_dir.makepyfile(bench_alloc=BENCH + EXTRA)
    result = run(bench_dir, "--benchmark-compare")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*test_other is not in the compared baseline*"])


def test_missing_or_corrupt_baseline_is_a_usage_error(bench_dir):
    missing = run(bench_dir, "--benchmark-compare")
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    missing.stderr.fnmatch_lines(["*no baseline file for this device*"])
    assert run(bench_dir, "--benchmark-save=base").ret == 0
    saved_baseline(bench_dir).write_text("{not json")
    corrupt = run(bench_dir, "--benchmark-compare")
    assert corrupt.ret == pytest.ExitCode.USAGE_ERROR
    corrupt.stderr.fnmatch_lines(["*is unreadable or corrupt*"])


def test_a_baseline_of_another_device_is_refused(bench_dir):
    assert run(bench_dir, "--benchmark-save=base").ret == 0
    path = saved_baseline(bench_dir)
    data = json.loads(path.read_text())
    data["machine_info"]["dpkernels"]["device_slug"] = "h100" if data["machine_info"]["dpkernels"]["device_slug"] != "h100" else "h200"
    path.write_text(json.dumps(data))
    refused = run(bench_dir, "--benchmark-compare")
    assert refused.ret != 0
    refused.stderr.fnmatch_lines(["*refusing to compare benchmarks on*"])
