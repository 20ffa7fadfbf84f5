"""The criterion returned by make_private takes the logits a user already has.

Layouts: [B, C] classification, [B, T, V] (classes last), flat [B*T, V] with Opacus's shape=(B, T, V),
[B, V, T] (classes second); elementwise criteria on any shape.  Each reaches the wrapped criterion
as contiguous [N, V] rows (never a strided class dimension), and every layout gives the float64
oracle's update.  Per-sample mean over tokens counts only tokens whose target is not ignore_index
(Opacus 1.6's rule for shape=); a sample with no counted token has loss 0.
"""

from __future__ import annotations

import types

import pytest
import torch
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn
from torch.nn import functional as F

from dpkernels import SINGLE_PROCESS_MODES
from dpkernels.clipping import DPCriterion
from dpkernels.errors import CriterionError
from dpkernels.reference import clipped_sum, flat_norms, per_sample_grads
from dpkernels.testing import Case, assert_rel_close, make_private, total_norm

V, D = 7, 6


class TokenModel(nn.Module):
    """ids [B, T] -> logits [B, T, V] (classes last, contiguous)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids))))


# Each layout: (name, call) where call(criterion, logits [B, T, V], y [B, T]) -> loss.
LAYOUTS = {
    "classes_last": lambda crit, z, y: crit(z, y),
    "flat_shape": lambda crit, z, y: crit(z.reshape(-1, z.shape[-1]), y.reshape(-1), shape=z.shape),
    "flat_shape_tuple_kw": lambda crit, z, y: crit(input=z.reshape(-1, z.shape[-1]), target=y.reshape(-1), shape=tuple(z.shape)),
    "classes_second": lambda crit, z, y: crit(z.transpose(1, 2), y),
    "classes_second_contiguous": lambda crit, z, y: crit(z.transpose(1, 2).contiguous(), y),
    "classes_last_strided": lambda crit, z, y: crit(z.transpose(1, 2).contiguous().transpose(1, 2), y),
}


def batch_with_ignored(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :] = -100  # a sample with no counted token
    if T > 1:
        y[1, : T // 2 + 1] = -100  # a sample with some ignored tokens
    return ids, y


def oracle_sample_loss(reduction):
    """The documented per-sample loss, written out: sum of token losses / counted tokens (or the sum)."""

    def loss(model, ids, y):
        z = model(ids)[0]  # [T, V]
        keep = y[0] != -100
        tokens = F.cross_entropy(z[keep], y[0][keep], reduction="sum")
        return tokens if reduction == "sum" else tokens / max(int(keep.sum()), 1)

    return loss


def oracle(model, batch, reduction, quantile=0.5):
    grads = per_sample_grads(model, oracle_sample_loss(reduction), batch)
    norms = flat_norms(grads)
    C = norms[norms > 0].quantile(quantile).item()
    scale = batch[0].shape[0] if reduction == "mean" else 1
    return C, {n: g / scale for n, g in clipped_sum(grads, C).items()}, norms


def dp_step(model, batch, mode, C, reduction, layout):
    dp_model, optimizer, criterion, _ = make_private(model, batch, Case("tok", TokenModel, None), mode, C, reduction)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, y = batch
    loss = LAYOUTS[layout](criterion, dp_model(ids), y)
    loss.backward()
    optimizer.step()
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("B,T", [(4, 5), (5, 5), (3, 1)], ids=["B4T5", "T==B", "T1"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
def test_every_layout_gives_the_oracle_update(mode, reduction, B, T):
    torch.manual_seed(1)
    model = TokenModel().double()
    batch = batch_with_ignored(B, T)
    C, expected, norms = oracle(model, batch, reduction)
    assert bool((norms > C).any()) and bool((norms[norms > 0] < C).any()), "the clip norm binds for some samples only"
    whole = total_norm(expected.values())
    for layout in ("classes_last", "flat_shape", "classes_second", "classes_last_strided"):
        got = dp_step(_copy(model), batch, mode, C, reduction, layout)
        for n in expected:
            assert_rel_close(f"{layout} {n}", got[n], expected[n], torch.float64, scale=whole)


def _copy(model):
    twin = TokenModel().double()
    twin.load_state_dict(model.state_dict())
    return twin


class SpyCrossEntropy(nn.CrossEntropyLoss):
    """Records the input of every call, to prove the class dimension reaching it is contiguous."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def forward(self, input, target):
        self.seen.append((tuple(input.shape), input.is_contiguous(), input.stride()))
        return super().forward(input, target)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_no_layout_reaches_cross_entropy_with_a_strided_class_dimension(layout, monkeypatch):
    calls = []
    real = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda input, *a, **k: calls.append((input.dim(), input.is_contiguous())) or real(input, *a, **k))
    model = TokenModel()
    crit = SpyCrossEntropy()
    dp_model, _, _, _ = make_private(model, batch_with_ignored(3, 4), Case("tok", TokenModel, None), "bk", 1.0, "mean")
    criterion = DPCriterion(dp_model, crit, "mean", lambda *a: None)
    ids, y = batch_with_ignored(3, 4)
    LAYOUTS[layout](criterion, dp_model(ids), y)
    assert crit.seen == [((12, V), True, (V, 1))], crit.seen
    assert calls == [(2, True)], calls


def test_four_dimensional_classes_second_and_nll_loss_are_rows_too(monkeypatch):
    calls = []
    real = F.nll_loss
    monkeypatch.setattr(F, "nll_loss", lambda input, *a, **k: calls.append((tuple(input.shape), input.is_contiguous())) or real(input, *a, **k))
    crit = DPCriterion(types.SimpleNamespace(), nn.NLLLoss(reduction="sum"), "sum", None)
    logp = torch.randn(2, 5, 3, 4).log_softmax(1)  # [B, C, H, W]
    y = torch.randint(0, 5, (2, 3, 4))
    loss = crit(logp, y)
    assert calls == [((24, 5), True)]
    expected = F.nll_loss(logp, y, reduction="none").flatten(1).sum(1)
    torch.testing.assert_close(loss.loss_per_sample, expected)


def test_per_sample_mean_counts_tokens_as_opacus_does():
    """ignore_index tokens leave the denominator (Opacus 1.6's shape= rule); an all-ignored sample has
    loss 0; every sample's loss is PyTorch's mean cross-entropy of that sample alone."""
    ids, y = batch_with_ignored(4, 5)
    z = torch.randn(4, 5, V)
    ours = DPCriterion(types.SimpleNamespace(), nn.CrossEntropyLoss(), "mean", None)(z, y).loss_per_sample
    holder = types.SimpleNamespace(loss_reduction="mean")
    theirs = DPLossFastGradientClipping(holder, holder, nn.CrossEntropyLoss(), "mean")(z.reshape(20, V), y.reshape(20), shape=(4, 5, V))
    torch.testing.assert_close(ours, theirs.loss_per_sample)
    assert ours[0] == 0
    for i in range(1, 4):
        torch.testing.assert_close(ours[i], F.cross_entropy(z[i], y[i]))


def test_class_weights_weight_tokens_and_the_count_stays_a_count():
    w = torch.rand(V) + 0.5
    z, y = torch.randn(3, 4, V), torch.randint(0, V, (3, 4))
    y[1, 0] = -100
    loss = DPCriterion(types.SimpleNamespace(), nn.CrossEntropyLoss(weight=w, label_smoothing=0.1), "mean", None)(z, y).loss_per_sample
    tokens = F.cross_entropy(z.reshape(12, V), y.reshape(12), weight=w, label_smoothing=0.1, reduction="none").reshape(3, 4)
    torch.testing.assert_close(loss, tokens.sum(1) / torch.tensor([4.0, 3.0, 4.0]))


@pytest.mark.parametrize("shape", [(4,), (4, 3), (4, 3, 5), (4, 2, 3, 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_elementwise_criterion_on_any_shape(shape, reduction):
    out, target = torch.randn(shape), torch.randn(shape)
    loss = DPCriterion(types.SimpleNamespace(), nn.MSELoss(reduction=reduction), reduction, None)(out, target)
    sq = (out - target).pow(2).reshape(shape[0], -1)
    torch.testing.assert_close(loss.loss_per_sample, sq.mean(1) if reduction == "mean" else sq.sum(1))


def test_probability_targets_and_classification():
    crit = DPCriterion(types.SimpleNamespace(), nn.CrossEntropyLoss(), "mean", None)
    z = torch.randn(4, 3)
    p = torch.softmax(torch.randn(4, 3), 1)
    torch.testing.assert_close(crit(z, p).loss_per_sample, F.cross_entropy(z, p, reduction="none"))
    y = torch.randint(0, 3, (4,))
    torch.testing.assert_close(crit(z, y).loss_per_sample, F.cross_entropy(z, y, reduction="none"))
    zt, pt = torch.randn(2, 5, 3), torch.softmax(torch.randn(2, 5, 3), -1)
    flat = crit(zt.reshape(10, 3), pt.reshape(10, 3), shape=(2, 5, 3)).loss_per_sample
    torch.testing.assert_close(flat, F.cross_entropy(zt.reshape(10, 3), pt.reshape(10, 3), reduction="none").reshape(2, 5).mean(1))


@pytest.mark.parametrize(
    "logits,target,kwargs,message",
    [
        ((3, 5, 5), (3, 5), {}, "ambiguous"),  # T == V
        ((3, 4, 5), (3, 6), {}, "neither classes-last nor classes-second"),
        ((3, 4, 5), (2, 4), {}, "no batch dimension"),
        ((3, 4, 5), (3, 4, 5), {}, "one dimension fewer"),
        ((12, 5), (12,), {"shape": (3, 5, 5)}, r"shape=\(3, 5, 5\) does not match"),
        ((12, 5), (11,), {"shape": (3, 4, 5)}, "targets do not match"),
        ((12, 5), (12,), {"shape": (12,)}, r"shape= must be"),
        ((5,), (), {}, "no batch dimension"),
    ],
)
def test_ambiguous_or_mismatched_layouts_list_the_accepted_ones(logits, target, kwargs, message):
    crit = DPCriterion(types.SimpleNamespace(), nn.CrossEntropyLoss(), "mean", None)
    with pytest.raises(CriterionError, match=message) as info:
        crit(torch.randn(logits), torch.randint(0, 4, target), **kwargs)
    for layout in ("[B, C]", "[B, T, V]", "shape=(B, T, V)", "[B, V, T]"):
        assert layout in str(info.value)


def test_soft_targets_beyond_two_dimensions_are_ambiguous():
    crit = DPCriterion(types.SimpleNamespace(), nn.CrossEntropyLoss(), "mean", None)
    with pytest.raises(CriterionError, match="accepted layouts"):
        crit(torch.randn(2, 3, 4), torch.rand(2, 3, 4))


def test_shape_equal_to_the_logits_resolves_t_equal_v_as_classes_last():
    crit = DPCriterion(types.SimpleNamespace(), nn.CrossEntropyLoss(reduction="sum"), "sum", None)
    z, y = torch.randn(2, 5, 5), torch.randint(0, 5, (2, 5))
    got = crit(z, y, shape=z.shape).loss_per_sample
    torch.testing.assert_close(got, F.cross_entropy(z.reshape(10, 5), y.reshape(10), reduction="none").reshape(2, 5).sum(1))


def test_empty_batch_in_every_layout():
    crit = DPCriterion(types.SimpleNamespace(), nn.CrossEntropyLoss(), "mean", None)
    z, y = torch.randn(0, 4, V, requires_grad=True), torch.randint(0, V, (0, 4))
    for layout in LAYOUTS:
        assert LAYOUTS[layout](crit, z, y).loss_per_sample.shape == (0,)


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_returned_loss_logs_like_a_tensor(mode):
    torch.manual_seed(2)
    model = TokenModel()
    batch = batch_with_ignored(4, 5)
    dp_model, optimizer, criterion, _ = make_private(model, batch, Case("tok", TokenModel, None), mode, 1.0, "mean")
    ids, y = batch
    loss = criterion(dp_model(ids), y)
    value = loss.loss_per_sample.detach().mean()
    assert float(loss) == loss.item() == value.item()
    assert torch.equal(loss.detach(), value) and not loss.detach().requires_grad
    assert f"{loss:.3f}" == f"{value.item():.3f}" and f"{loss}" == str(loss) == f"PrivateLoss({value.item():.4f})"
    assert bool(loss < value + 1) and bool(loss <= value) and bool(loss > value - 1) and bool(loss >= value)
    assert bool(loss == value) and not bool(loss != value) and bool(loss == loss * 1)
    assert (loss / 2).item() == pytest.approx(value.item() / 2)
    loss.backward()  # still runs the clipping
    assert all(p.grad is not None for p in model.parameters())
    assert dp_model.per_sample_gradient_norms.shape == (4,)
