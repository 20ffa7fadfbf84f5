"""``summary.txt`` of a profile run, and atomic file writes.

The summary has four tables (memory in MB = 2**20 bytes, time in ms per optimizer step):
  1. time, tokens per second and memory of every experiment, with ratios against ``nondp`` of the
     same model, T, B.  Time is the median of the timed steps, shown with their range (min-max) and
     spread ((max - min) / median); a time ratio is flagged "?" when the steps of either side spread
     by more than UNSTEADY (the ratio is then uncertain by about as much)
  2. the single-step breakdown of each step's peak (components at its largest snapshot + temporaries)
  3. single step vs whole run: the two peaks side by side and what makes them differ
  4. failures (status and the first line of the error)
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Union

from .breakdown import COMPONENTS, largest

SHORT = {
    "parameters": "params",
    "gradients": "grads",
    "optimizer_state": "optim",
    "batch": "batch",
    "autograd_activations": "autograd",
    "clipping_cache": "dp cache",
    "norm_buffers": "norms",
}

# what a component's growth from the single step to the run means
WHY = {
    "gradients": "gradients accumulated over micro-batches",
    "optimizer_state": "optimizer state (created at the first step, held by every later step)",
    "autograd_activations": "activations held by autograd",
    "clipping_cache": "tensors cached by the clipping algorithm",
    "norm_buffers": "norm buffers",
    "parameters": "parameters",
    "batch": "batch",
}


# a time ratio is flagged when the timed steps of either side spread by more than this fraction
UNSTEADY = 0.10
TIME_KEYS = ("median_time_ms", "avg_time_ms", "min_time_ms", "max_time_ms", "time_spread")


def time_stats(times_ms: List[float]) -> Dict[str, float]:
    """The timed steps' median, mean, min, max and spread = (max - min) / median (0 for one step)."""
    median = statistics.median(times_ms)
    return {
        "median_time_ms": median,
        "avg_time_ms": statistics.fmean(times_ms),
        "min_time_ms": min(times_ms),
        "max_time_ms": max(times_ms),
        "time_spread": (max(times_ms) - min(times_ms)) / median,
    }


def median_ms(record: dict) -> float:
    """The median time of a finished experiment's timed steps."""
    return statistics.median(record["step_times_ms"])


def unsteady(record: dict) -> bool:
    """More than UNSTEADY between the fastest and the slowest timed step, relative to the median."""
    return len(record["step_times_ms"]) > 1 and time_stats(record["step_times_ms"])["time_spread"] > UNSTEADY


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: Union[str, bytes]) -> None:
    """Write ``path`` through a temporary file in the same folder and ``os.replace``: a reader sees
    the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 -> what open() would have given
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def baselines(records: List[dict]) -> Dict[str, dict]:
    """{group: the nondp record of that (model, T, B)} for groups whose nondp run succeeded."""
    return {r["config"]["group"]: r for r in records if r["config"]["mode"] == "nondp" and r["status"] == "ok"}


def ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    return None if value is None or not base else value / base


def fmt(value: Optional[float], spec: str = "9.2f") -> str:
    width = int(spec.split(".")[0])
    return f"{value:{spec}}" if value is not None else f"{'-':>{width}}"


def table_time_memory(records: List[dict]) -> List[str]:
    base = baselines(records)
    lines = [
        "Time and memory (x nondp: ratio against nondp of the same model, T, B; ms/step: median of the timed steps,",
        f"min-max: the fastest and the slowest, spread: (max - min) / median; ? : a spread over {UNSTEADY:.0%} on either side)",
        f"{'group':18} {'mode':13} {'status':7} {'ms/step':>9} {'min-max':>17} {'spread':>6} {'x nondp':>8} {'tokens/s':>10} "
        f"{'step peak MB':>13} {'run peak MB':>12} {'x nondp':>8}",
    ]
    flagged = 0
    for r in records:
        b = base.get(r["config"]["group"], {})
        step_peak = (r["breakdown"] or {}).get("peak_mb")
        times = time_stats(r["step_times_ms"]) if r["step_times_ms"] else dict.fromkeys(TIME_KEYS)
        span = f"{times['min_time_ms']:.2f}-{times['max_time_ms']:.2f}" if r["step_times_ms"] else "-"
        spread = f"{times['time_spread']:.0%}" if len(r["step_times_ms"]) > 1 else "-"
        time_ratio = ratio(times["median_time_ms"], median_ms(b) if b else None)
        flag = time_ratio is not None and r is not b and (unsteady(r) or unsteady(b))
        flagged += flag
        lines.append(
            f"{r['config']['group']:18} {r['config']['mode']:13} {r['status']:7} {fmt(times['median_time_ms'])} {span:>17} {spread:>6} "
            f"{fmt(time_ratio, '7.2f')}{'?' if flag else ' '} {fmt(r.get('tokens_per_s'), '10.0f')} {fmt(step_peak, '13.2f')} "
            f"{fmt(r['peak_memory_mb'], '12.2f')} {fmt(ratio(r['peak_memory_mb'], b.get('peak_memory_mb')), '8.2f')}"
        )
    if flagged:
        lines.append(
            f"?: {flagged} time ratio(s) from steps that spread by more than {UNSTEADY:.0%}: uncertain by about as much; "
            "rerun with more --steps on an idle machine"
        )
    return lines


def table_breakdown(records: List[dict]) -> List[str]:
    head = " ".join(f"{SHORT[c]:>8}" for c in COMPONENTS)
    lines = [
        "Single-step breakdown of the step's peak, MB (components at the largest snapshot, + temporaries;",
        "unattributed = measured total - identified components)",
        f"{'experiment':32} {head} {'temps':>8} {'unattr':>8} {'peak':>9}  at",
    ]
    for r in records:
        b = r["breakdown"]
        if b is None:
            continue
        cells = " ".join(f"{b['components_mb'][c]:8.2f}" for c in COMPONENTS)
        lines.append(f"{r['experiment']:32} {cells} {b['temporaries_mb']:8.2f} {b['unattributed_mb']:8.2f} {b['peak_mb']:9.2f}  {b['largest_snapshot']}")
    return lines


def differences(r: dict) -> List[str]:
    """(run peak - step peak) split into named parts that add up to it, largest first (those >= 1%
    of the step peak): the components at the run's largest snapshot minus the single step's at the
    same phase, the single step peaking at another phase, and the temporaries between snapshots."""
    run = largest(r["run"]["snapshots"])
    top = largest(r["snapshots"])
    same = next((s for s in r["snapshots"] if s["phase"] == run["phase"]), top)
    parts = {WHY[c]: run["components_mb"][c] - same["components_mb"][c] for c in COMPONENTS}
    parts["unattributed (e.g. accumulated gradients set aside during a norm pass)"] = run["unattributed_mb"] - same["unattributed_mb"]
    parts[f"the single step peaks {top['phase']}, the run {run['phase']}"] = same["total_mb"] - top["total_mb"]
    parts["temporaries between snapshots"] = (r["run"]["peak_memory_mb"] - run["total_mb"]) - r["breakdown"]["temporaries_mb"]
    floor = 0.01 * r["breakdown"]["peak_mb"]
    named = [f"{name} {delta:+.2f}" for name, delta in sorted(parts.items(), key=lambda kv: -abs(kv[1])) if abs(delta) >= floor]
    reserved = r["run"]["reserved_peak_mb"]
    if reserved is not None:
        named.append(f"allocator fragmentation (max_memory_reserved - max_memory_allocated) {reserved - r['run']['peak_memory_mb']:+.2f}")
    return named or ["nothing measurable"]


def table_step_vs_run(records: List[dict], settings: dict) -> List[str]:
    lines = [
        f"Single step vs whole run: one step of one micro-batch on a fresh model, vs the peak over "
        f"{settings['warmup'] + settings['steps']} steps x {settings['grad_accum']} micro-batches (MB)",
        f"{'experiment':32} {'step peak':>10} {'run peak':>10} {'diff':>9}  what differs (run's largest snapshot - the step's at that phase; parts add up to diff)",
    ]
    for r in records:
        if r["status"] != "ok":
            continue
        step_peak, run_peak = r["breakdown"]["peak_mb"], r["run"]["peak_memory_mb"]
        lines.append(f"{r['experiment']:32} {step_peak:10.2f} {run_peak:10.2f} {run_peak - step_peak:+9.2f}  {'; '.join(differences(r))}")
    if any(r["run"] and r["run"]["reserved_peak_mb"] is None for r in records):
        lines.append("(CPU: the tensor tracker has no allocator, so there is no fragmentation to report)")
    return lines


def table_failures(records: List[dict]) -> List[str]:
    failed = [r for r in records if r["status"] != "ok"]
    if not failed:
        return []
    lines = ["Experiments that did not finish"]
    for r in failed:
        first = (r["error"] or "").strip().splitlines()
        lines.append(f"{r['experiment']:32} {r['status']:8} {first[0] if first else ''}")
    return lines


def header(records: List[dict], settings: dict) -> List[str]:
    r = next((r for r in records if r["status"] == "ok"), records[0])
    v, d = r["versions"], r["device"]
    source = {"cuda_allocator": "CUDA allocator (max_memory_allocated)", "tensor_tracker": "dpkernels live-tensor tracker (CPU)"}
    return [
        f"dpkernels profile: {len(records)} experiments on {d['type']} ({d.get('name', '?')}, {d['torch_threads']} threads)",
        f"versions: torch {v['torch']}, opacus {v['opacus']}, dpkernels {v['dpkernels']}, python {v['python']}",
        f"settings: preset {settings['preset'] or '-'}, size {settings['size']}, steps {settings['steps']} (+{settings['warmup']} warm-up), "
        f"grad-accum {settings['grad_accum']}, optimizer {settings['optimizer']}, amp {settings['amp']}, gpus {settings.get('gpus', 1)}"
        + (" (FSDP2: peak memory of the largest rank, time of the slowest)" if settings.get("gpus", 1) > 1 else ""),
        f"memory: {source[r['memory_source']]}; time: wall time of each of the {settings['steps']} timed optimizer steps (every step in the JSON)",
    ]


def summary_text(records: List[dict], settings: dict) -> str:
    sections = [header(records, settings), table_time_memory(records), table_breakdown(records), table_step_vs_run(records, settings), table_failures(records)]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"


def write_summary(records: List[dict], settings: dict, path: Path) -> str:
    text = summary_text(records, settings)
    write_atomic(path, text)
    return text
