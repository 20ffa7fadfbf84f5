"""Mistakes a new user makes get a clear error, never a dropped or half-applied gradient.

A plain criterion used instead of the one make_private returned: its backward is refused before any
parameter's gradient is formed (a tensor hook on the model's outputs), so p.grad and the parameters
stay exactly as they were, micro-batches accumulated before are kept, and optimizer.step() without
a criterion backward says what to do instead of failing inside Opacus's noise.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dpkernels import SINGLE_PROCESS_MODES
from dpkernels.errors import CriterionError
from dpkernels.models import MLP
from dpkernels.testing import Case, assert_rel_close, make_private, oracle_update

CASE = Case("mlp", MLP, lambda B: (torch.randn(B, 12), torch.randint(0, 5, (B,))))
NAMES_THE_CRITERION = "criterion that make_private returned"


class WithNorm(nn.Module):
    """A Linear, a LayerNorm and a head: non-Linear parameters whose autograd gradients would leak."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.norm(torch.relu(self.fc(x))))


NORM_CASE = Case("with_norm", WithNorm, CASE.batch)


def snapshot(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()], [p.detach().clone() for p in model.parameters()]


def assert_unchanged(model, snap):
    grads, params = snap
    for p, g, w in zip(model.parameters(), grads, params):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
        assert torch.equal(p, w)


@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
def test_plain_criterion_first_is_refused_and_step_says_why(mode):
    model = WithNorm()
    batch = NORM_CASE.batch(4)
    dp_model, optimizer, criterion, _ = make_private(model, batch, NORM_CASE, mode, 1.0, "mean", noise=1.0)
    snap = snapshot(model)
    with pytest.raises(CriterionError, match=NAMES_THE_CRITERION):
        F.cross_entropy(dp_model(batch[0]), batch[1]).backward()
    assert_unchanged(model, snap)
    with pytest.raises(CriterionError, match=r"optimizer.step\(\): 6 of 6 trainable parameters have no gradient.*" + NAMES_THE_CRITERION):
        optimizer.step()
    assert_unchanged(model, snap)


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
def test_plain_micro_batch_after_a_correct_one_is_refused_and_nothing_is_lost(mode, B):
    """Micro-batch 1 through the criterion, micro-batch 2 through a plain loss (refused, p.grad as it
    was), then micro-batch 2 again through the criterion: the step equals the oracle's on both."""
    torch.manual_seed(3)
    model = WithNorm().double()
    x, y = NORM_CASE.batch(2 * B)
    x = x.double()
    C, expected, _ = oracle_update(model, (x, y), NORM_CASE, "sum")
    dp_model, optimizer, criterion, _ = make_private(model, (x, y), NORM_CASE, mode, C, "sum")
    criterion(dp_model(x[:B]), y[:B]).backward()
    snap = snapshot(model)
    for plain in (lambda out: F.cross_entropy(out, y[B:]), lambda out: out.sum(), lambda out: nn.CrossEntropyLoss()(out, y[B:]) * 0):
        with pytest.raises(CriterionError, match=NAMES_THE_CRITERION):
            plain(dp_model(x[B:])).backward()
        assert_unchanged(model, snap)
    criterion(dp_model(x[B:]), y[B:]).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    for n, p in model.named_parameters():
        assert_rel_close(n, before[n] - p.detach(), expected[n], torch.float64)


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_a_model_computing_its_own_loss_is_refused(mode):
    """A transformers model given labels= computes a plain loss inside its forward: refused too."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=31, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 31, (3, 6))
    dp_model, optimizer, criterion, _ = make_private(model, (ids, ids), CASE, mode, 1.0, "mean")
    snap = snapshot(model)
    with pytest.raises(CriterionError, match=NAMES_THE_CRITERION):
        dp_model(input_ids=ids, labels=ids).loss.backward()
    assert_unchanged(model, snap)


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_evaluation_forward_is_not_guarded(mode):
    """A forward under no_grad (evaluation) registers nothing; training goes on after it."""
    model = MLP()
    batch = CASE.batch(4)
    dp_model, _, criterion, _ = make_private(model, batch, CASE, mode, 1.0, "mean")
    with torch.no_grad():
        assert F.cross_entropy(dp_model(batch[0]), batch[1]).item() > 0
    criterion(dp_model(batch[0]), batch[1]).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_flat_logits_without_shape_are_refused_and_with_shape_accepted(mode):
    """Opacus-style flat logits need shape=(B, T, V): without it the B*T token losses are not B
    samples' losses, and backward says so (p.grad untouched); with it the step runs."""
    from dpkernels.models import GPT, GPTConfig

    model = GPT(GPTConfig(vocab=19, d=16, layers=1, heads=2, max_len=8))
    ids, y = torch.randint(0, 19, (3, 6)), torch.randint(0, 19, (3, 6))
    dp_model, _, criterion, _ = make_private(model, (ids, y), CASE, mode, 1.0, "mean")
    logits = dp_model(ids)
    with pytest.raises(ValueError, match=r"shape=\(B, T, V\)"):
        criterion(logits.view(18, 19), y.view(18)).backward()
    assert all(p.grad is None for p in model.parameters())
    logits = dp_model(ids)
    criterion(logits.view(18, 19), y.view(18), shape=(3, 6, 19)).backward()
    assert all(p.grad is not None for p in model.parameters())
