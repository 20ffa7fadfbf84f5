"""FSDP2: the *_fsdp modes on a model sharded with ``fully_shard`` give the update of a single process.

WORLD processes (2, or DPKERNELS_TEST_WORLD; torch.multiprocessing; NCCL with one GPU each where
WORLD GPUs exist, else gloo on CPU) each train on their share of one global batch with noise 0;
the gathered parameters after one step must equal a single-process run of the matching mode on the
whole batch (float32, 1e-5 relative).  Each rank clips its own samples with norms from its own
activations: norms are never summed across ranks.  Under FSDP2's bf16 mixed precision the update's
error against the float64 oracle is bounded by a multiple of the error of plain (non-private) FSDP2
bf16 training against its own float64 reference.  The model is a small Llama-style decoder from a
transformers LlamaConfig (random weights): RMSNorm, an Embedding and an untied head; the sharding
is the profiler's (``sharding.shard_blocks``).

Noise: each rank draws its own shards' noise only, from its own stream: the gathered noise has the
global scale, the shards of two ranks are uncorrelated (also when every rank's generator is seeded
alike), a seeded run is reproducible, and no noise draw is larger than the rank's shard.  The
bucketed reduction of bookkeeping's clipped sums equals the exact mean over ranks.

The WORLD processes are started once for the module (``ranks``) and run one test's work after another.
"""

from __future__ import annotations

import collections
import copy
import datetime
import functools
import json
import os
import queue
import socket
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

import dpkernels.optimizer
from dpkernels import MODES, PrivacyEngine, reference
from dpkernels.clipping.sharded import mean_over_ranks_into_shards
from dpkernels.models.llama import LlamaLM, LlamaSpec
from dpkernels.profiling.sharding import shard_blocks
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


def serve(rank: int, port: int, jobs, results) -> None:
    """One rank of the pool: join the process group, then run each job ``work(rank, device)`` until None."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if ON_GPUS else torch.device("cpu")
    if ON_GPUS:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if ON_GPUS else "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=JOB_TIMEOUT_S))
    for work in iter(jobs.get, None):
        try:
            result = work(rank, device)
            dist.barrier()
            results.put((rank, None, result if rank == 0 else None))
        except BaseException:
            results.put((rank, traceback.format_exc(), None))
    dist.destroy_process_group()
    # gloo's worker threads can abort the interpreter's teardown ("terminate called without an active
    # exception") after all work is done; leave without it
    os._exit(0)


JOB_TIMEOUT_S = 600


class Ranks:
    """WORLD processes in one process group (NCCL with one GPU each, else gloo), started once: the
    start-up (interpreter, imports, process group) is paid once per module, not once per test."""

    def __init__(self):
        self.procs = []

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        self.jobs = [ctx.Queue() for _ in range(WORLD)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=serve, args=(rank, port, self.jobs[rank], self.results), daemon=True) for rank in range(WORLD)]
        for proc in self.procs:
            proc.start()

    def stop(self, kill: bool = False) -> None:
        for proc, jobs in zip(self.procs, getattr(self, "jobs", [])):
            if kill:
                proc.kill()
            elif proc.is_alive():
                jobs.put(None)
        for proc in self.procs:
            proc.join(timeout=60)
        self.procs = []

    def run(self, work: Callable[[int, torch.device], dict]) -> dict:
        """What rank 0's ``work(rank, device)`` returned (``work``: picklable); a failure on any rank
        raises with its traceback, and the processes are replaced for the next test."""
        if not self.procs:
            self.start()
        for jobs in self.jobs:
            jobs.put(work)
        out, errors = {}, []
        try:
            for _ in range(WORLD):
                rank, error, result = self.results.get(timeout=JOB_TIMEOUT_S)
                if error:
                    errors.append(f"rank {rank}:\n{error}")
                    break  # the other ranks may wait in a collective for this one
                if rank == 0:
                    out = result
        except queue.Empty:
            errors.append(f"no result within {JOB_TIMEOUT_S} s")
        if errors:
            self.stop(kill=True)
            raise AssertionError("\n".join(errors))
        return dict(out)


@pytest.fixture(scope="module")
def ranks():
    pool = Ranks()
    yield pool
    pool.stop()


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


def run_llama(ranks, mode, model, batch, clip, param_dtype=None) -> dict:
    """{name: parameter after the step} of a WORLD-process FSDP2 run of the Llama model."""
    return ranks.run(functools.partial(llama_step, mode=mode, state=copy.deepcopy(model.state_dict()), batch=batch, clip=clip, param_dtype=param_dtype))


def clip_binding_for_some(model, batch):
    """The float64 oracle's clip norm (median per-sample norm), its update, and the check that it binds
    for some samples only."""
    clip, expected, norms = oracle_update(model, batch, CASE, "mean")
    assert 0 < int((norms > clip).sum()) < batch[0].shape[0], "the clip norm binds for some samples only"
    return clip, expected


@pytest.mark.parametrize("global_batch", [B, WORLD], ids=["3-per-rank", "1-per-rank"])
@pytest.mark.parametrize("mode", FSDP_MODES)
def test_fsdp_step_equals_single_process(ranks, mode, global_batch):
    """1 sample per rank is not a batch of one: the single-sample shortcut must not apply."""
    torch.manual_seed(0)
    model = LlamaLM(SPEC)
    batch = CASE.batch(global_batch)
    clip, _ = clip_binding_for_some(model, batch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = dp_update(model, batch, CASE, mode.removesuffix("_fsdp"), clip, "mean")
    after = run_llama(ranks, mode, model, batch, clip)
    whole = total_norm(expected.values())
    for n, update in expected.items():
        assert_rel_close(f"{mode}/{n}", before[n] - after[n], update, torch.float32, scale=whole)


def max_error(update: dict, expected: dict) -> float:
    """Largest absolute difference over all parameters."""
    return max((update[n].double() - expected[n].double()).abs().max().item() for n in expected)


@pytest.mark.parametrize("mode", FSDP_MODES)
def test_fsdp_bf16_mixed_precision_error_is_that_of_plain_bf16(ranks, mode):
    """param_dtype bf16, reduce float32: |update - float64 oracle| <= 3 x plain FSDP2 bf16's error."""
    torch.manual_seed(0)
    model = LlamaLM(SPEC)
    batch = CASE.batch(B)
    clip, expected_dp = clip_binding_for_some(model, batch)
    grads = reference.per_sample_grads(model, sample_loss_fn(CASE, "mean"), batch)
    expected_plain = {n: g.sum(0) / B for n, g in grads.items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = run_llama(ranks, "nondp", model, batch, clip, torch.bfloat16)
    private = run_llama(ranks, mode, model, batch, clip, torch.bfloat16)
    error_private = max_error({n: before[n] - private[n] for n in before}, expected_dp)
    error_plain = max_error({n: before[n] - plain[n] for n in before}, expected_plain)
    assert 0 < error_private <= 3 * error_plain, f"{mode}: bf16 error {error_private:.3g} > 3 x plain bf16 FSDP2's {error_plain:.3g}"


class Watch(TorchDispatchMode):
    """Records the size of every normal draw, and the collectives, inside the block."""

    def __init__(self):
        super().__init__()
        self.sizes, self.collectives = [], collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if name.startswith("aten.normal"):
            self.sizes.append(out.numel())
        elif "c10d" in name:
            self.collectives[name] += 1
        return out


def zero_gradient_noise_step(rank: int, device: torch.device, mode: str, reduction: str, sigma: float, clip: float, n: int,
                             seed: Optional[int] = None, secure: bool = False) -> dict:
    """A zero-initialised Linear(1000, 100) whose loss is 0 x output: the update (SGD lr=1) is the noise.

    Every rank's global generator is seeded alike (the case where drawing shard-shaped noise from it
    would give every rank the same noise); ``seed``: a user's noise_generator seeded so on every rank;
    ``secure``: secure mode, each rank with its own stand-in for the secure generator (torchcsprng has
    no wheel for this torch), and Poisson sampling (Opacus's secure mode swaps the sampler's generator).  Returns the gathered update, this rank's draws and collectives.
    """
    torch.manual_seed(0)
    model = torch.nn.Linear(1000, 100, bias=False, device=device)
    torch.nn.init.zeros_(model.weight)
    model = shard_blocks(model)
    loader = DataLoader(TensorDataset(torch.zeros(n)), batch_size=n)
    engine = PrivacyEngine()
    if secure:
        engine.secure_mode, engine.secure_rng = True, torch.Generator(device).manual_seed(1000 + rank)
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp_model, optimizer, criterion, _ = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
            criterion=torch.nn.MSELoss(reduction=reduction), noise_multiplier=sigma, max_grad_norm=clip,
            grad_sample_mode=mode, poisson_sampling=secure, loss_reduction=reduction, noise_generator=generator,
        )
    x = torch.randn(n // WORLD, 1000, device=device)
    criterion(dp_model(x) * 0, torch.zeros(n // WORLD, 100, device=device)).backward()
    secure_calls = []
    real = dpkernels.optimizer._generate_noise
    dpkernels.optimizer._generate_noise = lambda **kw: secure_calls.append(kw) or real(**kw)
    try:
        with Watch() as draws:
            optimizer.step()
    finally:
        dpkernels.optimizer._generate_noise = real
    assert all(state["summed_grad"] is None for state in optimizer.grad_state.values()), "no gradient copy is held after the step"
    if secure:
        assert secure_calls and all(kw["secure_mode"] and kw["generator"] is engine.secure_rng for kw in secure_calls)
    return {"update": -gathered(model)["weight"], "shard_numel": model.weight.to_local().numel(),
            "draws": draws.sizes, "collectives": dict(draws.collectives)}


def noise_run(ranks, mode="flash_bk_fsdp", reduction="mean", **kw) -> dict:
    sigma, clip, n = 1.3, 0.7, 4 * WORLD
    out = ranks.run(functools.partial(zero_gradient_noise_step, mode=mode, reduction=reduction, sigma=sigma, clip=clip, n=n, **kw))
    out["expected_std"] = sigma * clip / (n if reduction == "mean" else 1)
    return out


def rank_shards(update: torch.Tensor) -> list:
    """The gathered weight [100, 1000] cut into the ranks' shards (rows, as FSDP2 shards), flattened."""
    return [s.flatten() for s in torch.chunk(update, WORLD, dim=0)]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", ["ghost_fsdp", "flash_bk_fsdp"])
def test_fsdp_noise_is_added_once_with_the_global_scale(ranks, mode, reduction):
    """Zero gradients on WORLD ranks x 4 samples: every coordinate of the update is N(0, s^2) with
    s = sigma C / (4 WORLD) (mean over the global batch) or sigma C (sum); noise added by every rank,
    or scaled for one rank's batch, would be off by sqrt(WORLD) or WORLD.  100,000 coordinates: the sample
    standard deviation has a relative standard error of 0.22%, so the +-2% band is 9 of them wide
    (false alarm < 1e-18).  Both runs (the two reductions) draw their noise independently.  Each rank
    draws exactly its shard's noise (no full-shape draw) and the optimizer step has no collective."""
    out = noise_run(ranks, mode, reduction)
    update = out["update"]
    assert abs(update.std().item() / out["expected_std"] - 1) < 0.02, (update.std().item(), out["expected_std"])
    assert bool((update != 0).all()), "every coordinate is noised"
    assert out["draws"] == [out["shard_numel"]], f"noise draws {out['draws']}: one of the shard's size {out['shard_numel']}"
    assert not out["collectives"], out["collectives"]


def assert_uncorrelated(update: torch.Tensor) -> None:
    """Every pair of ranks' shards: |correlation| < 4 / sqrt(n) over their n coordinates (independent
    shards: a false alarm below 1e-4 per pair; the same noise on two ranks: correlation 1)."""
    shards = rank_shards(update.double())
    for r in range(WORLD):
        for s in range(r + 1, WORLD):
            a, b = shards[r], shards[s]
            n = min(a.numel(), b.numel())
            corr = torch.corrcoef(torch.stack([a[:n], b[:n]]))[0, 1].item()
            assert abs(corr) < 4 / n**0.5, f"ranks {r} and {s}: noise correlation {corr:.4f} over {n} coordinates"


def test_fsdp_noise_of_ranks_is_independent_also_from_a_seed_given_to_all(ranks):
    """Every rank's global generator seeded alike, or one user noise_generator seeded alike on every
    rank: the ranks' shards are uncorrelated, with the global scale."""
    for kw in ({}, {"seed": 7}):
        out = noise_run(ranks, **kw)
        assert_uncorrelated(out["update"])
        assert abs(out["update"].std().item() / out["expected_std"] - 1) < 0.02


def test_fsdp_seeded_noise_is_reproducible(ranks):
    """The same seeded noise_generator gives the same noise; another seed, other noise."""
    first, again, other = (noise_run(ranks, seed=seed)["update"] for seed in (7, 7, 8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert_uncorrelated(first - other)


def test_fsdp_secure_mode_noises_shards_from_the_secure_generator(ranks):
    """secure_mode: each rank draws its shard's noise from the engine's secure generator (Opacus's
    4-sample construction, shard-sized), with the global scale."""
    out = noise_run(ranks, secure=True)
    assert abs(out["update"].std().item() / out["expected_std"] - 1) < 0.02
    assert max(out["draws"]) == out["shard_numel"], out["draws"]
    assert_uncorrelated(out["update"])


SHAPES = [(37, 16), (5, 3), (1, 7), (3,), (16,), (8 * WORLD, 4), (2 * WORLD, 3, 2)]


def bucketed_mean_step(rank: int, device: torch.device, bucket_bytes: int) -> dict:
    """Parameters of SHAPES sharded on dim 0 (most rows uneven across ranks, some ranks empty) and one
    on dim 1; each rank's own full-size sums: their bucketed mean against the exact float64 mean."""
    mesh = init_device_mesh(device.type, (WORLD,))
    params = [distribute_tensor(torch.zeros(shape, device=device), mesh, [Shard(0)]) for shape in SHAPES]
    params.append(distribute_tensor(torch.zeros(6, 2 * WORLD + 1, device=device), mesh, [Shard(1)]))
    torch.manual_seed(100 + rank)
    grads = [torch.randn(p.shape, device=device) for p in params]
    with Watch() as seen:  # consumes (may overwrite) the gradients it is given: give it copies
        means = {id(p): mean for p, mean in mean_over_ranks_into_shards(((p, g.clone()) for p, g in zip(params, grads)), bucket_bytes=bucket_bytes)}
    assert len(means) == len(params), "every parameter once"
    errors = []
    for p, g in zip(params, grads):
        mean = means[id(p)]
        every = [torch.empty_like(g) for _ in range(WORLD)]
        dist.all_gather(every, g)
        exact = torch.stack(every).double().mean(0)
        assert mean.placements == p.placements and mean.shape == p.shape
        errors.append(((mean.full_tensor().double() - exact).abs().max() / exact.abs().max()).item())
    return {"errors": errors, "collectives": dict(seen.collectives)}


@pytest.mark.parametrize("bucket_bytes", [2**20, 64], ids=["one-bucket", "small-buckets"])
def test_bucketed_mean_over_ranks_equals_the_exact_mean(ranks, bucket_bytes):
    """Uneven and empty shards, one-parameter buckets (a view when rows divide by WORLD) and shared
    ones: each parameter's shard is the mean over ranks within float32 rounding; with room for all,
    the row-sharded parameters take one collective."""
    out = ranks.run(functools.partial(bucketed_mean_step, bucket_bytes=bucket_bytes))
    assert max(out["errors"]) < 1e-6, out["errors"]
    if bucket_bytes == 2**20:
        # torch.distributed's own ops (c10d.*): the buckets'; DTensor's redistribution uses functional ones
        reductions = sum(v for k, v in out["collectives"].items() if k.startswith("c10d.") and ("allreduce" in k or "reduce_scatter" in k))
        assert reductions == 1, f"one collective for all the row-sharded parameters: {out['collectives']}"


def test_phase_profile_of_fsdp_steps(tmp_path):
    """``python -m dpkernels.profiling.distributed`` under torchrun (WORLD gloo ranks, a small stack of
    Linear layers: Opacus's optimizer fails where a rank's shard is empty): every phase timed on every
    rank; bookkeeping's mean over ranks is one collective for this model, the noise none, and Opacus's
    FSDP optimizer can stand in for ours."""
    out = tmp_path / "phases.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", "-m", "dpkernels.profiling.distributed",
           "--model", "linear", "--seq", "8", "--batch", "2", "--steps", "2", "--amp", "none", "--modes", "nondp", "bk_fsdp", "ghost_fsdp:opacus", "--count-ops", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["config"]["gpus"] == WORLD and record["config"]["global_batch"] == 2 * WORLD
    phases = {"nondp": ["forward", "backward", "optimizer", "zero_grad"]}
    phases["bk_fsdp"] = phases["ghost_fsdp:opacus"] = ["forward", "norm_pass", "clipped_grads", "noise", "optimizer", "zero_grad"]
    for result in record["modes"]:
        mode = result["mode"]
        assert "error" not in result, result
        assert list(result["host_ms"]) == phases[mode] + ["step"], result["host_ms"]
        assert all(len(ranks) == WORLD and min(ranks) > 0 for ranks in result["host_ms"].values())
        ops = result["ops_rank0"]
        assert not any("c10d" in k for k in ops.get("noise", {})), ops
        if mode == "bk_fsdp":
            reductions = {k: v for k, v in ops["clipped_grads"].items() if "allreduce" in k and "MB" not in k}
            assert reductions == {"c10d.allreduce_": 1}, ops["clipped_grads"]


def secure_mode_without_generator_step(rank: int, device: torch.device) -> dict:
    """The FSDP optimizer built by hand with secure_mode and no generator: the error message of its step."""
    model = shard_blocks(torch.nn.Linear(4, 2, device=device))
    optimizer = dpkernels.optimizer.FSDPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                                                  expected_batch_size=2, secure_mode=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    try:
        optimizer.step()
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


def test_fsdp_secure_mode_without_a_secure_generator_is_refused(ranks):
    """Secure mode drawing from the default generator could give every rank the same noise: refused."""
    error = ranks.run(secure_mode_without_generator_step)["error"]
    assert error and "secure_mode needs a secure generator on each rank" in error
