"""Run-to-run spread of the benchmark times, to set the time gate (``--benchmark-compare-fail``).

    python benchmarks/spread.py RUN_A.json RUN_B.json [...]

Each file is a run of the same code on the same machine (``pytest benchmarks --benchmark-only
--benchmark-json=RUN_A.json``).  For every benchmark in all files: the spread of its medians,
max / min - 1.  Prints the largest spreads and a threshold: twice the largest spread, at least 5%
(a clean tree then passes with a margin).  A threshold above 10% cannot catch a 10% slowdown: the
benchmarks that push it there are named, to be made steadier (more rounds) or gated apart.
"""

from __future__ import annotations

import json
import math
import sys


def medians(path: str) -> dict:
    return {b["fullname"]: b["stats"]["median"] for b in json.load(open(path))["benchmarks"] if b.get("stats")}


def main(paths) -> int:
    if len(paths) < 2:
        print(__doc__)
        return 2
    runs = [medians(p) for p in paths]
    common = sorted(set.intersection(*(set(r) for r in runs)))
    spread = sorted(((max(r[n] for r in runs) / min(r[n] for r in runs) - 1, n) for n in common), reverse=True)
    for s, name in spread[:10]:
        print(f"{s:7.2%}  {name}")
    largest = spread[0][0] if spread else 0.0
    threshold = max(5, math.ceil(200 * largest))
    print(f"{len(common)} benchmarks in {len(paths)} runs; largest spread {largest:.2%}; threshold: --benchmark-compare-fail=median:{threshold}%")
    if threshold > 10:
        print("above 10%: a 10% slowdown can pass; the noisiest benchmarks are listed above")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
