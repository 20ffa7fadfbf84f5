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
(gloo processes on CPU), on a model sharded with FSDP2 (``sharding.shard_blocks``; --amp bf16 is
FSDP2's mixed precision there), each rank training on its own B samples: the global batch is N x B.
Peak memory is the largest rank's, a step's time the slowest rank's; the breakdown is rank 0's.

Memory is the CUDA allocator's on GPU and dpkernels' live-tensor tracker on CPU.  Each experiment
writes ``<run>/<experiment>.json`` (atomically); a crash, timeout or out-of-memory is recorded
there with its status while the other experiments go on.  Then ``summary.txt`` and the plots.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import List

import torch

from . import step
from .breakdown import COMPONENTS
from .experiments import ALIASES, AMP, DEFAULT_BATCH, MODELS, PRESETS, TRANSFORMERS_MODELS, available_modes, experiment_specs
from .launcher import Progress, new_run_dir, run_matrix
from .plots import write_plots
from .report import write_atomic, write_summary
from .runner import worker_main


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
    parser.add_argument("--seq", nargs="+", type=positive, metavar="T", help="sequence lengths (default: 64 128 on CPU, 1024 2048 4096 on GPU; bert: 128; dit, vit: their patch count)")
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
