"""One experiment in this process (the worker): its step breakdown, run peak and step times, as a JSON record.

``worker_main`` runs a spec and writes its record; a sharded spec runs as one rank of a torchrun group
(``sharded_worker_main``): every rank measures, rank 0 writes the merged record.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import sys
import time
import traceback
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import List, NoReturn, Optional

import torch

from .. import __version__
from . import environment, sharding, step
from .breakdown import MB, Meter, Recorder, instrumented_step, step_breakdown
from .experiments import AMP, workload_of
from .report import TIME_KEYS, time_stats, write_atomic


def use_optimizer(trainer, name: str) -> None:
    """Adam (lr 1e-4) instead of the Trainer's SGD; a DP optimizer keeps wrapping it."""
    if name == "sgd":
        return
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    adam = torch.optim.Adam(params, lr=1e-4)
    if hasattr(trainer.optimizer, "original_optimizer"):
        trainer.optimizer.original_optimizer = adam
    else:
        trainer.optimizer = adam


def build_trainer(spec: dict, device: torch.device):
    """A sharded experiment's amp dtype is FSDP2's mixed-precision parameter dtype, not autocast."""
    amp = AMP[spec["amp"]]
    if spec["sharded"]:
        trainer = step.Trainer(workload_of(spec), spec["mode"], device, shard=partial(sharding.shard_blocks, param_dtype=amp))
    else:
        trainer = step.Trainer(workload_of(spec), spec["mode"], device, amp)
    use_optimizer(trainer, spec["optimizer"])
    return trainer


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(spec: dict, device: torch.device, steps: int, micro_batches: int):
    """A fresh Trainer run for ``steps`` instrumented optimizer steps: (trainer, meter, recorder)."""
    trainer = build_trainer(spec, device)
    meter = Meter(device, [*trainer.model.parameters(), *trainer.model.buffers(), *trainer.batch])
    recorder = Recorder(trainer, meter)
    with meter.active():
        for s in range(steps):
            instrumented_step(trainer, recorder, s, micro_batches)
    return trainer, meter, recorder


def time_steps(trainer, steps: int, micro_batches: int) -> List[float]:
    """Wall time (ms) of each of ``steps`` optimizer steps of ``micro_batches`` micro-batches."""
    times = []
    for _ in range(steps):
        environment.synchronize()
        start = time.perf_counter()
        for _ in range(micro_batches):
            trainer.forward_loss().backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        environment.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def versions(probe: bool) -> dict:
    """``environment.versions()`` (which names the GPU: ``probe``) plus python, opacus, transformers."""
    out = environment.versions() if probe else {"torch": torch.__version__, "cuda": torch.version.cuda, "dpkernels": __version__}
    out["python"] = platform.python_version()
    for pkg in ("opacus", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def device_info(device: torch.device, probe: bool) -> dict:
    """The machine; ``probe``: also the GPU's name and memory (this creates a CUDA context, so the
    parent process, which must leave the GPUs to its workers, does not probe)."""
    info = {"type": device.type, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.type == "cuda" and probe:
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, total_memory_mb=props.total_memory / 2**20, count=torch.cuda.device_count())
    elif device.type == "cpu":
        info["name"] = platform.processor() or platform.machine()
    return info


def base_record(spec: dict, probe: bool = True, device: Optional[torch.device] = None) -> dict:
    """The fields every result has, filled for an experiment that has not produced numbers (yet)."""
    config = {k: v for k, v in spec.items() if k != "experiment"}
    device = device or torch.device(spec["device"])
    return {
        "schema": 1, "experiment": spec["experiment"], "status": "failed", "error": None, "config": config,
        "peak_memory_mb": None, **dict.fromkeys(TIME_KEYS), "tokens_per_s": None, "step_times_ms": [], "breakdown": None, "snapshots": [],
        "run": None, "memory_source": "cuda_allocator" if device.type == "cuda" else "tensor_tracker",
        "device": device_info(device, probe), "versions": versions(probe), "started_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "wall_s": None,
    }


def run_experiment(spec: dict, device: torch.device) -> dict:
    """Measure one experiment in this process (step breakdown, run peak, time); see the module doc."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    record, start = base_record(spec, device=device), time.perf_counter()
    trainer, meter, recorder = measure(spec, device, 1, 1)
    record["config"]["tokens"] = trainer.workload.T
    record["config"]["loss_call"] = trainer.loss_call
    record["config"]["parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    record["snapshots"] = recorder.snapshots
    record["breakdown"] = step_breakdown(recorder.snapshots, meter.peak() / MB)
    del trainer, meter, recorder
    release(device)
    trainer, meter, recorder = measure(spec, device, spec["warmup"] + spec["steps"], spec["grad_accum"])
    reserved = meter.reserved_peak()
    record["run"] = {
        "peak_memory_mb": meter.peak() / MB,
        "reserved_peak_mb": None if reserved is None else reserved / MB,
        "steps": spec["warmup"] + spec["steps"], "grad_accum": spec["grad_accum"], "snapshots": recorder.snapshots,
    }
    record["peak_memory_mb"] = record["run"]["peak_memory_mb"]
    record["step_times_ms"] = time_steps(trainer, spec["steps"], spec["grad_accum"])
    record.update(status="ok", memory_source=meter.source, wall_s=time.perf_counter() - start)
    return record


def add_throughput(record: dict) -> dict:
    """The step times' summary (``report.time_stats``), the global batch, and tokens per second of
    one optimizer step at the median time."""
    c = record["config"]
    record.update(time_stats(record["step_times_ms"]))
    c["global_batch"] = c["batch"] * c["gpus"] * c["grad_accum"]
    record["tokens_per_s"] = c["global_batch"] * c["tokens"] / (record["median_time_ms"] / 1e3)
    return record


def merge_ranks(record: dict, device: torch.device) -> dict:
    """One record for all ranks (a collective): the largest rank's peaks, the slowest rank's step
    times, every rank's peak in ``rank_peak_memory_mb``; the breakdown stays rank 0's."""
    run = record["run"]
    record["rank_peak_memory_mb"] = sharding.gather_floats(run["peak_memory_mb"], device)
    record["step_times_ms"] = sharding.max_over_ranks(record["step_times_ms"], device)
    run["peak_memory_mb"] = record["peak_memory_mb"] = max(record["rank_peak_memory_mb"])
    if run["reserved_peak_mb"] is not None:
        run["reserved_peak_mb"] = sharding.max_over_ranks([run["reserved_peak_mb"]], device)[0]
    record["breakdown_rank"] = 0
    return record


def is_oom(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in text or "can't allocate memory" in text


def failure_record(spec: dict, error: BaseException) -> dict:
    record = base_record(spec, probe=False)
    record.update(status="oom" if is_oom(error) else "failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    return record


def worker_main(spec_json: str, result: str) -> int:
    """Run one experiment and write its JSON; a failure is written as such.  0 if it finished."""
    spec = json.loads(spec_json)
    if spec["sharded"]:
        sharded_worker_main(spec, Path(result))  # never returns
    try:
        record = add_throughput(run_experiment(spec, torch.device(spec["device"])))
    except Exception as error:  # recorded in the result, never raised to the parent
        record = failure_record(spec, error)
    write_atomic(Path(result), json.dumps(record, indent=1))
    return 0 if record["status"] == "ok" else 1


def sharded_worker_main(spec: dict, result: Path) -> NoReturn:
    """One rank of a sharded experiment (started by torchrun); rank 0 writes the merged record.

    A rank that fails writes its own record and leaves at once with status 1, and torchrun stops the
    other ranks (which may be waiting in a collective for it).  Ranks leave with ``os._exit``: gloo's
    threads can abort an orderly interpreter teardown after all work is done.
    """
    device = sharding.start(spec["device"])
    rank = torch.distributed.get_rank()
    try:
        record = add_throughput(merge_ranks(run_experiment(spec, device), device))
    except Exception as error:
        record = failure_record(spec, error)
        record["error"] = f"rank {rank}: {record['error']}"
        write_atomic(result, json.dumps(record, indent=1))
        sys.stderr.write(record["traceback"])
        sys.stderr.flush()
        os._exit(1)
    if rank == 0:
        write_atomic(result, json.dumps(record, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
