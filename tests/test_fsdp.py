"""FSDP2: the *_fsdp modes on a model sharded with ``fully_shard`` give the update of a single process.

Two processes (torch.multiprocessing, the gloo backend on CPU; NCCL where 2 GPUs exist) each train
on half of one global batch with noise 0; the gathered parameters after one step must equal a
single-process run of the matching mode on the whole batch (float32, 1e-5 relative).  Each rank
clips its own samples with norms from its own activations: norms are never summed across ranks.
The model is a small Llama-style decoder from a transformers LlamaConfig (random weights): RMSNorm,
an Embedding and an untied head.
"""

from __future__ import annotations

import copy
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from dpkernels import MODES, PrivacyEngine
from dpkernels.models.llama import LlamaLM, LlamaSpec
from dpkernels.testing import Case, assert_rel_close, dp_update, oracle_update, total_norm

pytestmark = pytest.mark.multigpu

WORLD, B, T, VOCAB = 2, 6, 9, 37
SPEC = LlamaSpec(vocab=VOCAB, hidden=16, layers=2, heads=2, intermediate=24, max_len=T)
CASE = Case("llama", lambda: LlamaLM(SPEC), lambda n: (torch.randint(0, VOCAB, (n, T)), torch.randint(0, VOCAB, (n, T))), logits_of=lambda out: out.transpose(1, 2))
FSDP_MODES = sorted(name for name, mode in MODES.items() if mode.fsdp)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard(model: LlamaLM) -> LlamaLM:
    for layer in model.lm.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def rank_step(rank: int, port: int, mode: str, state: dict, batch, clip: float, out: dict) -> None:
    """One DP step on this rank's half of the batch; rank 0 stores the full updated parameters."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = LlamaLM(SPEC)
        model.load_state_dict(state)
        model = shard(model)
        ids, targets = batch
        n = ids.shape[0]
        loader = DataLoader(TensorDataset(ids, targets), batch_size=n)  # the global dataset: n / WORLD per rank
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp_model, optimizer, criterion, _ = PrivacyEngine().make_private(
                module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
                criterion=torch.nn.CrossEntropyLoss(), noise_multiplier=0.0, max_grad_norm=clip,
                grad_sample_mode=mode, poisson_sampling=False,
            )
        mine = slice(rank * n // WORLD, (rank + 1) * n // WORLD)
        criterion(CASE.logits_of(dp_model(ids[mine])), targets[mine]).backward()
        optimizer.step()
        full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        if rank == 0:
            out.update(full)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # gloo's worker threads can abort the interpreter's teardown ("terminate called without an active
    # exception") after all work is done; leave without it once the result is stored
    os._exit(0)


def run_ranks(mode, state, batch, clip) -> dict:
    manager = mp.Manager()
    out = manager.dict()
    mp.start_processes(rank_step, args=(free_port(), mode, state, batch, clip, out), nprocs=WORLD, start_method="spawn")
    return dict(out)


@pytest.mark.parametrize("global_batch", [B, WORLD], ids=["3-per-rank", "1-per-rank"])
@pytest.mark.parametrize("mode", FSDP_MODES)
def test_fsdp_step_equals_single_process(mode, global_batch):
    """1 sample per rank is not a batch of one: the single-sample shortcut must not apply."""
    torch.manual_seed(0)
    model = LlamaLM(SPEC)
    batch = CASE.batch(global_batch)
    clip, _, norms = oracle_update(model, batch, CASE, "mean")
    assert 0 < int((norms > clip).sum()) < global_batch, "the clip norm binds for some samples only"
    single_mode = mode.removesuffix("_fsdp")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = dp_update(model, batch, CASE, single_mode, clip, "mean")
    gathered = run_ranks(mode, copy.deepcopy(model.state_dict()), batch, clip)
    whole = total_norm(expected.values())
    for n, update in expected.items():
        assert_rel_close(f"{mode}/{n}", before[n] - gathered[n], update, torch.float32, scale=whole)
