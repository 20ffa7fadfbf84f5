"""What machine a measurement ran on: device, device kind slug and versions; device synchronisation."""

from __future__ import annotations

import platform
import re

import torch

from .. import __version__


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_slug() -> str:
    """cpu, or the GPU model in lower case (``NVIDIA H100 80GB HBM3`` -> ``h100``)."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0)
    model = re.search(r"\b([A-Z]+\d{2,4}[A-Za-z]*)\b", name.replace("NVIDIA", ""))
    return (model.group(1) if model else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")).lower()


def versions() -> dict:
    """Device name and slug, torch, CUDA, triton and dpkernels versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device_slug": device_slug(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or "cpu"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "dpkernels": __version__,
    }


def synchronize() -> None:
    """Wait for queued GPU work (no-op on CPU), so host timers measure it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
