"""Whole-model equivalence: one DP step of every mode equals the float64 oracle's clipped mean
gradient for EVERY trainable parameter, with a clip norm that binds for some samples only."""

from __future__ import annotations

import pytest
import torch
from opacus.layers import DPMultiheadAttention
from torch import nn

from dpkernels import SINGLE_PROCESS_MODES
from dpkernels.models import MLP, GPT, ConvNet, DiT, DiTConfig, GPTConfig, TwoBranch
from dpkernels.models.llama import LlamaClassifier, LlamaLM, LlamaSpec
from dpkernels.testing import Case, assert_rel_close, dp_update, oracle_update, total_norm


class AttentionClassifier(nn.Module):
    """Embedding -> Opacus DPMultiheadAttention (batch_first) -> LayerNorm -> mean -> Linear."""

    def __init__(self, vocab: int = 19, d: int = 8, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.attn = DPMultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        x = self.emb(ids)
        y, _ = self.attn(x, x, x)
        return self.head(self.norm(x + y).mean(1))


class FallbackLayers(nn.Module):
    """Layer types without a dpkernels rule, handled by Opacus's grad samplers (materialised)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 3, 2)
        self.norm = nn.InstanceNorm3d(3, affine=True)
        self.head = nn.Linear(3 * 8, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).flatten(1))


class RootParameters(nn.Module):
    """A ViT-style model whose root owns bare parameters: a class token, a position embedding and a
    scale, used around supported child layers (the pitfall: hooks must still reach the children)."""

    def __init__(self, d: int = 8, T: int = 5, classes: int = 3):
        super().__init__()
        self.embed = nn.Linear(6, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.1 * torch.randn(T + 1, d))
        self.scale = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1) + self.pos
        return self.head(torch.tanh(self.norm(h) * self.scale)[:, 0])


def tokens(B, T=7, vocab=19):
    return torch.randint(0, vocab, (B, T))


CASES = [
    Case("mlp", MLP, lambda B: (torch.randn(B, 12), torch.randint(0, 5, (B,)))),
    Case("two_branch_frozen_stem", TwoBranch, lambda B: (torch.randn(B, 10), torch.randint(0, 3, (B,)))),
    Case("convnet", ConvNet, lambda B: (torch.randn(B, 3, 9, 9), torch.randint(0, 4, (B,)))),
    Case("opacus_fallback_conv3d_instancenorm", FallbackLayers, lambda B: (torch.randn(B, 2, 3, 3, 3), torch.randint(0, 4, (B,)))),
    Case(
        "gpt_layernorm",
        lambda: GPT(GPTConfig(vocab=19, d=16, layers=2, heads=2, max_len=8)),
        lambda B: (tokens(B), tokens(B)),
        logits_of=lambda out: out.transpose(1, 2),
    ),
    Case(
        "llama_rmsnorm_nobias",
        lambda: GPT(GPTConfig(vocab=19, d=16, layers=2, heads=4, max_len=8, norm="rmsnorm", bias=False)),
        lambda B: (tokens(B), tokens(B)),
        logits_of=lambda out: out.transpose(1, 2),
    ),
    Case(
        "transformers_llama",
        lambda: LlamaLM(LlamaSpec(vocab=19, hidden=16, layers=2, heads=2, intermediate=24, max_len=8)),
        lambda B: (tokens(B), tokens(B)),
        logits_of=lambda out: out.transpose(1, 2),
    ),
    Case(
        "transformers_llama_gqa_classifier",
        lambda: LlamaClassifier(LlamaSpec(vocab=19, hidden=16, layers=2, heads=4, kv_heads=2, intermediate=24, max_len=8)),
        lambda B: (torch.randint(1, 19, (B, 8)), torch.randint(0, 3, (B,))),
    ),
    Case("root_level_parameters", RootParameters, lambda B: (torch.randn(B, 5, 6), torch.randint(0, 3, (B,)))),
    Case("dp_multihead_attention", AttentionClassifier, lambda B: (tokens(B), torch.randint(0, 3, (B,)))),
    Case(
        "dit_adaln",
        lambda: DiT(DiTConfig(image=8, patch=4, channels=3, d=16, layers=2, heads=2, classes=5)),
        lambda B: (torch.randn(B, 3, 8, 8), torch.rand(B), torch.randint(0, 5, (B,)), torch.randn(B, 3, 8, 8)),
        criterion=nn.MSELoss,
    ),
]

B = 6

# transformers' RMSNorm computes in float32 whatever the model dtype, so that model has no float64-exact
# gradient to compare with: it is checked in float32 (1e-5) only.
FLOAT32_ONLY = {"transformers_llama", "transformers_llama_gqa_classifier"}
CASE_DTYPES = [
    pytest.param(case, dtype, id=f"{case.name}-{name}")
    for case in CASES
    for name, dtype in (("float64", torch.float64), ("float32", torch.float32))
    if not (dtype == torch.float64 and case.name in FLOAT32_ONLY)
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
@pytest.mark.parametrize("case, dtype", CASE_DTYPES)
def test_update_equals_oracle(case, dtype, mode, reduction):
    torch.manual_seed(0)
    model = case.build().to(dtype)
    batch = tuple(t.to(dtype) if t.is_floating_point() else t for t in case.batch(B))
    C, expected, norms = oracle_update(model, batch, case, reduction)
    assert 0 < int((norms > C).sum()) < B, "the clip norm must bind for some samples and not others"

    got = dp_update(model, batch, case, mode, C, reduction)

    assert got.keys() == expected.keys()
    whole = total_norm(expected.values())
    for name in expected:
        assert_rel_close(f"{case.name}/{mode}/{name}", got[name], expected[name], dtype, scale=whole)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bookkeeping_equals_ghost(case):
    torch.manual_seed(1)
    dtype = torch.float32 if case.name in FLOAT32_ONLY else torch.float64
    model = case.build().to(dtype)
    batch = tuple(t.to(dtype) if t.is_floating_point() else t for t in case.batch(5))
    C, _, _ = oracle_update(model, batch, case, "mean", quantile=0.3)
    ghost = dp_update(model, batch, case, "ghost", C, "mean")
    bk = dp_update(model, batch, case, "bk", C, "mean")
    whole = total_norm(ghost.values())
    for name in ghost:
        assert_rel_close(f"{case.name}/{name}", bk[name], ghost[name], dtype, scale=whole)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
@pytest.mark.parametrize("case", [c for c in CASES], ids=[c.name for c in CASES])
def test_update_equals_oracle_on_gpu(case, mode, monkeypatch):
    """The same check with the model on CUDA (Triton kernels in the flash modes), float32, TF32 off."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = case.build()
    batch = case.batch(B)
    C, expected, _ = oracle_update(model, batch, case, "mean")
    got = dp_update(model.cuda(), tuple(t.cuda() for t in batch), case, mode, C, "mean")
    whole = total_norm(expected.values())
    for name in expected:
        assert_rel_close(f"{case.name}/{mode}/{name}", got[name], expected[name], torch.float32, scale=whole)
