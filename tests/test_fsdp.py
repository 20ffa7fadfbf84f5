"""FSDP2: the *_fsdp modes on a model sharded with ``fully_shard`` give the update of a single process.

WORLD processes (2, or DPKERNELS_TEST_WORLD; torch.multiprocessing; NCCL with one GPU each where
WORLD GPUs exist, else gloo on CPU) each train on their share of one global batch with noise 0;
the gathered parameters after one step must equal a single-process run of the matching mode on the
whole batch (float32, 1e-5 relative).  Each rank clips its own samples with norms from its own
activations: norms are never summed across ranks.  Under FSDP2's bf16 mixed precision the update's
error against the float64 oracle is bounded by a multiple of the error of plain (non-private) FSDP2
bf16 training against its own float64 reference.  The model is a small Llama-style decoder from a
transformers LlamaConfig (random weights): RMSNorm, an Embedding and an untied head; the sharding
is the profiler's (``distributed.shard_blocks``).
"""

from __future__ import annotations

import copy
import functools
import os
import socket
import warnings
from typing import Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from dpkernels import MODES, PrivacyEngine, reference
from dpkernels.models.llama import LlamaLM, LlamaSpec
from dpkernels.profiling.distributed import shard_blocks
from dpkernels.testing import Case, assert_rel_close, dp_update, oracle_update, sample_loss_fn, total_norm

pytestmark = pytest.mark.multigpu

WORLD = int(os.environ.get("DPKERNELS_TEST_WORLD", "2"))  # ranks (4: the 4-GPU check); 2 in CI
B, T, VOCAB = 3 * WORLD, 9, 37
SPEC = LlamaSpec(vocab=VOCAB, hidden=16, layers=2, heads=2, intermediate=24, max_len=T)
CASE = Case("llama", lambda: LlamaLM(SPEC), lambda n: (torch.randint(0, VOCAB, (n, T)), torch.randint(0, VOCAB, (n, T))), logits_of=lambda out: out.transpose(1, 2))
FSDP_MODES = sorted(name for name, mode in MODES.items() if mode.fsdp)
ON_GPUS = torch.cuda.device_count() >= WORLD


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_one_step(model, mode: str, ids, targets, n: int, clip: float) -> None:
    """One step of SGD(lr=1) on this rank's samples: "nondp" (plain FSDP2, mean over the global
    batch) or a dpkernels *_fsdp mode with noise 0 over a global batch of ``n``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    if mode == "nondp":
        torch.nn.functional.cross_entropy(CASE.logits_of(model(ids)), targets).backward()
        optimizer.step()
        return
    loader = DataLoader(TensorDataset(torch.zeros(n)), batch_size=n)  # the global dataset: n / WORLD per rank
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp_model, optimizer, criterion, _ = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=torch.nn.CrossEntropyLoss(),
            noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode=mode, poisson_sampling=False,
        )
    criterion(CASE.logits_of(dp_model(ids)), targets).backward()
    optimizer.step()


def in_process_group(rank: int, port: int, work: Callable[[int, torch.device], dict], out: dict) -> None:
    """Run ``work(rank, device)`` as one rank of WORLD; rank 0 stores what it returns in ``out``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if ON_GPUS else torch.device("cpu")
    if ON_GPUS:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if ON_GPUS else "gloo", rank=rank, world_size=WORLD)
    try:
        result = work(rank, device)
        if rank == 0:
            out.update(result)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # gloo's worker threads can abort the interpreter's teardown ("terminate called without an active
    # exception") after all work is done; leave without it once the result is stored
    os._exit(0)


def run_ranks(work) -> dict:
    """What rank 0's ``work(rank, device)`` returned, in a WORLD-process run (``work``: picklable)."""
    out = mp.Manager().dict()
    mp.start_processes(in_process_group, args=(free_port(), work, out), nprocs=WORLD, start_method="spawn")
    return dict(out)


def gathered(model) -> dict:
    return {name: p.full_tensor().detach().cpu().clone() for name, p in model.named_parameters()}


def llama_step(rank: int, device: torch.device, mode: str, state: dict, batch, clip: float, param_dtype: Optional[torch.dtype]) -> dict:
    """One step on this rank's half of the batch; the full updated parameters (on CPU)."""
    torch.manual_seed(0)
    model = LlamaLM(SPEC)
    model.load_state_dict(state)
    model = shard_blocks(model.to(device), param_dtype)
    ids, targets = batch
    n = ids.shape[0]
    mine = slice(rank * n // WORLD, (rank + 1) * n // WORLD)
    train_one_step(model, mode, ids[mine].to(device), targets[mine].to(device), n, clip)
    return gathered(model)


def run_llama(mode, model, batch, clip, param_dtype=None) -> dict:
    """{name: parameter after the step} of a WORLD-process FSDP2 run of the Llama model."""
    return run_ranks(functools.partial(llama_step, mode=mode, state=copy.deepcopy(model.state_dict()), batch=batch, clip=clip, param_dtype=param_dtype))


def clip_binding_for_some(model, batch):
    """The float64 oracle's clip norm (median per-sample norm), its update, and the check that it binds
    for some samples only."""
    clip, expected, norms = oracle_update(model, batch, CASE, "mean")
    assert 0 < int((norms > clip).sum()) < batch[0].shape[0], "the clip norm binds for some samples only"
    return clip, expected


@pytest.mark.parametrize("global_batch", [B, WORLD], ids=["3-per-rank", "1-per-rank"])
@pytest.mark.parametrize("mode", FSDP_MODES)
def test_fsdp_step_equals_single_process(mode, global_batch):
    """1 sample per rank is not a batch of one: the single-sample shortcut must not apply."""
    torch.manual_seed(0)
    model = LlamaLM(SPEC)
    batch = CASE.batch(global_batch)
    clip, _ = clip_binding_for_some(model, batch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = dp_update(model, batch, CASE, mode.removesuffix("_fsdp"), clip, "mean")
    after = run_llama(mode, model, batch, clip)
    whole = total_norm(expected.values())
    for n, update in expected.items():
        assert_rel_close(f"{mode}/{n}", before[n] - after[n], update, torch.float32, scale=whole)


def max_error(update: dict, expected: dict) -> float:
    """Largest absolute difference over all parameters."""
    return max((update[n].double() - expected[n].double()).abs().max().item() for n in expected)


@pytest.mark.parametrize("mode", FSDP_MODES)
def test_fsdp_bf16_mixed_precision_error_is_that_of_plain_bf16(mode):
    """param_dtype bf16, reduce float32: |update - float64 oracle| <= 3 x plain FSDP2 bf16's error."""
    torch.manual_seed(0)
    model = LlamaLM(SPEC)
    batch = CASE.batch(B)
    clip, expected_dp = clip_binding_for_some(model, batch)
    grads = reference.per_sample_grads(model, sample_loss_fn(CASE, "mean"), batch)
    expected_plain = {n: g.sum(0) / B for n, g in grads.items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = run_llama("nondp", model, batch, clip, torch.bfloat16)
    private = run_llama(mode, model, batch, clip, torch.bfloat16)
    error_private = max_error({n: before[n] - private[n] for n in before}, expected_dp)
    error_plain = max_error({n: before[n] - plain[n] for n in before}, expected_plain)
    assert 0 < error_private <= 3 * error_plain, f"{mode}: bf16 error {error_private:.3g} > 3 x plain bf16 FSDP2's {error_plain:.3g}"


def zero_gradient_noise_step(rank: int, device: torch.device, mode: str, reduction: str, sigma: float, clip: float, n: int) -> dict:
    """A zero-initialised Linear(1000, 100) whose loss is 0 x output: the update (SGD lr=1) is the noise."""
    model = torch.nn.Linear(1000, 100, bias=False, device=device)
    torch.nn.init.zeros_(model.weight)
    model = shard_blocks(model)
    loader = DataLoader(TensorDataset(torch.zeros(n)), batch_size=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp_model, optimizer, criterion, _ = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
            criterion=torch.nn.MSELoss(reduction=reduction), noise_multiplier=sigma, max_grad_norm=clip,
            grad_sample_mode=mode, poisson_sampling=False, loss_reduction=reduction,
        )
    x = torch.randn(n // WORLD, 1000, device=device)
    criterion(dp_model(x) * 0, torch.zeros(n // WORLD, 100, device=device)).backward()
    optimizer.step()
    assert all(state["summed_grad"] is None for state in optimizer.grad_state.values()), "no gradient copy is held after the step"
    return gathered(model)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", ["ghost_fsdp", "flash_bk_fsdp"])
def test_fsdp_noise_is_added_once_with_the_global_scale(mode, reduction):
    """Zero gradients on WORLD ranks x 4 samples: every coordinate of the update is N(0, s^2) with
    s = sigma C / (4 WORLD) (mean over the global batch) or sigma C (sum); noise added by every rank,
    or scaled for one rank's batch, would be off by sqrt(WORLD) or WORLD.  100,000 coordinates: the sample
    standard deviation has a relative standard error of 0.22%, so the +-2% band is 9 of them wide
    (false alarm < 1e-18).  Both runs (the two reductions) draw their noise independently."""
    sigma, clip, n = 1.3, 0.7, 4 * WORLD
    update = -run_ranks(functools.partial(zero_gradient_noise_step, mode=mode, reduction=reduction, sigma=sigma, clip=clip, n=n))["weight"]
    expected = sigma * clip / (n if reduction == "mean" else 1)
    assert abs(update.std().item() / expected - 1) < 0.02, (update.std().item(), expected)
