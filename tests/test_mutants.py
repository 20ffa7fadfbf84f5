"""The seeded bugs of mutants/catalog.py still fit the code: each mutant's original text occurs exactly
once in its file and its tests exist.  (Running them, slow, is `tox -e mutants`: mutants/run.py.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def catalog():
    spec = importlib.util.spec_from_file_location("mutant_catalog", ROOT / "mutants" / "catalog.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MUTANTS


MUTANTS = catalog()


def test_mutant_names_are_unique():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_the_mutant_still_applies(mutant):
    """Its original text is in its file exactly once, differs from the replacement, and its tests exist."""
    text = (ROOT / mutant.file).read_text()
    assert text.count(mutant.original) == 1, (
        f"mutant {mutant.name}: {mutant.original!r} occurs {text.count(mutant.original)} times in {mutant.file}; "
        "update mutants/catalog.py to the code as it is now (the same mistake, one mistake)"
    )
    assert mutant.original != mutant.replacement
    paths = [a.split("::")[0] for a in mutant.tests if a.endswith(".py") or "::" in a]
    assert paths and all((ROOT / p).is_file() for p in paths), f"mutant {mutant.name}: test files {paths}"
    for arg in mutant.tests:
        if "::" in arg:
            path, name = arg.split("::", 1)
            assert f"def {name.split('[')[0]}(" in (ROOT / path).read_text(), f"mutant {mutant.name}: no test {arg}"
