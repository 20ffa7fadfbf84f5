"""The benchmark gates as a user meets them: on the CPU's deterministic memory tracker a peak 1% above
or below the baseline fails (a regression, or an improvement the baseline does not record), and so
do 10% more or fewer FLOPs and one more operator call; a test missing from the baseline, or a
baseline without work counts, is an error; a corrupt or missing baseline and a baseline of another
device are refused.

Each case runs pytest in a subprocess on a scratch copy of benchmarks/conftest.py and a one-test
benchmark whose allocation size, matmul rows and extra operator calls come from environment variables.
"""

from __future__ import annotations

import copy
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
    rows = int(os.environ.get("MATMUL_ROWS", "64"))
    extra = int(os.environ.get("EXTRA_OPS", "0"))
    w = torch.ones(64, 64)

    def fn():
        torch.ones(n).sum()  # the peak: 4 n bytes
        y = torch.ones(rows, 64) @ w  # 2 * rows * 64 * 64 FLOPs
        for _ in range(extra):
            y.add_(0)  # one operator call, no memory, no FLOPs

    measure(fn, rounds=1)
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


def run(pytester, *args, floats=262144, rows=64, extra=0):
    pytester._monkeypatch.setenv("ALLOC_FLOATS", str(floats))
    pytester._monkeypatch.setenv("MATMUL_ROWS", str(rows))
    pytester._monkeypatch.setenv("EXTRA_OPS", str(extra))
    return pytester.runpytest_subprocess("--benchmark-storage=file://baselines", *args)


def saved_baseline(pytester) -> Path:
    files = sorted((pytester.path / "baselines").glob("*/*.json"))
    assert len(files) == 1, files
    return files[0]


def test_memory_is_gated_both_ways_to_half_a_percent(bench_dir):
    """The CPU tracker repeats exactly: the same code passes, +1% is a regression, -1% an unrecorded improvement."""
    assert run(bench_dir, "--benchmark-save=base").ret == 0
    assert run(bench_dir, "--benchmark-compare").ret == 0
    grown = run(bench_dir, "--benchmark-compare", floats=int(262144 * 1.01))
    assert grown.ret == 1
    grown.stdout.fnmatch_lines(["*peak memory*> baseline*+ 0.50%*a regression*tox -e bench-rebaseline*"])
    shrunk = run(bench_dir, "--benchmark-compare", floats=int(262144 * 0.99))
    assert shrunk.ret == 1
    shrunk.stdout.fnmatch_lines(["*peak memory*< baseline*an improvement the baseline does not record*"])
    assert run(bench_dir, "--benchmark-compare", "--memory-tolerance=0.02", floats=int(262144 * 1.01)).ret == 0


def test_work_is_gated_both_ways(bench_dir):
    """10% more matmul FLOPs (and, alone, one more operator call) fail on a CPU; 10% fewer FLOPs too."""
    assert run(bench_dir, "--benchmark-save=base").ret == 0
    more = run(bench_dir, "--benchmark-compare", rows=71)
    assert more.ret == 1
    more.stdout.fnmatch_lines(["*flops * > baseline *a regression*"])
    fewer = run(bench_dir, "--benchmark-compare", rows=57)
    assert fewer.ret == 1
    fewer.stdout.fnmatch_lines(["*flops * < baseline *an improvement*"])
    extra_op = run(bench_dir, "--benchmark-disable", "--benchmark-compare", extra=1)
    assert extra_op.ret == 1
    extra_op.stdout.fnmatch_lines(["*op calls * > baseline *a regression*"])


def test_a_baseline_without_work_counts_is_an_error(bench_dir):
    assert run(bench_dir, "--benchmark-save=base").ret == 0
    path = saved_baseline(bench_dir)
    data = json.loads(path.read_text())
    for bench in data["benchmarks"]:
        del bench["extra_info"]["flops"], bench["extra_info"]["op_calls"]
    path.write_text(json.dumps(data))
    result = run(bench_dir, "--benchmark-compare")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*the baseline has no flops, op_calls; re-record it*"])


def test_memory_gate_also_runs_in_fast_mode(bench_dir):
    assert run(bench_dir, "--benchmark-save=base").ret == 0
    fast = run(bench_dir, "--benchmark-disable", "--benchmark-compare", floats=4 * 262144)
    assert fast.ret == 1
    fast.stdout.fnmatch_lines(["*peak memory*> baseline*"])
    assert run(bench_dir, "--benchmark-disable", "--benchmark-compare").ret == 0


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


def load_tool(name: str):
    """A script of benchmarks/ (not a package: it is run by path) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"dpkernels_{name}", CONFTEST.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_flags_a_baseline_without_the_idiomatic_non_private_step():
    """A baseline whose steps record their non-private loss call and whose benchmarks have work counts is
    headed as ratios to the idiomatic non-private step; one without either is headed stale, saying which."""
    table = load_tool("readme_table")
    recorded = json.loads(next((CONFTEST.parent / "baselines" / "cpu").glob("*/*.json")).read_text())
    assert "idiomatic non-private step" in table.table_for("cpu", recorded) and "stale" not in table.table_for("cpu", recorded)
    old = copy.deepcopy(recorded)
    for bench in old["benchmarks"]:
        bench["extra_info"].pop("nondp_loss_call", None)
    head = table.table_for("cpu", old).splitlines()[0]
    assert "**stale**" in head and "idiomatic loop" in head and "work counts" not in head and "recorded " + recorded["datetime"][:10] in head
    uncounted = copy.deepcopy(recorded)
    del uncounted["benchmarks"][0]["extra_info"]["op_calls"]
    head = table.table_for("cpu", uncounted).splitlines()[0]
    assert "**stale**" in head and "work counts" in head and "idiomatic loop" not in head


def test_a_baseline_merged_from_parts_holds_every_part_and_replaces_the_old_one(tmp_path):
    """``rebaseline.py --merge``: the committed CPU baseline split in two parts (as two ``-k`` runs would
    record it) and merged gives back the same benchmarks, in the device's folder, replacing an older file;
    parts of different devices or versions, or repeating a benchmark, are refused."""
    rebaseline = load_tool("rebaseline")
    recorded = json.loads(next((CONFTEST.parent / "baselines" / "cpu").glob("*/*.json")).read_text())
    half = len(recorded["benchmarks"]) // 2
    parts = []
    for i, benches in enumerate((recorded["benchmarks"][:half], recorded["benchmarks"][half:])):
        parts.append(tmp_path / f"part{i}.json")
        parts[-1].write_text(json.dumps(dict(recorded, benchmarks=benches)))
    older = tmp_path / "baselines" / "cpu" / "Old-Machine" / "0001_baseline.json"
    older.parent.mkdir(parents=True)
    older.write_text("{}")
    target = rebaseline.merge(parts, tmp_path / "baselines")
    assert target.parent.parent == tmp_path / "baselines" / "cpu" and target.name == "0001_baseline.json"
    assert not older.exists() and list((tmp_path / "baselines").glob("*/*/*.json")) == [target]
    merged = json.loads(target.read_text())
    assert merged["benchmarks"] == recorded["benchmarks"] and merged["machine_info"] == recorded["machine_info"]

    other = json.loads(parts[1].read_text())
    other["machine_info"]["dpkernels"]["torch"] = "0.0"
    parts[1].write_text(json.dumps(other))
    with pytest.raises(ValueError, match="one set of versions"):
        rebaseline.merge(parts, tmp_path / "baselines")
    with pytest.raises(ValueError, match="more than one part"):
        rebaseline.merge([parts[0], parts[0]], tmp_path / "baselines")
    assert json.loads(target.read_text()) == merged  # a refused merge changes nothing
