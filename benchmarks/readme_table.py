"""Write the README's results table from the committed baseline files (never typed by hand).

    python benchmarks/readme_table.py            # rewrites the block between the README markers
    python benchmarks/readme_table.py --check    # exits 1 if the README is out of date

For every device kind under benchmarks/baselines/, the newest baseline file's step-level results:
per workload and precision, each mode's time and peak memory as ratios to non-private training
measured in the same run; "–" where a mode was not run (out of memory, or left out as too slow).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from dpkernels.profiling.report import write_atomic

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ROOT / "benchmarks" / "baselines"
README = ROOT / "README.md"
BEGIN, END = "<!-- results-table:begin -->", "<!-- results-table:end -->"
MODE_ORDER = ("opacus_hooks", "opacus_ghost", "ghost", "bk", "flash", "flash_bk")


def newest_baseline(device_dir: Path):
    files = sorted(device_dir.glob("*/*.json"))
    return json.loads(files[-1].read_text()) if files else None


def step_rows(data: dict):
    """{(workload, precision): {mode: (time_ratio, memory_ratio)}} from one baseline file."""
    rows = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if "time_ratio" in info:
            rows[(info["workload"], info["precision"])][info["mode"]] = (info["time_ratio"], info["memory_ratio"])
    return rows


def against(data: dict) -> str:
    """What the ratios of a baseline are against: the non-private step its steps recorded
    (``nondp_loss_call``); a baseline from before that was recorded, or without the work counts the
    gates compare (``flops``, ``op_calls``), is headed stale, saying which."""
    steps = [b["extra_info"] for b in data["benchmarks"] if "time_ratio" in b["extra_info"]]
    missing = []
    if not (steps and all("nondp_loss_call" in info for info in steps)):
        missing.append("recorded before the non-private step was the idiomatic loop (its non-private step used the DP "
                       "criterion's loss layout, so these ratios understate the cost of DP)")
    if not all("flops" in b["extra_info"] and "op_calls" in b["extra_info"] for b in data["benchmarks"]):
        missing.append("without the work counts the gates compare")
    if not missing:
        return "ratios to the idiomatic non-private step of the same run"
    return f"**stale**: {'; '.join(missing)}; re-record it on this GPU (`python benchmarks/rebaseline.py`)"


def table_for(device: str, data: dict) -> str:
    env = data["machine_info"]["dpkernels"]
    rows = step_rows(data)
    modes = [m for m in MODE_ORDER if any(m in r for r in rows.values())]
    head = (f"**{env['device']}** (torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, dpkernels {env['dpkernels']}; "
            f"recorded {data['datetime'][:10]}): time / peak memory as × non-private; {against(data)}\n\n")
    lines = ["| workload | precision | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    for (workload, precision), by_mode in sorted(rows.items()):
        cells = [f"{by_mode[m][0]:.2f} / {by_mode[m][1]:.2f}" if m in by_mode else "–" for m in modes]
        lines.append(f"| {workload} | {precision} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def render() -> str:
    parts = []
    for device_dir in sorted(p for p in BASELINES.iterdir() if p.is_dir()):
        data = newest_baseline(device_dir)
        if data is not None:
            parts.append(table_for(device_dir.name, data))
    return "\n".join(parts) if parts else "(no baselines recorded yet)\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the README table is out of date")
    args = parser.parse_args(argv)
    text = README.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md has no {BEGIN} ... {END} block", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    updated = f"{head}{BEGIN}\n{render()}{END}{tail}"
    if args.check:
        if updated != text:
            print("README results table is out of date: run python benchmarks/readme_table.py", file=sys.stderr)
            return 1
        return 0
    write_atomic(README, updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
