"""A/B of two checkouts on one GPU (the script run for this folder, kept as it ran).

One process times one checkout: for each workload NAME:T:B:AMP (dit:B:AMP), a Trainer per mode (nondp,
bk, flash_bk), 14 rounds of one synchronised step each with the modes interleaved, the first 2 rounds
dropped; median, min and max ms and the median's ratio to nondp's.  Run it once per checkout, the
checkouts alternating (PYTHONPATH picks which dpkernels is imported):
    PYTHONPATH=OLD_TREE python ab.py old-1.json SPEC...; PYTHONPATH=NEW_TREE python ab.py new-1.json SPEC...
"""
import json, statistics, sys, time, torch
import dpkernels
from dpkernels.models import workloads
from dpkernels.profiling.environment import synchronize
from dpkernels.profiling.step import Trainer

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
out = {"dpkernels": dpkernels.__file__}
import os; DEV = torch.device(os.environ.get("ABDEV", "cuda"))
for spec in sys.argv[2:]:
    name, *nums, amp = spec.split(":")
    w = getattr(workloads, name)(*[int(n) for n in nums], False)
    dt = torch.bfloat16 if amp == "bf16" else None
    trs = {m: Trainer(w, m, DEV, dt, max_grad_norm=1e-3) for m in ("nondp", "bk", "flash_bk")}
    times = {k: [] for k in trs}
    for r in range(14):
        for k, tr in trs.items():
            synchronize(); t = time.perf_counter(); tr.step(); synchronize()
            if r >= 2:
                times[k].append(time.perf_counter() - t)
    base = statistics.median(times["nondp"])
    out[spec] = {k: {"median_ms": statistics.median(v) * 1e3, "ratio": statistics.median(v) / base, "min_ms": min(v) * 1e3, "max_ms": max(v) * 1e3} for k, v in times.items()}
    print(spec, {k: round(v["ratio"], 3) for k, v in out[spec].items()}, "nondp ms", round(base * 1e3, 1), flush=True)
    del trs
    torch.cuda.empty_cache()
json.dump(out, open(sys.argv[1], "w"), indent=1)
