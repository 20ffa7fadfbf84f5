"""Measurement helpers shared by the demo, the benchmarks and the profiler."""

from .memory import TensorMemoryTracker, peak_memory

__all__ = ["TensorMemoryTracker", "peak_memory"]
