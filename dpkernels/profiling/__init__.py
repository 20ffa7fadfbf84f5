"""The profiler (the main job, ``dpkernels profile``) and the measurement helpers it shares with the benchmarks and demo."""

from .environment import default_device, device_slug, synchronize, versions
from .memory import TensorMemoryTracker, peak_memory

__all__ = ["TensorMemoryTracker", "peak_memory", "default_device", "device_slug", "synchronize", "versions"]
