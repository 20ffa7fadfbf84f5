"""``dpkernels profile``: time and memory of every clipping mode, one subprocess per experiment.

An experiment is one (mode, model, sequence length, batch size).  Its worker process measures:

  step   a fresh model, one optimizer step of one micro-batch, with a memory snapshot after each
         phase; ``breakdown``: the step's peak by component (see ``profiling.breakdown``)
  run    a fresh model, --warmup + --steps optimizer steps of --grad-accum micro-batches each;
         ``peak_memory_mb``: the peak over the whole run (and, on CUDA, ``max_memory_reserved``)
  time   --steps more steps of the same run, without instrumentation, each timed: ``step_times_ms``
         lists the wall time of every timed optimizer step (all its micro-batches, synchronised on
         CUDA); ``median_time_ms``, ``avg_time_ms`` (mean), ``min_time_ms``, ``max_time_ms`` and
         ``time_spread`` ((max - min) / median) summarise them, and ``tokens_per_s`` uses the median

With --gpus N (or a ``*_fsdp`` mode) an experiment is N processes started by torchrun, one GPU each
(gloo processes on CPU), on a model sharded with FSDP2 (``distributed.shard_blocks``; --amp bf16 is
FSDP2's mixed precision there), each rank training on its own B samples: the global batch is N x B.
Peak memory is the largest rank's, a step's time the slowest rank's; the breakdown is rank 0's.

Memory is the CUDA allocator's on GPU and dpkernels' live-tensor tracker on CPU.  Each experiment
writes ``<run>/<experiment>.json`` (atomically); a crash, timeout or out-of-memory is recorded
there with its status while the other experiments go on.  Then ``summary.txt`` and the plots.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Dict, List, NoReturn, Optional

import torch

from .. import __version__
from ..models import workloads
from . import distributed, environment, step
from .breakdown import COMPONENTS, MB, Meter, Recorder, instrumented_step, step_breakdown
from .plots import write_plots
from .report import TIME_KEYS, time_stats, write_atomic, write_summary

MODELS = ("gpt", "llama", "llama3", "bert", "dit", "linear")
TRANSFORMERS_MODELS = ("llama", "llama3", "bert")  # need the `models` extra
ALIASES = {"hooks": "opacus_hooks", "vanilla": "nondp"}
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SEQ = {"small": (64, 128), "full": (1024, 2048, 4096)}
DEFAULT_BATCH = {"small": (4,), "full": (8,)}
BERT_SEQ = 128  # seed 002's DistilBERT sequence length

PRESETS: Dict[str, dict] = {
    "seed000": {
        "help": "seed 000: GPT-2-size decoder at T=8192, non-private vs Opacus ghost vs our ghost, flash, bk",
        "models": ["gpt"], "seq": [8192], "batch": [2], "modes": ["nondp", "opacus_ghost", "ghost", "flash", "bk", "flash_bk"],
    },
    "seed002": {
        "help": "seed 002: DistilBERT-style classifier, T=128, B=32, 4 micro-batches per step (step vs run peak)",
        "models": ["bert"], "seq": [128], "batch": [32], "grad_accum": 4, "steps": 5,
        "modes": ["nondp", "opacus_hooks", "opacus_ghost", "ghost", "bk"],
    },
    "dit-l": {
        "help": "seed 003: DiT-L (256x256 images, patch 8: 1024 tokens, d=1024, 24 layers), B=2, 3 steps",
        "models": ["dit"], "batch": [2], "steps": 3, "warmup": 0, "modes": ["nondp", "ghost", "flash", "bk", "flash_bk"],
    },
    "llama-fsdp": {
        "help": "seed 004: Llama-3-8B-shaped classifier, FSDP2 on 2 GPUs, bf16 mixed precision, T=1024/2048/4096, B=2 per GPU",
        "models": ["llama3"], "seq": [1024, 2048, 4096], "batch": [2], "amp": "bf16", "gpus": 2,
        "modes": ["nondp", "ghost_fsdp", "flash_fsdp", "flash_bk_fsdp"],
        "min_gpus": 2, "required_modes": ["ghost_fsdp", "flash_fsdp", "flash_bk_fsdp"],
    },
}


def available_modes() -> tuple:
    """Every mode a Trainer accepts (read at run time: new dpkernels modes appear here by themselves)."""
    return step.STEP_MODES + tuple(m for m in step.SHARDED_MODES if m not in step.STEP_MODES)


def is_fsdp(mode: str) -> bool:
    return mode in step.SHARDED_MODES and mode != "nondp"


# ---- command line ----------------------------------------------------------------------------------


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    modes = ", ".join(available_modes())
    presets = "\n".join(f"  {name:11} {p['help']}" for name, p in PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="dpkernels profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"modes: {modes}, or all (aliases: "
        + ", ".join(f"{a} = {m}" for a, m in ALIASES.items())
        + f")\n\npresets (explicit options override them):\n{presets}\n\n"
        "results, in OUT/run_YYYYMMDD_HHMMSS/: <model>_T<T>_B<B>_<mode>.json (status ok, oom, failed or timeout),\n"
        "summary.txt, plots/*.png (memory breakdown, timeline, against sequence length, trade-off, overhead);\n"
        f"breakdown components (MB): {', '.join(COMPONENTS)}, temporaries, unattributed\n\n"
        "exit status: 0 if every experiment finished or ran out of memory, 1 if one failed or timed out, "
        "2 for bad arguments",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration of the seeds (below)")
    parser.add_argument("--modes", nargs="+", metavar="MODE", help="modes to compare (default: all)")
    parser.add_argument("--models", nargs="+", metavar="MODEL", help=f"models: {', '.join(MODELS)} (default: gpt)")
    parser.add_argument("--seq", nargs="+", type=positive, metavar="T", help="sequence lengths (default: 64 128 on CPU, 1024 2048 4096 on GPU; bert: 128; dit: its patch count)")
    parser.add_argument("--batch", nargs="+", type=positive, metavar="B", help="batch sizes per micro-batch (default: 4 on CPU, 8 on GPU)")
    parser.add_argument("--size", choices=("auto", "small", "full"), default="auto", help="model sizes: the seeds' full sizes, or the same architectures scaled down (auto: full on GPU, small on CPU)")
    parser.add_argument("--steps", type=positive, help="optimizer steps measured in the run and timed (default 3)")
    parser.add_argument("--warmup", type=non_negative, help="untimed optimizer steps at the start of the run, included in its peak (default 1)")
    parser.add_argument("--grad-accum", type=positive, help="micro-batches per optimizer step in the run (default 1)")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="adam (with optimizer state, as in the seeds) or plain sgd (default adam)")
    parser.add_argument("--amp", choices=sorted(AMP), help="autocast dtype of forward and loss; with FSDP2, its mixed-precision parameter dtype (default none: float32)")
    parser.add_argument("--gpus", type=positive, help="processes per experiment, one GPU each (gloo processes on CPU), on an FSDP2-sharded model: modes nondp and *_fsdp only (default 1)")
    parser.add_argument("--layers", type=positive, help="decoder layers of llama3 (default: Llama-3-8B's 32)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--threads", type=positive, help="CPU threads of each experiment (torch.set_num_threads; default: torch's)")
    parser.add_argument("--out", default="profile_results", help="results folder; each run gets a new run_YYYYMMDD_HHMMSS folder inside (default profile_results)")
    parser.add_argument("--timeout", type=positive, default=3600, help="seconds before an experiment is stopped and recorded as timed out (default 3600)")
    parser.add_argument("--no-plots", action="store_true", help="write JSON and summary.txt only")
    parser.add_argument("--single", metavar="SPEC", help="internal: run one experiment (a JSON spec) in this process")
    parser.add_argument("--result", metavar="FILE", help="internal: with --single, where to write its JSON")
    return parser


def canonical_modes(names: List[str], parser: argparse.ArgumentParser) -> List[str]:
    known = available_modes()
    out = []
    for name in (n for item in names for n in item.split(",") if n):
        if name == "all":
            out += [m for m in known if m not in out]
            continue
        mode = ALIASES.get(name, name)
        if mode not in known:
            parser.error(f"unknown mode {name!r}; choose from {', '.join(known)}, all (aliases: {', '.join(ALIASES)})")
        if mode not in out:
            out.append(mode)
    return out


def preset_modes(preset: dict) -> List[str]:
    """A preset's modes that this dpkernels provides (modes still to come, like flash, are skipped)."""
    known = available_modes()
    missing = [m for m in preset["modes"] if m not in known]
    if missing:
        print(f"note: modes not available in this dpkernels, skipped: {', '.join(missing)}", file=sys.stderr)
    return [m for m in preset["modes"] if m in known]


def check_preset(name: str, preset: dict, parser: argparse.ArgumentParser) -> None:
    gpus = torch.cuda.device_count()
    if gpus < preset.get("min_gpus", 0):
        parser.error(f"preset {name} needs {preset['min_gpus']} CUDA GPUs; this machine has {gpus}")
    missing = [m for m in preset.get("required_modes", []) if m not in available_modes()]
    if missing:
        parser.error(f"preset {name} needs the modes {', '.join(missing)}, which this dpkernels does not provide yet")


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The run's settings: explicit options, else the preset's, else the defaults for the device."""
    preset = PRESETS.get(args.preset, {})
    if args.preset:
        check_preset(args.preset, preset, parser)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    size = args.size if args.size != "auto" else ("full" if device == "cuda" else "small")
    models = [m for item in (args.models or preset.get("models", ["gpt"])) for m in item.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    from_transformers = [m for m in models if m in TRANSFORMERS_MODELS]
    if from_transformers and importlib.util.find_spec("transformers") is None:
        parser.error(f"models {', '.join(from_transformers)} are built from transformers configs, and transformers is not installed: "
                     "pip install -e '.[models]' (or choose from gpt, dit, linear)")
    modes = canonical_modes(args.modes, parser) if args.modes else (preset_modes(preset) if preset else list(step.STEP_MODES))
    gpus = args.gpus or preset.get("gpus", 1)
    if gpus > 1 and any(m not in step.SHARDED_MODES for m in modes):
        parser.error(f"--gpus {gpus} shards the model with FSDP2: modes {', '.join(step.SHARDED_MODES)} only")
    if device == "cuda" and torch.cuda.device_count() < gpus:
        parser.error(f"--gpus {gpus}: this machine has {torch.cuda.device_count()} CUDA GPUs")
    return {
        "preset": args.preset,
        "modes": modes,
        "models": list(dict.fromkeys(models)),
        "seq": args.seq or preset.get("seq"),
        "batch": args.batch or preset.get("batch") or list(DEFAULT_BATCH[size]),
        "size": size,
        "steps": args.steps or preset.get("steps", 3),
        "warmup": args.warmup if args.warmup is not None else preset.get("warmup", 1),
        "grad_accum": args.grad_accum or preset.get("grad_accum", 1),
        "optimizer": args.optimizer,
        "amp": args.amp or preset.get("amp", "none"),
        "gpus": gpus,
        "layers": args.layers,
        "device": device,
        "threads": args.threads,
    }


def seq_lengths(model: str, settings: dict) -> List[Optional[int]]:
    """dit has no sequence length of its own choosing (its token count is (image / patch)^2)."""
    if model == "dit":
        return [None]
    if settings["seq"]:
        return list(settings["seq"])
    return [BERT_SEQ] if model == "bert" else list(DEFAULT_SEQ[settings["size"]])


def experiment_specs(settings: dict) -> List[dict]:
    """One spec per (model, T, B, mode), in that nesting order."""
    keys = ("size", "steps", "warmup", "grad_accum", "optimizer", "amp", "device", "threads", "layers")
    # an FSDP2 comparison (several GPUs, or a *_fsdp mode) runs its nondp baseline sharded as well
    fsdp_run = settings["gpus"] > 1 or any(is_fsdp(m) for m in settings["modes"])
    specs = []
    for model in settings["models"]:
        for T in seq_lengths(model, settings):
            for B in settings["batch"]:
                for mode in settings["modes"]:
                    group = f"{model}_B{B}" if T is None else f"{model}_T{T}_B{B}"
                    sharded = fsdp_run and mode in step.SHARDED_MODES
                    specs.append({"experiment": f"{group}_{mode}", "group": group, "mode": mode, "model": model,
                                  "seq_len": T, "batch": B, "sharded": sharded, "gpus": settings["gpus"] if sharded else 1,
                                  **{k: settings[k] for k in keys}})
    return specs


# ---- one experiment (the worker process) --------------------------------------------------------------


def workload_of(spec: dict):
    small, T, B = spec["size"] == "small", spec["seq_len"], spec["batch"]
    if spec["model"] == "dit":
        return workloads.dit(B, small)
    if spec["model"] == "llama3":
        return workloads.llama3(T, B, small, spec["layers"])
    build = {"gpt": workloads.gpt2, "llama": workloads.llama, "bert": workloads.bert, "linear": workloads.linear_stack}
    return build[spec["model"]](T, B, small)


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
        trainer = step.Trainer(workload_of(spec), spec["mode"], device, shard=partial(distributed.shard_blocks, param_dtype=amp))
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
    record["rank_peak_memory_mb"] = distributed.gather_floats(run["peak_memory_mb"], device)
    record["step_times_ms"] = distributed.max_over_ranks(record["step_times_ms"], device)
    run["peak_memory_mb"] = record["peak_memory_mb"] = max(record["rank_peak_memory_mb"])
    if run["reserved_peak_mb"] is not None:
        run["reserved_peak_mb"] = distributed.max_over_ranks([run["reserved_peak_mb"]], device)[0]
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
    device = distributed.start(spec["device"])
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


# ---- the experiment matrix (the parent process) ----------------------------------------------------------


def new_run_dir(root: Path) -> Path:
    """``root/run_YYYYMMDD_HHMMSS`` (``_2``, ``_3``... if taken): never an earlier run's folder."""
    stamp = datetime.datetime.now().strftime("run_%Y%m%d_%H%M%S")
    for i in range(1, 1000):
        path = root / (stamp if i == 1 else f"{stamp}_{i}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder under {root}")


def worker_command(spec: dict, result: Path) -> List[str]:
    """``python -m dpkernels profile --single``; a sharded experiment: under torchrun, one per GPU."""
    launcher = [sys.executable]
    if spec["sharded"]:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={spec['gpus']}"]
    return launcher + ["-m", "dpkernels", "profile", "--single", json.dumps(spec), "--result", str(result)]


def crash_record(spec: dict, status: str, error: str) -> dict:
    record = base_record(spec, probe=False)
    record.update(status=status, error=error)
    return record


def run_one(spec: dict, run_dir: Path, timeout: float) -> dict:
    """Run one experiment in a subprocess; its JSON, or a record of how the worker died."""
    path = run_dir / f"{spec['experiment']}.json"
    try:
        proc = subprocess.run(worker_command(spec, path), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        record = crash_record(spec, "timeout", f"stopped after {timeout} s")
        write_atomic(path, json.dumps(record, indent=1))
        return record
    if path.exists():
        return json.loads(path.read_text())
    tail = proc.stderr[-2000:]
    status = "oom" if "out of memory" in tail.lower() else "failed"
    killed = " (SIGKILL: the kernel's out-of-memory killer?)" if proc.returncode == -9 else ""
    record = crash_record(spec, status, f"worker exited with code {proc.returncode}{killed} without a result; stderr:\n{tail}")
    write_atomic(path, json.dumps(record, indent=1))
    return record


class Progress:
    """A one-line progress bar on stderr (one line per experiment when stderr is not a terminal)."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total, self.stream, self.width, self.start = total, stream or sys.stderr, width, time.perf_counter()
        self.tty = self.stream.isatty()

    def show(self, done: int, text: str) -> None:
        filled = self.width * done // max(self.total, 1)
        elapsed = int(time.perf_counter() - self.start)
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {elapsed // 60}:{elapsed % 60:02d} {text}"
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def run_matrix(specs: List[dict], run_dir: Path, timeout: float, progress: Optional[Progress] = None) -> List[dict]:
    """Every experiment in turn, each in its own process; failures are recorded and the rest go on."""
    records = []
    for i, spec in enumerate(specs):
        if progress and progress.tty:
            progress.show(i, f"{spec['experiment']} ...")
        record = run_one(spec, run_dir, timeout)
        records.append(record)
        if progress:
            progress.show(i + 1, f"{spec['experiment']} {record['status']}")
    return records


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.single is not None or args.result is not None:
        if args.single is None or args.result is None:
            parser.error("--single and --result go together")
        return worker_main(args.single, args.result)
    settings = resolve(args, parser)
    specs = experiment_specs(settings)
    if not specs:
        parser.error("no experiment to run (no available mode)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out}: not a folder")
    run_dir = new_run_dir(Path(args.out))
    write_atomic(run_dir / "run.json", json.dumps({"settings": settings, "experiments": [s["experiment"] for s in specs]}, indent=1))
    print(f"{len(specs)} experiments -> {run_dir}", file=sys.stderr)
    records = run_matrix(specs, run_dir, args.timeout, Progress(len(specs)))
    summary = write_summary(records, settings, run_dir / "summary.txt")
    print(summary)
    if not args.no_plots:
        write_plots(records, run_dir / "plots")
    print(f"results: {run_dir}")
    return 0 if all(r["status"] in ("ok", "oom") for r in records) else 1
