"""Shared pytest configuration: hypothesis profiles and per-test seeding.

Profiles (select with ``pytest --hypothesis-profile=NAME``):
    ci    the default: derandomised, so CI runs are reproducible; no deadline (first calls compile)
    fuzz  10,000 examples per property, random; with DPKERNELS_FUZZ_PARTS=N, 10,000 / N, so that N
          processes with distinct ``--hypothesis-seed`` values share the 10,000 (e.g. on one GPU)
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

pytest_plugins = ["pytester"]

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "fuzz",
    deadline=None,
    max_examples=10_000 // int(os.environ.get("DPKERNELS_FUZZ_PARTS", "1")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    """Every test starts from the same seed and float32 default dtype, and cannot leak either."""
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
