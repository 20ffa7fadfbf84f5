"""benchmarks/phases.py, the per-phase profile of one step, as a user runs it (on CPU: a scaled-down workload)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_phases_writes_each_modes_phases_and_its_step(tmp_path):
    out = tmp_path / "phases.json"
    command = [sys.executable, "benchmarks/phases.py", "--workload", "bert:8:3", "--modes", "nondp", "bk", "--steps", "2", "--top", "3", "--out", str(out)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["workload"] == "bert-T8-B3" and [m["mode"] for m in result["modes"]] == ["nondp", "bk"]
    nondp, bk = result["modes"]
    assert set(nondp["host_ms"]) == {"forward", "backward", "optimizer", "zero_grad", "step"}
    assert set(bk["host_ms"]) == {"forward", "norm_pass", "clipped_grads", "noise", "optimizer", "zero_grad", "step"}
    for mode in result["modes"]:
        phases = {p: v for p, v in mode["host_ms"].items() if p != "step"}
        assert all(0 <= v["min"] <= v["median"] <= v["max"] for v in mode["host_ms"].values())
        # the step's slowest run cannot be shorter than the sum of its phases' fastest runs
        assert mode["host_ms"]["step"]["max"] >= sum(v["min"] for v in phases.values()) * (1 - 1e-9)
        assert mode["profile"]["operator_calls"] > 0 and len(mode["profile"]["top"]) == 3
    assert bk["profile"]["operator_calls"] > nondp["profile"]["operator_calls"]  # the norms are work nondp does not do
    assert "## bk: step" in run.stdout and "x nondp" in run.stdout
