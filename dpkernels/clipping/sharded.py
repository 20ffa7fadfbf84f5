"""FSDP2 bookkeeping: each rank's full-size clipped sums -> their mean over ranks, in the shards.

Rank r holds g_r = sum over its samples of c_i g_i for every parameter, full-size; the parameter's
gradient is the mean over ranks, sharded as FSDP2 shards it (rows [r c, (r + 1) c) of dim 0 on rank
r, c = ceil(rows / W), as ``torch.chunk``).  Parameters are reduced in buckets, one collective
each, in the order they come:

    bucket   [W, M] = ``torch._chunk_cat`` of its gradients (chunk r of each, padded to c rows, in
             row r); one large gradient whose rows divide by W is its own bucket, as a view (no copy)
    NCCL     one ``reduce_scatter_tensor`` (AVG) per bucket, asynchronous: the next bucket's clipped
             sums are computed while it runs; at most one bucket is in flight
    gloo     (no reduce-scatter) one ``all_reduce`` per bucket, then row r / W

Parameters that are not sharded as FSDP2 does by default (1-D mesh, Shard(0)), e.g. HSDP's 2-D mesh,
go through DTensor's own redistribution, one per parameter (``redistributed_mean``).
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, List, Tuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

BUCKET_BYTES = 64 * 2**20  # gradients are gathered into buckets of about this size (larger ones alone)


def redistributed_mean(g: torch.Tensor, p: DTensor) -> DTensor:
    """Mean over ranks of ``g`` (this rank's full-size sum), placed like ``p``: DTensor's redistribution
    of a Partial tensor (NCCL: a reduce-scatter; gloo has none: an all-reduce, then the local part)."""
    mesh = p.device_mesh
    partial = DTensor.from_local(g / mesh.size(), mesh, [Partial()] * mesh.ndim, run_check=False)
    if dist.get_backend(mesh.get_group()) == "gloo":
        partial = partial.redistribute(mesh, [Replicate()] * mesh.ndim)
    return partial.redistribute(mesh, p.placements)


def row_sharded(p: DTensor) -> bool:
    """Sharded as FSDP2 shards by default: dim 0 over a 1-D mesh."""
    return p.device_mesh.ndim == 1 and tuple(p.placements) == (Shard(0),)


class Bucket:
    """Gradients of row-sharded parameters on one process group, reduced by one collective."""

    def __init__(self, group, dtype: torch.dtype):
        self.group, self.dtype = group, dtype
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.items: List[Tuple[DTensor, torch.Tensor]] = []
        self.nbytes = 0
        self.work = self.input = self.output = None

    def add(self, p: DTensor, g: torch.Tensor) -> None:
        self.items.append((p, g))
        self.nbytes += g.numel() * g.element_size()

    def start(self) -> None:
        """Issue the collective (asynchronous on NCCL); the full-size gradients are dropped."""
        grads = [g for _, g in self.items]
        if len(grads) == 1 and grads[0].shape[0] % self.world == 0 and grads[0].is_contiguous():
            self.input = grads[0].view(self.world, -1)
        else:
            self.input = torch._chunk_cat(grads, dim=0, num_chunks=self.world)
        self.items = [(p, None) for p, _ in self.items]
        if dist.get_backend(self.group) == "gloo":
            dist.all_reduce(self.input, group=self.group)
            self.output = self.input[self.rank].div_(self.world)
            return
        self.output = self.input.new_empty(self.input.shape[1])
        self.work = dist.reduce_scatter_tensor(self.output, self.input, op=dist.ReduceOp.AVG, group=self.group, async_op=True)

    def finish(self) -> Iterator[Tuple[DTensor, DTensor]]:
        """(p, this rank's shard of the mean) for each parameter, once the collective is done."""
        if self.work is not None:
            self.work.wait()  # the current stream waits for the collective (no host synchronisation)
        self.input = None
        offset = 0
        for p, _ in self.items:
            rows, row_numel = p.shape[0], math.prod(p.shape[1:])
            chunk = -(-rows // self.world)
            mine = min(max(rows - self.rank * chunk, 0), chunk)
            local = self.output[offset : offset + mine * row_numel].view(mine, *p.shape[1:])
            offset += chunk * row_numel
            yield p, DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def mean_over_ranks_into_shards(grads: Iterable[Tuple[DTensor, torch.Tensor]], bucket_bytes: int = BUCKET_BYTES) -> Iterator[Tuple[DTensor, DTensor]]:
    """(p, g) with g this rank's full-size sum for parameter p -> (p, mean over ranks sharded like p).

    Consumes ``grads`` lazily: at most one bucket is being filled and one in flight, so the full-size
    gradients alive at a time are about 2 x ``bucket_bytes`` (or one larger gradient).  The gradients
    are consumed: a one-gradient bucket is reduced in place (gloo).  Results come in bucket order,
    not necessarily in the order given.
    """
    filling = in_flight = None
    for p, g in grads:
        if not isinstance(p, DTensor):
            raise ValueError(f"a trainable parameter of shape {tuple(p.shape)} is not an FSDP2 shard (not a DTensor): shard every parameter with fully_shard")
        if not row_sharded(p):
            yield p, redistributed_mean(g, p)
            continue
        group = p.device_mesh.get_group()
        if filling is not None and (filling.group.group_name != group.group_name or filling.dtype != g.dtype or filling.nbytes + g.numel() * g.element_size() > bucket_bytes):
            filling.start()
            if in_flight is not None:
                yield from in_flight.finish()
            filling, in_flight = None, filling
        if filling is None:
            filling = Bucket(group, g.dtype)
        filling.add(p, g)
    if filling is not None:
        filling.start()
    for bucket in (in_flight, filling):
        if bucket is not None:
            yield from bucket.finish()
