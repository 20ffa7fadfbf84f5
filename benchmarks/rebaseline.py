"""Replace this device's committed baseline in one command (``tox -e bench-rebaseline``).

    python benchmarks/rebaseline.py [PYTEST ARGS]
    python benchmarks/rebaseline.py --merge PART.json [PART.json ...]

Records every benchmark (``pytest benchmarks --benchmark-only --benchmark-save=baseline``) into
benchmarks/baselines/<device-slug>/, and only if every benchmark passed: deletes the older baseline
files of this device, names the new one 0001_baseline.json (so git shows a change, not a new file)
and regenerates the README results table.  On a failure the old baseline is left as it was.

``--merge`` makes the baseline from parts of one run, where a machine may not run the whole set in
one command (a GPU lent for ten minutes at a time): each part is ``pytest benchmarks --benchmark-only
--benchmark-json=PART.json -k SUBSET`` on the same device kind and versions.  The parts must not
repeat a benchmark; the baseline goes to the parts' device folder, wherever this command runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import List

from dpkernels.profiling import device_slug
from dpkernels.profiling.report import write_atomic

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ROOT / "benchmarks" / "baselines"
FOLDER = BASELINES / device_slug()
# what the parts of one baseline must share (machine_info["dpkernels"], profiling.environment.versions)
SAME = ("device_slug", "device", "torch", "cuda", "triton", "dpkernels")


def machine_folder(info: dict) -> str:
    """pytest-benchmark's folder name for a machine, e.g. Linux-CPython-3.12-64bit."""
    bits = "64bit" if info.get("machine", "").endswith("64") else "32bit"
    return f"{info['system']}-{info['python_implementation']}-{'.'.join(info['python_version'].split('.')[:2])}-{bits}"


def merge(parts: List[Path], baselines: Path = BASELINES) -> Path:
    """Write the benchmarks of ``parts`` (pytest-benchmark JSON files) as their device's only baseline
    file, baselines/<device-slug>/<machine>/0001_baseline.json; raise ValueError if the parts differ in
    device, versions or commit, or repeat a benchmark.  Returns the file written."""
    runs = [json.loads(Path(p).read_text()) for p in parts]
    if not runs:
        raise ValueError("no part to merge")
    recorded = [([run["machine_info"].get("dpkernels", {}).get(k) for k in SAME], run.get("commit_info", {}).get("id")) for run in runs]
    for path, (env, commit) in zip(parts, recorded):
        if (env, commit) != recorded[0]:
            raise ValueError(
                f"{path} was recorded on {env} at commit {commit}, {parts[0]} on {recorded[0][0]} at {recorded[0][1]}: "
                "a baseline's parts come from one device kind, one set of versions and one commit"
            )
    counts = Counter(b["fullname"] for run in runs for b in run["benchmarks"])
    repeated = sorted(n for n, k in counts.items() if k > 1)
    if repeated:
        raise ValueError(f"benchmarks recorded in more than one part: {repeated}; split the run with -k so that each is in one part")
    merged = dict(runs[0], benchmarks=[b for run in runs for b in run["benchmarks"]])
    folder = baselines / runs[0]["machine_info"]["dpkernels"]["device_slug"]
    target = folder / machine_folder(runs[0]["machine_info"]) / "0001_baseline.json"
    write_atomic(target, json.dumps(merged, indent=4))
    for old in folder.glob("*/*.json"):
        if old != target:
            old.unlink()
    return target


def main(argv) -> int:
    if argv[:1] == ["--merge"]:
        try:
            target = merge([Path(p) for p in argv[1:]])
        except ValueError as e:
            print(f"rebaseline: {e}; nothing was changed", file=sys.stderr)
            return 2
        print(f"rebaseline: {target.relative_to(ROOT)} ({len(argv) - 1} parts)")
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_table.py")], cwd=ROOT).returncode
    before = set(FOLDER.glob("*/*.json"))
    command = [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "--benchmark-save=baseline", *argv]
    code = subprocess.run(command, cwd=ROOT).returncode
    new = sorted(set(FOLDER.glob("*/*.json")) - before)
    if code != 0 or len(new) != 1:
        for path in new:
            path.unlink()
        print(f"rebaseline: pytest exited {code} with {len(new)} new file(s); the baseline in {FOLDER} is unchanged", file=sys.stderr)
        return code or 1
    for path in before:
        path.unlink()
    target = new[0].with_name("0001_baseline.json")
    new[0].rename(target)
    print(f"rebaseline: {target.relative_to(ROOT)}")
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_table.py")], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
