"""Whole-model mechanisms, each a DP step of every mode against the float64 oracle (float64 at 1e-10,
float32 at 1e-5, a clip norm binding for some samples only):

- the batch dimension proven per layer call, with T == B: a [1, T]-broadcast position Embedding,
  a Linear applied to a [T, d] tensor, a [T, T] bias table (T5's relative attention bias), T5 itself;
- parameters used several times: a Linear called twice (bookkeeping's materialised and factored forms
  mixed), tied Embedding / Linear (either use's gradient first), a shared Embedding;
- in-place operations after hooked layers (ReLU(inplace=True), ``x += shortcut``);
- modules without a rule through torch.func: nn.MultiheadAttention (batch first or not), a module
  owning bare parameters below the root, a subclass changing its family's math;
and the refusals that remain, each naming the layer.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpkernels import SINGLE_PROCESS_MODES
from dpkernels.errors import LayerInputError, UnsupportedModuleError
from dpkernels.testing import Case, assert_rel_close, dp_update, make_private, oracle_update, total_norm

DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]


def check_step(build, batch, mode, dtype, *, B=4, logits_of=lambda out: out, criterion=nn.CrossEntropyLoss, reduction="mean"):
    """One DP step equals the oracle for every trainable parameter; the clip norm binds for some samples."""
    torch.manual_seed(0)
    case = Case("model", build, batch, criterion, logits_of)
    model = build().to(dtype)
    data = tuple(t.to(dtype) if t.is_floating_point() else t for t in case.batch(B))
    C, expected, norms = oracle_update(model, data, case, reduction)
    assert 0 < int((norms > C).sum()) < B, "the clip norm must bind for some samples and not others"
    got = dp_update(model, data, case, mode, C, reduction)
    assert got.keys() == expected.keys()
    whole = total_norm(expected.values())
    for name in expected:
        assert_rel_close(f"{mode}/{name}", got[name], expected[name], dtype, scale=whole)


def ids_and_labels(T, vocab=11, classes=3):
    return lambda B: (torch.randint(0, vocab, (B, T)), torch.randint(0, classes, (B,)))


# ---- the batch dimension (clipping/batch.py) ---------------------------------------------------------


class BroadcastPositions(nn.Module):
    """GPT-2 / BERT style: the position Embedding on [1, T] ids, its [1, T, d] output broadcast."""

    def __init__(self, vocab=11, d=6, T_max=9):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T_max, d)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.head(torch.tanh(self.tok(ids) + self.pos(positions)).mean(1))


class FeaturesOfPositions(nn.Module):
    """A Linear applied to a [T, d] tensor with no batch dimension (position features)."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.proj = nn.Linear(3, d)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        t = torch.arange(ids.shape[1], dtype=self.proj.weight.dtype)
        features = torch.stack([torch.sin(t), torch.cos(t), t / 10], dim=1)  # [T, 3]
        return self.head(torch.tanh(self.tok(ids) + self.proj(features)).mean(1))


class BiasTable(nn.Module):
    """T5 style: an Embedding on bucket ids [T, T] -> [T, T, H] -> [1, H, T, T], added to every
    sample's attention scores: its output cannot be expanded to the batch."""

    def __init__(self, vocab=11, d=4, heads=2, buckets=5):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, d * heads)
        self.bias = nn.Embedding(buckets, heads)
        self.head = nn.Linear(d * heads, 3)

    def forward(self, ids):
        B, T = ids.shape
        x = self.tok(ids).view(B, T, self.heads, -1).transpose(1, 2)  # [B, H, T, d]
        t = torch.arange(T)
        buckets = (t[None, :] - t[:, None]).clamp(-2, 2) + 2  # [T, T]
        scores = x @ x.transpose(-1, -2) + self.bias(buckets).permute(2, 0, 1).unsqueeze(0)
        h = (scores.softmax(-1) @ x).transpose(1, 2).reshape(B, T, -1)
        return self.head(h.mean(1))


BATCH_CASES = [
    pytest.param(BroadcastPositions, id="position_embedding_1xT"),
    pytest.param(FeaturesOfPositions, id="linear_on_Txd"),
    pytest.param(BiasTable, id="bias_table_TxT"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
@pytest.mark.parametrize("T", [4, 7], ids=["T==B", "T!=B"])
@pytest.mark.parametrize("build", BATCH_CASES)
def test_layers_called_without_a_batch_dimension_are_exact(build, T, mode, dtype):
    check_step(build, ids_and_labels(T), mode, dtype, B=4)


@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
def test_position_embedding_is_expanded_and_bias_table_rerun(mode):
    """The cheap path where it is valid: the [1, T] position Embedding's output is expanded (no per-
    sample re-run); the [T, T] bias table goes to torch.func over the model."""
    for build, how in ((BroadcastPositions, "expand"), (BiasTable, "rerun")):
        model = build()
        dp_model, _, _, _ = make_private(model, ids_and_labels(4)(4), Case("m", build, ids_and_labels(4)), mode, 1.0, "mean")
        dp_model(torch.randint(0, 11, (4, 4)))
        layer = model.pos if build is BroadcastPositions else model.bias
        (plan,) = dp_model._plans.values()
        assert plan.calls[(layer, 0)].how == how
        assert plan.calls[(model.tok, 0)].how == "rule"


@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
def test_t5_encoder_with_T_equal_to_B_is_exact(mode):
    """T5's relative attention bias (bucket ids [T, T], no batch dimension) at T == B, float32 (T5's
    norms compute their statistics in float32)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=20, d_model=8, d_kv=4, d_ff=12, num_layers=2, num_heads=2, dropout_rate=0.0, relative_attention_num_buckets=6)

    class T5Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = transformers.T5EncoderModel(config)
            self.head = nn.Linear(8, 3)

        def forward(self, ids):
            return self.head(self.encoder(input_ids=ids).last_hidden_state.mean(1))

    check_step(T5Classifier, ids_and_labels(4, vocab=20), mode, torch.float32, B=4)


class Folded(nn.Module):
    """A Linear called on [B T, d]: the batch is folded into another dimension."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(11, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids):
        x = self.tok(ids)
        return self.fc(x.reshape(-1, 4)).reshape(ids.shape[0], -1, 3).mean(1)


@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
def test_a_batch_folded_into_another_dimension_is_refused_by_name(mode):
    case = Case("folded", Folded, ids_and_labels(5))
    dp_model, _, criterion, _ = make_private(Folded(), case.batch(4), case, mode, 1.0, "mean")
    with pytest.raises(LayerInputError, match=r"layer fc \(Linear\).*folded"):
        dp_model(case.batch(4)[0])


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_a_new_batch_size_reuses_the_probe_and_T_equal_to_B_does_not(mode):
    """Poisson sampling changes B every step: one probe per input signature, with T == B its own."""
    case = Case("pos", BroadcastPositions, ids_and_labels(5))
    dp_model, _, criterion, _ = make_private(BroadcastPositions(), case.batch(4), case, mode, 1.0, "mean")
    for B, T in ((4, 5), (6, 5), (3, 5), (5, 5)):
        ids, y = ids_and_labels(T)(B)
        criterion(dp_model(ids), y).backward()
        assert dp_model.per_sample_gradient_norms.shape == (B,)
    assert len(dp_model._plans) == 2


# ---- parameters used several times (layers/shared.py) ------------------------------------------------


class LinearTwice(nn.Module):
    """One Linear on two sequences of different lengths."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        a = torch.tanh(self.fc(x))  # [B, 6, 5]
        b = torch.tanh(self.fc(a[:, :3] * 2))  # [B, 3, 5]
        return self.head(a.mean(1) + b.mean(1))


class TiedLM(nn.Module):
    """Embedding (with padding_idx) tied to the output Linear, per-token logits [B, T, V]."""

    def __init__(self, vocab=7, d=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.emb(ids))))


class SharedEmbedding(nn.Module):
    """One Embedding looked up by two id sequences (an encoder and a decoder sharing their table)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids).mean(1) * self.emb(ids.flip(1)[:, :2] % 5).sum(1)))


class ConvTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(torch.tanh(self.conv(x)))).mean((2, 3)))


class ScoreThenLookup(nn.Module):
    """A weight tied between a Linear called first and an Embedding looked up after it, so the
    Embedding's output gradient arrives before the Linear's (the other order of a tied pair's uses)."""

    def __init__(self, vocab=7, d=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.score = nn.Linear(d, vocab, bias=False)
        self.score.weight = self.emb.weight
        self.head = nn.Linear(d, 3)

    def forward(self, x, ids):
        gate = torch.sigmoid(self.score(x)).mean(-1, keepdim=True)  # [B, T, 1]
        return self.head(torch.tanh(self.emb(ids) * gate).mean(1))


class LinearLongAndShort(nn.Module):
    """One Linear on a long and a short sequence: bookkeeping materialises the long call's per-sample
    gradients (T (d + p) >= d p) and keeps the short call's factors, so the cross term mixes the two."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        a = torch.tanh(self.fc(x))  # [B, 9, 8]
        b = torch.tanh(self.fc(a[:, :2]))  # [B, 2, 8]
        return self.head(a.mean(1) * b.mean(1))


SHARED_CASES = [
    pytest.param(LinearTwice, lambda B: (torch.randn(B, 6, 5), torch.randint(0, 3, (B,))), None, id="linear_twice"),
    pytest.param(TiedLM, lambda B: (torch.randint(0, 7, (B, 6)), torch.randint(0, 7, (B, 6))), lambda out: out.transpose(1, 2), id="tied_lm_T6"),
    pytest.param(TiedLM, lambda B: (torch.randint(0, 7, (B, 1)), torch.randint(0, 7, (B, 1))), lambda out: out.transpose(1, 2), id="tied_lm_T1"),
    pytest.param(SharedEmbedding, ids_and_labels(5), None, id="shared_embedding"),
    pytest.param(ConvTwice, lambda B: (torch.randn(B, 2, 5, 5), torch.randint(0, 3, (B,))), None, id="conv_twice"),
    pytest.param(ScoreThenLookup, lambda B: (torch.randn(B, 5, 4), torch.randint(0, 7, (B, 5)), torch.randint(0, 3, (B,))), None, id="tied_lookup_after_linear"),
    pytest.param(LinearLongAndShort, lambda B: (torch.randn(B, 9, 8), torch.randint(0, 3, (B,))), None, id="linear_long_and_short"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
@pytest.mark.parametrize("build, batch, logits_of", SHARED_CASES)
def test_parameters_used_several_times_are_exact(build, batch, logits_of, mode, dtype):
    check_step(build, batch, mode, dtype, B=5, logits_of=logits_of or (lambda out: out))


# ---- in-place operations after hooked layers -----------------------------------------------------------


class InPlaceBlock(nn.Module):
    """A ResNet block's pattern: GroupNorm then ReLU(inplace=True), ``out += shortcut``, Linear then relu_."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.norm1 = nn.GroupNorm(2, 4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 2, 3, padding=1)
        self.norm2 = nn.GroupNorm(1, 2)
        self.fc = nn.Linear(2, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        out += x
        h = self.fc(self.relu(out).mean((2, 3)))
        h.relu_()
        return self.head(h)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
def test_in_place_operations_after_hooked_layers_are_exact(mode, dtype):
    check_step(InPlaceBlock, lambda B: (torch.randn(B, 2, 5, 5), torch.randint(0, 3, (B,))), mode, dtype, B=5)


class InputChangedInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 3)

    def forward(self, ids):
        ids = ids.clone()
        out = self.emb(ids)
        ids.add_(1)
        return out.mean(1)


@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
def test_an_input_changed_in_place_after_its_layer_is_refused_by_name(mode):
    case = Case("changed", InputChangedInPlace, ids_and_labels(4))
    dp_model, _, criterion, _ = make_private(InputChangedInPlace(), case.batch(3), case, mode, 1.0, "mean")
    ids, y = case.batch(3)
    with pytest.raises(LayerInputError, match=r"layer emb \(Embedding\): an input was modified in place"):
        criterion(dp_model(ids), y).backward()


# ---- modules without a rule: torch.func (layers/func.py) ---------------------------------------------


class Attention(nn.Module):
    """nn.MultiheadAttention as it is (packed in_proj, out_proj read without being called)."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=batch_first)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        x = self.emb(ids)
        if not self.batch_first:
            x = x.transpose(0, 1)
        y, _ = self.attn(x, x, x, key_padding_mask=ids == 0)
        return self.head(y.mean(1 if self.batch_first else 0))


class SubmoduleTokens(nn.Module):
    """A ViT embedding below the root: bare class token and position table around a Conv2d child."""

    def __init__(self, d=4):
        super().__init__()
        self.proj = nn.Conv2d(2, d, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.1 * torch.randn(1, 5, d))

    def forward(self, x):
        patches = self.proj(x).flatten(2).transpose(1, 2)  # [B, 4, d]
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), patches], 1) + self.pos


class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = SubmoduleTokens()
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.embed(x))).mean(1))


class ScaledHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.head = ScaledLinearLayer(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)))


class ScaledLinearLayer(nn.Linear):
    """A Linear subclass that changes the math: no Linear rule, torch.func instead."""

    def forward(self, x):
        return F.linear(x, 2 * self.weight, self.bias) * math.sqrt(2)


class ReturnsItsHiddenStates(nn.Module):
    """A root with its own parameter returning (logits, hidden states) where the logits are computed
    from the hidden states (as T5 returns the encoder states that feed its decoder)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6) + 0.1 * torch.randn(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(x * self.scale)
        return self.head(h), h


FUNC_CASES = [
    pytest.param(ReturnsItsHiddenStates, lambda B: (torch.randn(B, 6), torch.randint(0, 3, (B,))), lambda out: out[0], id="root_returns_what_feeds_its_logits"),
    pytest.param(lambda: Attention(True), ids_and_labels(5), None, id="multihead_attention_batch_first"),
    pytest.param(lambda: Attention(False), ids_and_labels(5), None, id="multihead_attention_seq_first"),
    pytest.param(TinyViT, lambda B: (torch.randn(B, 2, 4, 4), torch.randint(0, 3, (B,))), None, id="bare_parameters_below_root"),
    pytest.param(ScaledHead, lambda B: (torch.randn(B, 6), torch.randint(0, 3, (B,))), None, id="subclass_with_other_math"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
@pytest.mark.parametrize("build, batch, logits_of", FUNC_CASES)
def test_modules_without_a_rule_are_exact_through_torch_func(build, batch, logits_of, mode, dtype):
    check_step(build, batch, mode, dtype, B=5, logits_of=logits_of or (lambda out: out))


class RandomScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return F.dropout(x * self.scale, 0.5, self.training)


class WithRandomUnit(nn.Module):
    def __init__(self):
        super().__init__()
        self.unit = RandomScale()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.unit(x))


class BorrowsAWeight(nn.Module):
    """Uses another Linear's weight without calling that Linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(F.linear(x, self.unused.weight))


@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
@pytest.mark.parametrize(
    "build, error, match",
    [
        (WithRandomUnit, UnsupportedModuleError, r"layer unit \(RandomScale\).*draws random numbers"),
        (BorrowsAWeight, UnsupportedModuleError, r"\['unused.weight'\] received gradients outside"),
    ],
)
def test_what_cannot_be_exact_is_refused_by_name(build, error, match, mode):
    case = Case("bad", build, lambda B: (torch.randn(B, 4), torch.randint(0, 3, (B,))))
    model = build()
    dp_model, _, criterion, _ = make_private(model, case.batch(3), case, mode, 1.0, "mean")
    x, y = case.batch(3)
    with pytest.raises(error, match=match):
        criterion(dp_model(x), y).backward()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_gpt2_lm_tied_takes_the_cheap_path(mode):
    """GPT-2 as shipped: every layer call has a rule (the [1, T] position Embedding's output expanded,
    never re-run per sample), and autograd's Conv1D weight gradients are skipped in the norms pass."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=23, n_positions=16, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    case = Case("gpt2", None, lambda B: (torch.randint(0, 23, (B, 6)), torch.randint(0, 23, (B, 6))), logits_of=lambda out: out.logits.transpose(1, 2))
    dp_model, _, criterion, _ = make_private(model, case.batch(3), case, mode, 1e-3, "mean")
    reached = []
    model.transformer.h[0].attn.c_attn.weight.register_hook(lambda g: reached.append(True) if g is not None else None)
    ids, y = case.batch(3)
    out = dp_model(ids)
    (plan,) = dp_model._plans.values()
    assert {c.how for c in plan.calls.values()} == {"rule", "expand"}
    assert plan.calls[(model.transformer.wpe, 0)].how == "expand" and dp_model._root_call is None
    criterion(out.logits.transpose(1, 2), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert reached == ([] if mode == "bk" else [True]), "the Conv1D dW GEMM runs only in ghost's second pass"
