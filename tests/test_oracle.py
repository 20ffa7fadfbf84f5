"""The oracle is independent of the code under test, and the clip rule is pinned on both sides.

dpkernels/reference.py (the float64 oracle) imports neither dpkernels nor opacus, and the
implementation does not import the oracle: a shared constant or function would let a mistake in
it pass every comparison.  The epsilon and the min(1, .) of c_i = min(1, C / (||g_i|| + 1e-6)) are
pinned on each side by numbers worked out by hand below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from dpkernels import reference
from dpkernels.clipping import coefficients

PACKAGE = Path(reference.__file__).resolve().parent
# modules of the package that may use the oracle: the package's namespace, the test helpers, the demo
ORACLE_USERS = {"__init__.py", "testing.py", "demo.py"}


def imported_modules(path: Path):
    """(level, module name) of every import in ``path`` (level > 0: a relative import)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((0, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or ""
            if node.level and not node.module:
                yield from ((node.level, alias.name) for alias in node.names)


def test_the_oracle_imports_nothing_from_the_implementation():
    bad = [
        ("." * level) + name
        for level, name in imported_modules(PACKAGE / "reference.py")
        if level or name.split(".")[0] in ("dpkernels", "opacus")
    ]
    assert not bad, f"dpkernels/reference.py imports {bad}: the oracle must state everything itself"


def test_the_implementation_does_not_import_the_oracle():
    users = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if str(rel) in ORACLE_USERS or rel.name == "reference.py":
            continue
        for level, name in imported_modules(path):
            if name.split(".")[-1] == "reference" or name.startswith("dpkernels.reference"):
                users.append(str(rel))
    assert not users, f"{users} import dpkernels.reference: the implementation needs its own rule"


RULES = {"oracle": reference.clip_coefficients, "implementation": coefficients.clip_coefficients}


@pytest.mark.parametrize("side", sorted(RULES))
def test_the_epsilon_is_1e_6(side):
    """||g|| = 1e-6, C = 1e-6: c = 1e-6 / (1e-6 + 1e-6) = 0.5 exactly (2e-6 is 1e-6 doubled, exact in
    binary).  ||g|| = 0, C = 1e-7: c = 1e-7 / 1e-6 = 0.1.  An epsilon of 1e-3 gives 1e-3 and 1e-4."""
    clip = RULES[side]
    got = clip(torch.tensor([1e-6], dtype=torch.float64), 1e-6)
    assert got.item() == 0.5
    got = clip(torch.tensor([0.0], dtype=torch.float64), 1e-7)
    assert abs(got.item() - 0.1) <= 1e-12


@pytest.mark.parametrize("side", sorted(RULES))
def test_the_coefficient_is_at_most_one(side):
    """||g|| = 0.5, C = 1: C / (||g|| + 1e-6) = 1 / 0.500001 = 1.999996..., so c = min(1, .) = 1 exactly;
    ||g|| = 0, C = 3: 3e6 -> 1.  ||g|| = 3, C = 2: 2 / 3.000001 = 0.6666664444..., below 1, kept."""
    clip = RULES[side]
    one = lambda norm, C: clip(torch.tensor([norm], dtype=torch.float64), C).item()
    assert one(0.5, 1.0) == 1.0
    assert one(0.0, 3.0) == 1.0
    assert abs(one(3.0, 2.0) - 2 / 3.000001) <= 1e-15
