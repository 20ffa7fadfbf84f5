"""Replace this device's committed baseline in one command (``tox -e bench-rebaseline``).

    python benchmarks/rebaseline.py [PYTEST ARGS]

Records every benchmark (``pytest benchmarks --benchmark-only --benchmark-save=baseline``) into
benchmarks/baselines/<device-slug>/, and only if every benchmark passed: deletes the older baseline
files of this device, names the new one 0001_baseline.json (so git shows a change, not a new file)
and regenerates the README results table.  On a failure the old baseline is left as it was.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dpkernels.profiling import device_slug

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "benchmarks" / "baselines" / device_slug()


def main(argv) -> int:
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
