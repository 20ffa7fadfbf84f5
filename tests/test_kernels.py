"""dpkernels.kernels: flash per-sample norms of nn.Linear vs the float64 oracle.

Two groups:
    tiled path (always runs)   the PyTorch implementation of the kernels' tiling (tiled.py)
    @pytest.mark.interpreter    the Triton kernels, on CUDA when available, else on CPU through the
                                interpreter.  TRITON_INTERPRET is read when Triton kernels are
                                decorated, so set it before pytest starts:
                                    TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py -m interpreter
                                Without CUDA and without TRITON_INTERPRET=1 they skip here, and
                                test_interpreter_tests_pass_in_a_subprocess runs them under the
                                interpreter, so the README's `python -m pytest` covers the kernels.
    @pytest.mark.gpu            large shapes (T up to 32768, d = p up to 8192, B T d > 2^31), CUDA only.

Oracle: ||G_i^T A_i||_F^2 and ||sum_t g_t||^2 in float64 (formulas.weight_norm_sq_direct / bias_norm_sq on
float64 copies), and dpkernels.reference.layer_per_sample_grads for one nn.Linear.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dpkernels.kernels import GramConfig, PsgConfig, flash_linear_norm_sq, flash_weight_norm_sq, heuristics, tiled
from dpkernels.kernels.formulas import bias_norm_sq, choose_method, weight_norm_sq_direct
from dpkernels.reference import layer_per_sample_grads
from dpkernels.testing import assert_no_worse_than_torch, assert_rel_close

CUDA = torch.cuda.is_available()
TRITON = CUDA or heuristics.interpreting()
LOW = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# at least 200 examples; the loaded profile decides the rest (``--hypothesis-profile=fuzz``: 10,000, random)
KERNEL_EXAMPLES = settings(
    settings.default, max_examples=max(200, settings.default.max_examples), suppress_health_check=[HealthCheck.function_scoped_fixture]
)
TILED_EXAMPLES = settings(settings.default, max_examples=max(200, settings.default.max_examples))


def kernel_test(fn):
    """Mark a test that launches the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)."""
    skip = pytest.mark.skipif(not TRITON, reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before import")
    return pytest.mark.interpreter(skip(fn))


@pytest.fixture
def device() -> str:
    return "cuda" if CUDA else "cpu"


# ---- data, oracle, tolerances ---------------------------------------------------------------------


def make(B, T, d, p, seed=0, dtype=torch.float32, device="cpu"):
    """A [B, T, d], G [B, T, p]; G shares one direction per sample across t, so ||sum_t g_t||^2 differs
    clearly from sum_t ||g_t||^2 (the FlashNorm bias bug)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(B, T, d, generator=gen)
    G = torch.randn(B, T, p, generator=gen) + torch.randn(B, 1, p, generator=gen)
    return A.to(device=device, dtype=dtype), G.to(device=device, dtype=dtype)


def oracle(A, G):
    """(||G_i^T A_i||_F^2, ||sum_t g_t||^2) in float64 from the (rounded) inputs."""
    return weight_norm_sq_direct(A.double(), G.double()), bias_norm_sq(G.double())


def check_fp32(weight, bias, A, G):
    """fp32 results within 1e-5 of the float64 oracle, relative to the norms plus the same norms
    without cancellation (the oracle on |A|, |G|: ||sum_t |g_t| |a_t|^T||^2), which bounds the
    rounding error of any float32 evaluation of the sum, by Gram or by per-sample gradient: when
    sum_t g_t a_t^T nearly cancels, no fp32 method is within 1e-5 of the result alone.
    Bias None iff not requested."""
    ref_w, ref_b = oracle(A, G)
    abs_w, abs_b = oracle(A.abs(), G.abs())
    assert weight.dtype == torch.float32 and weight.shape == (A.shape[0],)
    assert_rel_close("weight norm^2", weight, ref_w, torch.float32, scale=abs_w.norm().item())
    if bias is not None:
        assert bias.dtype == torch.float32
        assert_rel_close("bias norm^2", bias, ref_b, torch.float32, scale=abs_b.norm().item())


def torch_in_dtype(A, G, kernel):
    """Plain PyTorch's norms computed entirely in the inputs' (16-bit) dtype, by the same strategy."""
    if kernel == "gram":
        weight = (torch.bmm(A, A.transpose(1, 2)) * torch.bmm(G, G.transpose(1, 2))).sum((1, 2))
    else:
        weight = torch.bmm(G.transpose(1, 2), A).pow(2).sum((1, 2))
    return weight, G.sum(1).pow(2).sum(1)


def check_low_precision(weight, bias, A, G, kernel):
    """16-bit inputs: error <= 2 x plain PyTorch's own error in that dtype + 1e-5 of the norm."""
    assert weight.dtype == bias.dtype == torch.float32 and weight.shape == bias.shape == (A.shape[0],)
    if A.shape[0] == 0:
        return
    ref_w, ref_b = oracle(A, G)
    base_w, base_b = torch_in_dtype(A.cpu(), G.cpu(), kernel)
    assert torch.isfinite(weight).all() and torch.isfinite(bias).all()
    assert_no_worse_than_torch("weight norm^2", weight.cpu(), base_w, ref_w.cpu(), atol=1e-5 * ref_w.abs().max().item())
    assert_no_worse_than_torch("bias norm^2", bias.cpu(), base_b, ref_b.cpu(), atol=1e-5 * ref_b.abs().max().item())


# ---- strategies: shapes and small block configs ---------------------------------------------------

EDGE_T = [1, 2, 7, 13, 16, 17, 31, 32, 33, 37, 40]


@st.composite
def shapes(draw, max_b=3, max_t=40, max_dim=48):
    B = draw(st.integers(0, max_b))
    T = draw(st.one_of(st.sampled_from([t for t in EDGE_T if t <= max_t]), st.integers(1, max_t)))
    return B, T, draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))


def kernel_configs():
    """(method, config): small blocks so T <= 40 spans several T tiles / splits; None = heuristic."""
    gram = st.builds(GramConfig, BT=st.sampled_from([16, 32]), BK=st.sampled_from([16, 32]))
    psg = st.builds(
        PsgConfig,
        BP=st.sampled_from([16, 32]),
        BD=st.sampled_from([16, 32]),
        BT=st.sampled_from([16, 32]),
        TS=st.sampled_from([7, 16, 23, 10**6]),
    )
    return st.one_of(
        st.tuples(st.just("gram"), st.one_of(st.none(), gram)),
        st.tuples(st.just("psg"), st.one_of(st.none(), psg)),
        st.tuples(st.just("auto"), st.none()),
    )


def tiled_configs():
    """(method, config) for the PyTorch tiling: any positive tile sizes work there."""
    gram = st.builds(GramConfig, BT=st.integers(1, 17), BK=st.integers(1, 17))
    psg = st.builds(PsgConfig, BP=st.integers(1, 17), BD=st.integers(1, 17), BT=st.integers(1, 17), TS=st.just(1))
    return st.one_of(
        st.tuples(st.just("gram"), st.one_of(st.none(), gram)),
        st.tuples(st.just("psg"), st.one_of(st.none(), psg)),
        st.tuples(st.just("auto"), st.none()),
    )


# ---- the tiled PyTorch path (always runs) ---------------------------------------------------------


@TILED_EXAMPLES
@given(shapes(max_b=4, max_t=64, max_dim=48), tiled_configs(), st.booleans(), st.integers(0, 2**16))
def test_tiled_matches_oracle(shape, method_config, with_bias, seed):
    A, G = make(*shape, seed=seed)
    method, config = method_config
    weight, bias = tiled.tiled_linear_norm_sq(A, G, with_bias, method, config)
    assert (bias is None) == (not with_bias)
    check_fp32(weight, bias, A, G)


@TILED_EXAMPLES
@given(shapes(max_b=3, max_t=40, max_dim=32), tiled_configs(), st.sampled_from(sorted(LOW)), st.integers(0, 2**16))
def test_tiled_low_precision(shape, method_config, dtype, seed):
    A, G = make(*shape, seed=seed, dtype=LOW[dtype])
    method, config = method_config
    weight, bias = tiled.tiled_linear_norm_sq(A, G, True, method, config)
    kernel = heuristics.resolve_kernel(method, config, *shape)
    check_low_precision(weight, bias, A, G, kernel)


@pytest.mark.parametrize("method", ["gram", "psg"])
def test_tiled_memory_is_per_tile(method, monkeypatch):
    """No bmm in the tiled path produces a [B, T, T] Gram or a [B, p, d] per-sample gradient."""
    B, T, d, p = 2, 96, 40, 48
    config = GramConfig(BT=16, BK=8) if method == "gram" else PsgConfig(BP=8, BD=16, BT=32, TS=T)
    sizes = []

    class SpyTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def bmm(x, y):
            sizes.append(x.shape[1] * y.shape[2])
            return torch.bmm(x, y)

    monkeypatch.setattr(tiled, "torch", SpyTorch())
    A, G = make(B, T, d, p)
    check_fp32(*tiled.tiled_linear_norm_sq(A, G, False, method, config), A, G)
    assert max(sizes) == (16 * 16 if method == "gram" else 8 * 16)


def test_dispatch_without_interpreter_uses_tiled_path(monkeypatch):
    """CPU tensors with TRITON_INTERPRET unset run tiled.py (no Triton launch)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []
    monkeypatch.setattr(tiled, "tiled_linear_norm_sq", lambda *a: calls.append(a) or (torch.zeros(2), None))
    flash_linear_norm_sq(*make(2, 3, 4, 5), False)
    assert len(calls) == 1


@pytest.mark.parametrize("with_bias", [False, True])
def test_empty_batch_returns_empty(with_bias, monkeypatch):
    """B = 0 returns empty float32 results without reaching any kernel."""
    monkeypatch.setattr(tiled, "tiled_linear_norm_sq", None)
    A, G = make(0, 5, 3, 4)
    weight, bias = flash_linear_norm_sq(A, G, with_bias)
    assert weight.shape == (0,) and weight.dtype == torch.float32
    assert (bias is None) == (not with_bias) and (bias is None or bias.shape == (0,))


def test_float64_falls_back_to_exact_pytorch():
    A, G = make(3, 9, 5, 7, dtype=torch.float64)
    weight, bias = flash_linear_norm_sq(A, G, True)
    ref_w, ref_b = oracle(A, G)
    assert weight.dtype == bias.dtype == torch.float64
    assert_rel_close("weight norm^2", weight, ref_w, torch.float64)
    assert_rel_close("bias norm^2", bias, ref_b, torch.float64)


@pytest.mark.parametrize("B,T,d,p", [(3, 1, 8, 8), (2, 50, 8, 8), (2, 2, 64, 64), (1, 100, 3, 1000)])
def test_auto_choice_is_the_linear_cost_rule(B, T, d, p):
    expected = "gram" if choose_method(B, T, d, p) == "ghost" else "psg"
    assert heuristics.choose_kernel(B, T, d, p) == expected
    assert heuristics.resolve_kernel("auto", None, B, T, d, p) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_flops_are_weighted_by_their_measured_cost(dtype):
    """The Gram kernel runs below the tiles' efficiency: it is chosen only when that many times cheaper."""
    c = heuristics.GRAM_FLOP_COST[dtype]
    d = p = 4096
    T_even = d * p // (d + p)  # equal flops: the plain rule's boundary
    assert heuristics.choose_kernel(1, T_even // 2, d, p) == "gram"
    assert heuristics.choose_kernel(1, int(T_even / c) + 1, d, p, dtype) == "psg"
    assert heuristics.choose_kernel(1, int(T_even / c) - 1, d, p, dtype) == "gram"


@pytest.mark.parametrize("B,T,d,p", [(1, 32768, 1024, 1024), (1, 16384, 768, 3072), (32, 16384, 256, 256), (2, 65536, 64, 64)])
def test_split_buffer_stays_within_its_bound(B, T, d, p):
    for dtype in (torch.float32, torch.bfloat16):
        cfg = heuristics.psg_config(B, T, d, p, dtype, programs=264)
        tiles = B * heuristics.cdiv(p, cfg.BP) * heuristics.cdiv(d, cfg.BD)
        if cfg.splits(T) > 1:
            assert cfg.splits(T) * tiles * cfg.BP * cfg.BD * 4 <= heuristics.SPLIT_BUFFER_BYTES


def test_mismatched_config_and_bad_method_raise():
    A, G = make(2, 3, 4, 5)
    with pytest.raises(ValueError):
        flash_linear_norm_sq(A, G, False, "gram", PsgConfig(BP=16, BD=16, BT=16, TS=16))
    with pytest.raises(ValueError):
        flash_linear_norm_sq(A, G, False, "ghost")


def test_psg_heuristic_splits_t_when_tiles_are_few():
    """Few tiles -> T split into ranges of TS rows, a multiple of BT, covering T exactly once."""
    cfg = heuristics.psg_config(1, 600, 32, 32, torch.bfloat16, programs=64)
    NS = cfg.splits(600)
    assert NS > 1 and cfg.TS % cfg.BT == 0 and (NS - 1) * cfg.TS < 600 <= NS * cfg.TS
    assert heuristics.psg_config(64, 600, 32, 32, torch.bfloat16, programs=64).splits(600) == 1


# ---- the Triton kernels (CUDA, or the interpreter) ------------------------------------------------


@kernel_test
@KERNEL_EXAMPLES
@given(shapes(), kernel_configs(), st.booleans(), st.integers(0, 2**16))
def test_kernel_matches_oracle(device, shape, method_config, with_bias, seed):
    A, G = make(*shape, seed=seed, device=device)
    method, config = method_config
    weight, bias = flash_linear_norm_sq(A, G, with_bias, method, config)
    assert (bias is None) == (not with_bias)
    check_fp32(weight, bias, A, G)


@kernel_test
@KERNEL_EXAMPLES
@given(shapes(max_dim=32), kernel_configs(), st.sampled_from(sorted(LOW)), st.integers(0, 2**16))
def test_kernel_low_precision(device, shape, method_config, dtype, seed):
    A, G = make(*shape, seed=seed, dtype=LOW[dtype], device=device)
    method, config = method_config
    weight, bias = flash_linear_norm_sq(A, G, True, method, config)
    check_low_precision(weight, bias, A, G, heuristics.resolve_kernel(method, config, *shape))


@kernel_test
@pytest.mark.parametrize("a_dtype,g_dtype", [("float32", "bfloat16"), ("float16", "float32"), ("bfloat16", "float16")])
@pytest.mark.parametrize("method", ["gram", "psg"])
def test_kernel_mixed_dtypes(device, a_dtype, g_dtype, method):
    """A and G in different dtypes: operands upcast to fp32, results exact for the rounded inputs."""
    A, G = make(2, 19, 21, 18, device=device)
    A, G = A.to(getattr(torch, a_dtype)), G.to(getattr(torch, g_dtype))
    check_fp32(*flash_linear_norm_sq(A, G, True, method), A, G)


CASES = [
    pytest.param("gram", GramConfig(BT=16, BK=16), id="gram-BT16"),
    pytest.param("psg", PsgConfig(BP=16, BD=16, BT=16, TS=10**6), id="psg-nosplit"),
    pytest.param("psg", PsgConfig(BP=16, BD=32, BT=16, TS=13), id="psg-split13"),
]


@kernel_test
@pytest.mark.parametrize("method,config", CASES)
def test_kernel_poisoned_buffers(device, method, config, monkeypatch):
    """Every torch.empty in linear_norm.py is NaN-filled: an unwritten partial makes the norm NaN."""
    from dpkernels.kernels import linear_norm

    class PoisonedTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*args, **kwargs):
            return torch.empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(linear_norm, "torch", PoisonedTorch())
    A, G = make(3, 37, 35, 20, device=device)
    check_fp32(*flash_linear_norm_sq(A, G, True, method, config), A, G)


@kernel_test
@pytest.mark.parametrize("method,config", CASES + [pytest.param("auto", None, id="auto")])
def test_kernel_first_call_equals_second(device, method, config):
    A, G = make(3, 40, 33, 17, seed=1, device=device)
    first = flash_linear_norm_sq(A, G, True, method, config)
    second = flash_linear_norm_sq(A, G, True, method, config)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@kernel_test
@pytest.mark.parametrize("method,config", CASES)
def test_kernel_non_contiguous_inputs(device, method, config):
    """A from a [T, B, d] tensor (batch stride < time stride) and G a strided column slice."""
    B, T, d, p = 3, 23, 19, 13
    A = torch.randn(T, B, d, device=device).transpose(0, 1)
    G = torch.randn(B, T, 2 * p + 1, device=device)[:, :, 1::2]
    assert not A.is_contiguous() and not G.is_contiguous()
    check_fp32(*flash_linear_norm_sq(A, G, True, method, config), A, G)


@kernel_test
@pytest.mark.parametrize("TS", [300, 320, 200, 599, 600])
def test_kernel_split_t_600(device, TS):
    """FlashNorm regression: T = 600 cut into ranges of TS rows; each split masks its own range end,
    so rows near a range boundary that is not a multiple of BT are counted once."""
    A, G = make(2, 600, 24, 40, seed=3, device=device)
    config = PsgConfig(BP=16, BD=32, BT=32, TS=TS)
    check_fp32(*flash_linear_norm_sq(A, G, True, "psg", config), A, G)


@kernel_test
def test_kernel_auto_split(device, monkeypatch):
    """The heuristic's own split (as on a GPU with few tiles per sample) is exact too."""
    from dpkernels.kernels import linear_norm

    monkeypatch.setattr(linear_norm, "programs_target", lambda device: 64)
    A, G = make(2, 600, 20, 30, seed=4, device=device)
    assert heuristics.psg_config(2, 600, 20, 30, torch.float32, 64).splits(600) > 1
    check_fp32(*flash_linear_norm_sq(A, G, True, "psg"), A, G)


@kernel_test
@pytest.mark.parametrize("B,T,d,p", [(1, 1, 1, 1), (3, 1, 40, 2), (2, 7, 1, 33), (2, 17, 33, 1)])
@pytest.mark.parametrize("method", ["gram", "psg"])
def test_kernel_degenerate_dims(device, B, T, d, p, method):
    A, G = make(B, T, d, p, device=device)
    check_fp32(*flash_linear_norm_sq(A, G, True, method), A, G)


@kernel_test
@pytest.mark.parametrize("TS", [10**6, 9])
def test_kernel_many_tiles(device, TS):
    """NP = 10 P-tiles > TILE_GROUP: the grouped program order covers every (P, D) tile once."""
    A, G = make(2, 20, 40, 150, seed=6, device=device)
    check_fp32(*flash_linear_norm_sq(A, G, True, "psg", PsgConfig(BP=16, BD=16, BT=16, TS=TS)), A, G)


@kernel_test
def test_kernel_empty_batch_does_not_launch(device, monkeypatch):
    from dpkernels.kernels import linear_norm

    monkeypatch.setattr(linear_norm, "linear_norm_sq", None)
    A, G = make(0, 5, 3, 4, device=device)
    assert flash_weight_norm_sq(A, G).shape == (0,)


@kernel_test
@pytest.mark.parametrize("method", ["gram", "psg", "auto"])
def test_kernel_matches_per_sample_autograd(device, method):
    """nn.Linear with bias on a [B, T, d] input vs the per-sample autograd loop in float64."""
    layer = nn.Linear(11, 9)
    x, G = make(3, 6, 11, 9, seed=5)
    ref = layer_per_sample_grads(layer, (x,), G)
    weight, bias = flash_linear_norm_sq(x.to(device), G.to(device), True, method)
    assert_rel_close("weight norm^2", weight, ref["weight"].flatten(1).pow(2).sum(1), torch.float32)
    assert_rel_close("bias norm^2", bias, ref["bias"].pow(2).sum(1), torch.float32)


# ---- large shapes on a GPU ------------------------------------------------------------------------


def chunked_reference(A, G):
    """float64 ||G_i^T A_i||_F^2 on the GPU, in chunks of samples and T rows (<= 1 GB of float64 each)."""
    B, T, d = A.shape
    samples = max(1, 2**30 // (8 * G.shape[-1] * d))
    rows = max(1, min(2048, 2**30 // (8 * samples * max(d, G.shape[-1]))))
    out = torch.empty(B, dtype=torch.float64, device=A.device)
    for i in range(0, B, samples):
        W = torch.zeros(min(samples, B - i), G.shape[-1], d, dtype=torch.float64, device=A.device)
        for t in range(0, T, rows):
            g, a = G[i : i + samples, t : t + rows], A[i : i + samples, t : t + rows]
            W.baddbmm_(g.double().transpose(1, 2), a.double())
        out[i : i + samples] = W.square().sum((1, 2))
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize(
    "B,T,d,p,method",
    [
        pytest.param(2, 16384, 8192, 8192, "auto", id="B2-T16384-d8192-p8192"),
        pytest.param(1, 32768, 8192, 8192, "auto", id="B1-T32768-d8192-p8192"),
        pytest.param(4, 32768, 768, 3072, "auto", id="B4-T32768-d768-p3072"),
        pytest.param(1, 32768, 256, 256, "psg", id="B1-T32768-d256-p256-split"),
        pytest.param(8, 256, 8192, 8192, "gram", id="B8-T256-d8192-p8192-gram"),
        pytest.param(9, 32768, 8192, 256, "psg", id="B9-T32768-d8192-p256-BTd-over-2^31"),
        pytest.param(1040, 256, 8192, 64, "gram", id="B1040-T256-d8192-p64-BTd-over-2^31"),
        pytest.param(1, 2**20, 16, 16, "psg", id="B1-T1048576-d16-p16-long-sequence"),
        pytest.param(2, 2**20, 64, 48, "auto", id="B2-T1048576-d64-p48-long-sequence"),
    ],
)
def test_gpu_large_shapes_bf16(B, T, d, p, method):
    gen = torch.Generator(device="cuda").manual_seed(0)
    A = torch.randn(B, T, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    G = torch.randn(B, T, p, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight, bias = flash_linear_norm_sq(A, G, True, method)
    ref_w, ref_b = chunked_reference(A, G), G.sum(1, dtype=torch.float64).square().sum(1)
    del A, G
    for name, got, ref in (("weight", weight, ref_w), ("bias", bias, ref_b)):
        assert torch.isfinite(got).all()
        rel = ((got.double() - ref).abs() / ref).max().item()
        assert rel < 1e-4, f"{name} norm^2: max relative error {rel:.3g} vs the float64 reference"


@pytest.mark.skipif(TRITON, reason="the Triton kernel tests run in this process (CUDA or TRITON_INTERPRET=1)")
def test_interpreter_tests_pass_in_a_subprocess(request):
    """Without CUDA, the `interpreter` tests of this file in a fresh process with TRITON_INTERPRET=1
    (read when the kernels are decorated, so not settable here): all pass and some ran."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1", HYPOTHESIS_PROFILE=request.config.getoption("hypothesis_profile", None) or os.environ.get("HYPOTHESIS_PROFILE", "ci"))
    command = [sys.executable, "-m", "pytest", __file__, "-m", "interpreter", "-x", "-q", "-p", "no:cacheprovider", "-c", str(root / "pytest.ini"), "--rootdir", str(root)]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, f"the interpreter tests failed:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0, f"no interpreter test ran: {summary!r}"
    assert not re.search(r"\d+ (failed|error|skipped)", summary), summary
