"""The parent process of a profile: each experiment in a subprocess of its own (under torchrun when sharded).

A worker that crashes, times out or is killed leaves a record of how it ended, and the others go on.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from .report import write_atomic
from .runner import base_record


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
