"""What a new user meets first: the command line's help, the declared dependencies, and clear errors
or warnings for the usual mistakes (a BatchNorm model, a flash mode without CUDA), with the model's
parameters and gradients left untouched where make_private refuses."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from dpkernels import SINGLE_PROCESS_MODES
from dpkernels.__main__ import COMMANDS
from dpkernels.engine import FlashFallbackWarning
from dpkernels.errors import UnsupportedModuleError
from dpkernels.testing import Case, make_private

ROOT = Path(__file__).resolve().parent.parent
CASE = Case("mlp", lambda: mlp(), lambda B: (torch.randn(B, 6), torch.randint(0, 3, (B,))))


def batch(B: int = 4):
    return torch.randn(B, 6), torch.randint(0, 3, (B,))


# ---- python -m dpkernels ------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["-h"], []], ids=["--help", "-h", "no-argument"])
def test_help_lists_every_command_with_one_line_and_exits_0(argv):
    proc = subprocess.run([sys.executable, "-m", "dpkernels", *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name, (_, text) in COMMANDS.items():
        (line,) = [line for line in lines if line.split()[:1] == [name]]
        assert text in line
    assert "--help" in proc.stdout and proc.stderr == ""


def test_an_unknown_command_exits_2_and_shows_the_commands():
    proc = subprocess.run([sys.executable, "-m", "dpkernels", "nosuch"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "unknown command 'nosuch'" in proc.stderr and all(name in proc.stderr for name in COMMANDS)


# ---- dependencies: every third-party import is declared in pyproject.toml ------------------------------


def imported_top_levels(folders) -> dict:
    """{top-level module: first file importing it} for absolute imports in the .py files of ``folders``."""
    found = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_requirements() -> set:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {canonical(re.match(r"[A-Za-z0-9_.\-]+", r).group(0)) for r in requirements}


def test_every_third_party_import_is_declared_in_pyproject():
    """transformers went undeclared once: the README's test command failed on a fresh machine while
    CI, on a machine where it was installed by hand, passed."""
    declared = declared_requirements()
    first_party = {"dpkernels", "conftest", *(p.stem for p in (ROOT / "tests").glob("*.py")), *(p.stem for p in (ROOT / "benchmarks").glob("*.py"))}
    distributions = metadata.packages_distributions()
    missing = {}
    for module, where in imported_top_levels(["dpkernels", "tests", "benchmarks"]).items():
        if module in sys.stdlib_module_names or module in first_party or module == "__future__":
            continue
        # pytest plugins and the interpreter's own test helpers come with the declared distributions
        names = {canonical(d) for d in distributions.get(module, [module])}
        if not names & declared and not (module == "_pytest" and "pytest" in declared):
            missing[module] = where
    assert not missing, f"imported but not declared in pyproject.toml (module: first file): {missing}"


# ---- a BatchNorm model ----------------------------------------------------------------------------------


def with_batch_norm() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 64), nn.Sequential(nn.BatchNorm1d(64), nn.ReLU()), nn.Linear(64, 3))


@pytest.mark.parametrize("mode", [*SINGLE_PROCESS_MODES, "hooks"])
def test_batch_norm_is_refused_by_name_with_the_fix_and_the_model_is_untouched(mode):
    model = with_batch_norm()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UnsupportedModuleError) as err:
        make_private(model, batch(), CASE, mode, 1.0, "mean")
    message = str(err.value)
    assert "1.0 (BatchNorm1d)" in message and "opacus.validators.ModuleValidator.fix" in message
    assert all(torch.equal(p, old) and p.grad is None for p, old in zip(model.parameters(), before))
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in model.modules()), "nothing wrapped"


@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
def test_the_named_fix_gives_a_model_that_trains(mode):
    model = ModuleValidator.fix(with_batch_norm())
    dp_model, optimizer, criterion, _ = make_private(model, batch(), CASE, mode, 1.0, "mean")
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FlashFallbackWarning)
        criterion(dp_model(x), y).backward()
    optimizer.step()
    assert all(not torch.equal(p, old) for p, old in zip(model.parameters(), before))


# ---- a flash mode without CUDA ----------------------------------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def flash_warnings(mode: str) -> list:
    """The FlashFallbackWarnings of make_private and two training steps on a CPU model."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dp_model, optimizer, criterion, _ = make_private(mlp(), batch(), CASE, mode, 1.0, "mean")
        for _ in range(2):
            x, y = batch()
            criterion(dp_model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    return [w for w in caught if issubclass(w.category, FlashFallbackWarning)]


@pytest.mark.parametrize("mode", ["flash", "flash_bk"])
def test_flash_on_cpu_warns_once_that_pytorch_tiling_replaces_triton(mode, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    (warning,) = flash_warnings(mode)
    text = str(warning.message)
    assert f"grad_sample_mode={mode!r}" in text and "PyTorch tiling" in text and "instead of Triton" in text
    assert Path(warning.filename).name == "testing.py", "the warning points at the make_private call"


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_modes_without_triton_kernels_do_not_warn(mode, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert flash_warnings(mode) == []


def test_flash_under_the_triton_interpreter_does_not_warn(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_private(mlp(), batch(), CASE, "flash", 1.0, "mean")
    assert not [w for w in caught if issubclass(w.category, FlashFallbackWarning)]
