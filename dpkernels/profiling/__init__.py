"""The profiler (``dpkernels profile``, the main job) and the measurement helpers it shares."""

from .environment import default_device, device_slug, synchronize, versions
from .memory import TensorMemoryTracker, peak_memory

__all__ = ["TensorMemoryTracker", "peak_memory", "default_device", "device_slug", "synchronize", "versions"]
