"""Peak memory of a region: the CUDA allocator on GPU, a deterministic live-tensor tracker on CPU.

``TensorMemoryTracker`` counts the bytes of every tensor storage created by an operator while it is
active, and subtracts them when the last tensor that holds the storage is freed; ``peak`` is the
largest total seen.  It does not count memory that existed before the region (parameters, say),
so it measures what the region adds: the same number on every run of the same code.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Dict, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


class TensorMemoryTracker(TorchDispatchMode):
    """Live bytes of storages created inside the ``with`` block; ``current`` and ``peak`` in bytes."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: Dict[int, list] = {}  # storage data_ptr -> [nbytes, tensors holding it]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._hold(t)
        return out

    def _hold(self, t: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(t):  # a DTensor: its local shard was made out of our sight
            for inner in (getattr(t, name) for name in t.__tensor_flatten__()[0]):
                if isinstance(inner, torch.Tensor):
                    self._hold(inner)
            return
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0:
            return
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._live[key]
            self.current -= entry[0]


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """``with peak_memory(dev) as m: ...`` then m["peak_bytes"]: bytes added at the peak of the region."""
    result = {"peak_bytes": 0, "source": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.update(peak_bytes=torch.cuda.max_memory_allocated(device) - start, source="cuda_allocator")
    else:
        tracker = TensorMemoryTracker()
        with tracker:
            yield result
        result.update(peak_bytes=tracker.peak, source="tensor_tracker")
