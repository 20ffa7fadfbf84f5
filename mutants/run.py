"""Run the seeded bugs of mutants/catalog.py: each applied alone to a temporary copy of the tree,
its tests must fail there.  Prints one line per mutant and killed / total; exits 1 unless all are killed.

    python mutants/run.py                 # every mutant (tox -e mutants)
    python mutants/run.py NAME [NAME...]  # some of them
    python mutants/run.py --list          # names and mistakes

Killed means the tests ran and failed (pytest exit code 1).  Passing tests (exit 0) mean the
mutant survived; any other exit (an error while collecting, a usage error, a timeout) is reported
as an error, never counted as killed.  The copy holds the files git tracks plus untracked files it
does not ignore, so uncommitted work is tested too; dpkernels is imported from the copy.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_catalog():
    spec = importlib.util.spec_from_file_location("mutant_catalog", Path(__file__).with_name("catalog.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MUTANTS


def tree_files(root: Path):
    """Files of the working tree: tracked, plus untracked and not ignored (git), relative to ``root``."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root, capture_output=True, check=True)
    return [Path(p) for p in out.stdout.decode().split("\0") if p and (root / p).is_file()]


def copy_tree(root: Path, dest: Path) -> None:
    for rel in tree_files(root):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest / rel)


def apply(tree: Path, mutant) -> str:
    """Write the mutant into ``tree``; return the file's original text (to restore it)."""
    path = tree / mutant.file
    text = path.read_text()
    count = text.count(mutant.original)
    if count != 1:
        raise SystemExit(f"mutant {mutant.name}: its original text occurs {count} times in {mutant.file} (must be once)")
    path.write_text(text.replace(mutant.original, mutant.replacement))
    return text


def run_tests(tree: Path, env: dict, args, timeout: float) -> int:
    command = [sys.executable, "-m", "pytest", *args, "-x", "-q", "-p", "no:cacheprovider"]
    try:
        return subprocess.run(command, cwd=tree, env=env, capture_output=True, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return -1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per mutant's test run (default 1800)")
    args = parser.parse_args(argv)
    mutants = load_catalog()
    if args.list:
        for m in mutants:
            print(f"{m.name:30s} {m.file}: {m.mistake}")
        return 0
    unknown = set(args.names) - {m.name for m in mutants}
    if unknown:
        parser.error(f"unknown mutants {sorted(unknown)}")
    chosen = [m for m in mutants if not args.names or m.name in args.names]
    killed = 0
    with tempfile.TemporaryDirectory(prefix="dpkernels-mutants-") as tmp:
        tree = Path(tmp)
        copy_tree(ROOT, tree)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        where = subprocess.run([sys.executable, "-c", "import dpkernels; print(dpkernels.__file__)"], cwd=tree, env=env, capture_output=True, text=True)
        if not where.stdout.strip().startswith(str(tree)):
            raise SystemExit(f"dpkernels is not imported from the copy {tree}: {where.stdout.strip() or where.stderr.strip()}")
        for m in chosen:
            original = apply(tree, m)
            start = time.perf_counter()
            try:
                code = run_tests(tree, env, m.tests, args.timeout)
            finally:
                (tree / m.file).write_text(original)
            verdict = {1: "killed", 0: "SURVIVED"}.get(code, f"ERROR (pytest exit {code})")
            killed += code == 1
            print(f"{verdict:24s} {m.name:30s} {time.perf_counter() - start:6.0f} s   {' '.join(m.tests)}", flush=True)
    print(f"killed {killed}/{len(chosen)}")
    return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
