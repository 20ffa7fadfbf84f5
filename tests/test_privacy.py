"""Privacy mechanics and determinism: clipped norms are bounded, the noise has the stated scale,
runs repeat bitwise, and shapes that change between steps stay exact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dpkernels import SINGLE_PROCESS_MODES, reference
from dpkernels.errors import LayerInputError, UnsupportedModuleError
from dpkernels.models import GPT, ConvNet, GPTConfig
from dpkernels.testing import Case, assert_rel_close, dp_update, make_private, oracle_update, sample_loss_fn, total_norm

MODE_NAMES = SINGLE_PROCESS_MODES
GPT_CFG = GPTConfig(vocab=31, d=16, layers=1, heads=2, max_len=40)


def gpt_case(T: int) -> Case:
    return Case(
        f"gpt-T{T}",
        lambda: GPT(GPT_CFG),
        lambda B: (torch.randint(0, 31, (B, T)), torch.randint(0, 31, (B, T))),
        logits_of=lambda out: out.transpose(1, 2),
    )


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_every_clipped_per_sample_gradient_is_within_the_clip_norm(mode):
    """||c_i g_i|| <= C (1 + 1e-6) for every sample, with c_i from the mode and g_i from the oracle."""
    torch.manual_seed(0)
    case = gpt_case(9)
    model, batch = case.build().double(), case.batch(6)
    grads = reference.per_sample_grads(model, sample_loss_fn(case, "sum"), batch)
    norms = reference.flat_norms(grads)
    C = norms.quantile(0.5).item()
    dp_model, _, criterion, _ = make_private(copy.deepcopy(model), batch, case, mode, C, "sum")
    criterion(case.logits_of(dp_model(batch[0])), batch[1]).backward()
    coef = reference.clip_coefficients(dp_model.per_sample_gradient_norms, C)
    assert_rel_close("per-sample norms", dp_model.per_sample_gradient_norms, norms, torch.float64)
    assert torch.all(coef * norms <= C * (1 + 1e-6))
    assert int((coef < 1).sum()) == 3


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_noise_has_standard_deviation_sigma_c_over_b(mode):
    """Zero gradients, mean reduction: each coordinate of the update is N(0, (sigma C / B)^2).

    100,000 coordinates: the sample standard deviation has a relative standard error of
    1/sqrt(2 n) = 0.22%, so the +-2% band is 9 standard errors wide (false alarm < 1e-18).
    """
    sigma, C, B = 1.3, 0.7, 8
    model = nn.Linear(1000, 100, bias=False)
    nn.init.zeros_(model.weight)
    case = Case("zero", lambda: model, lambda n: (torch.randn(n, 1000), torch.zeros(n, 100)), criterion=nn.MSELoss)
    batch = case.batch(B)
    dp_model, optimizer, criterion, _ = make_private(model, batch, case, mode, C, "mean", noise=sigma)
    criterion(dp_model(batch[0]) * 0, batch[1]).backward()
    optimizer.step()  # SGD lr=1: weight = -(noise / B)
    std = model.weight.detach().std().item()
    assert abs(std / (sigma * C / B) - 1) < 0.02, std


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_two_runs_are_bitwise_identical_on_cpu(mode):
    case = gpt_case(11)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model, batch = case.build(), case.batch(5)
        runs.append(dp_update(model, batch, case, mode, 0.05, "mean"))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODE_NAMES)
def test_two_runs_on_gpu_agree_to_float_rounding(mode):
    """The Triton kernels write one partial per program (no atomics); what may differ between runs
    is PyTorch's own atomics (the embedding backward): at most float32 rounding of the update."""
    cfg = GPTConfig(vocab=31, d=64, layers=2, heads=2, max_len=200)
    case = Case("gpt-gpu", lambda: GPT(cfg), lambda B: (torch.randint(0, 31, (B, 200)), torch.randint(0, 31, (B, 200))), logits_of=lambda out: out.transpose(1, 2))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model, batch = case.build().cuda(), tuple(t.cuda() for t in case.batch(5))
        runs.append(dp_update(model, batch, case, mode, 0.05, "mean"))
    whole = total_norm(runs[0].values())
    for n in runs[0]:
        assert_rel_close(f"{mode}/{n} run 2 vs run 1", runs[1][n], runs[0][n], torch.float32, scale=whole)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_sequence_length_changing_between_steps_stays_exact(mode):
    """One wrapped model, steps at T = 3, 37, 5: every step's update equals its oracle's."""
    torch.manual_seed(2)
    model = GPT(GPT_CFG).double()
    first = gpt_case(3)
    dp_model, optimizer, criterion, _ = make_private(model, first.batch(4), first, mode, 1.0, "mean")
    for T in (3, 37, 5):
        case = gpt_case(T)
        batch = case.batch(4)
        snapshot = copy.deepcopy(model)
        C, expected, _ = oracle_update(snapshot, batch, case, "mean")
        optimizer.max_grad_norm = dp_model.max_grad_norm = C
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        criterion(case.logits_of(dp_model(batch[0])), batch[1]).backward()
        optimizer.step()
        optimizer.zero_grad()
        whole = total_norm(expected.values())
        for n, p in model.named_parameters():
            assert_rel_close(f"T={T} {n}", before[n] - p.detach(), expected[n], torch.float64, scale=whole)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_channels_last_and_non_contiguous_inputs_stay_exact(mode):
    torch.manual_seed(3)
    case = Case("convnet", ConvNet, lambda B: (torch.randn(B, 3, 9, 9), torch.randint(0, 4, (B,))))
    model = ConvNet().double()
    images, labels = case.batch(5)
    images = images.double()
    C, expected, _ = oracle_update(model, (images, labels), case, "mean")
    channels_last = images.to(memory_format=torch.channels_last)
    strided = torch.randn(5, 3, 9, 18, dtype=torch.float64)[..., ::2].copy_(images)
    for x in (channels_last, strided):
        got = dp_update(model, (x, labels), case, mode, C, "mean")
        whole = total_norm(expected.values())
        for n in expected:
            assert_rel_close(n, got[n], expected[n], torch.float64, scale=whole)


class DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


class FixedMask(nn.Module):
    """Dropout replayed: multiplies sample ``index`` by the mask the DP step's forward drew for it."""

    def __init__(self, masks: torch.Tensor):
        super().__init__()
        self.masks, self.index = masks, 0

    def forward(self, x):
        return x * self.masks[self.index : self.index + 1].to(x.dtype)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_dropout_uses_the_forward_pass_masks(mode):
    """The hooks see the real forward's dropout masks (no re-forward): the update equals the oracle
    run with the same per-sample masks."""
    torch.manual_seed(4)
    case = Case("dropout", DropoutMLP, lambda B: (torch.randn(B, 10), torch.randint(0, 3, (B,))))
    model, batch = DropoutMLP().double(), case.batch(6)
    x = batch[0].double()
    masks = []
    handle = model.drop.register_forward_hook(lambda m, inp, out: masks.append((out / inp[0].where(inp[0] != 0, 1)).detach()))
    torch.manual_seed(5)
    got = dp_update(model, (x, batch[1]), case, mode, 0.3, "mean")
    handle.remove()
    (mask,) = [m for m in masks if m.shape[0] == len(x)]  # one forward pass of the batch (the others: the batch-dimension probe's 1 and 2 samples, RNG restored)
    replay = copy.deepcopy(model)
    replay.drop = FixedMask(mask)

    def sample_loss(m, xi, yi):
        i = next(k for k in range(len(x)) if torch.equal(x[k : k + 1], xi))
        m.drop.index = i
        return nn.functional.cross_entropy(m(xi), yi)

    grads = reference.per_sample_grads(replay, sample_loss, (x, batch[1]))
    expected = {n: g / 6 for n, g in reference.clipped_sum(grads, 0.3).items()}
    whole = total_norm(expected.values())
    for n in expected:
        assert_rel_close(n, got[n], expected[n], torch.float64, scale=whole)


class RootScaleWith(nn.Module):
    """A root-level parameter around a Linear, with a dropout or a batch mean in the forward."""

    def __init__(self, extra: str):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.fc = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)
        self.extra = extra

    def forward(self, x):
        h = x * self.scale
        h = self.drop(h) if self.extra == "dropout" else h - h.mean(0)
        return self.fc(h)


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("extra, error, message", [("dropout", UnsupportedModuleError, "draws random numbers"), ("batch_mean", LayerInputError, "mixes samples")])
def test_root_parameters_refuse_a_forward_they_cannot_replay(mode, extra, error, message):
    """The root's own parameters are recomputed by running each sample alone: a forward that draws
    random numbers or mixes samples is refused with an error, and p.grad is left untouched."""
    model = RootScaleWith(extra)
    case = Case("root", lambda: model, lambda n: (torch.randn(n, 4), torch.randint(0, 3, (n,))))
    batch = case.batch(5)
    dp_model, optimizer, criterion, _ = make_private(model, batch, case, mode, 1.0, "mean")
    with pytest.raises(error, match=message):
        criterion(dp_model(batch[0]), batch[1]).backward()
    assert all(p.grad is None for p in model.parameters())


def test_root_parameters_of_a_sharded_model_are_refused():
    from dpkernels.clipping.module import check_supported

    with pytest.raises(UnsupportedModuleError, match=r"<root> \(.*RootScaleWith\)"):
        check_supported(RootScaleWith("dropout"), sharded=True)
    check_supported(RootScaleWith("dropout"), sharded=False)
