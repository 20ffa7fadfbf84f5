"""FSDP2 for multi-process runs: the sharding (``shard_blocks``), the process group, values across ranks.

``shard_blocks`` is the sharding the profiler and the FSDP tests use: every block of every
``nn.ModuleList`` (a transformer's layers) is its own ``fully_shard`` unit, then the root, which
holds what is left (embeddings, final norm, head).
"""

from __future__ import annotations

import datetime
import os
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def shard_blocks(model: nn.Module, param_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """``fully_shard`` each block of every ModuleList, then the root.

    param_dtype: FSDP2 mixed precision, parameters gathered in this dtype for forward and backward
    (activations follow), gradients reduced in float32 into float32 shards.  None: float32 throughout.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def start(device_type: str, timeout_s: float = 600.0) -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
    NCCL with one GPU per rank on CUDA, gloo on CPU.  Returns this rank's device."""
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(seconds=timeout_s))
        return device
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return torch.device("cpu")


def max_over_ranks(values: List[float], device: torch.device) -> List[float]:
    """Element-wise maximum of ``values`` over all ranks (each rank passes a list of the same length)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def gather_floats(value: float, device: torch.device) -> List[float]:
    """``value`` of every rank, in rank order."""
    out = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([value], dtype=torch.float64, device=device))
    return [t.item() for t in out]
