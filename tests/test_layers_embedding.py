"""EmbeddingSamples against the float64 per-sample oracle, its input checks, and its memory use."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dpkernels.errors import LayerInputError
from dpkernels.layers.embedding import EmbeddingSamples
from dpkernels.reference import layer_per_sample_grads
from dpkernels.testing import assert_rel_close, check_against_oracle

LENGTHS = [1, 2, 3, 5, 7, 11, 13, 17]


@st.composite
def embedding_cases(draw):
    """A small vocabulary (ids repeat and hit padding_idx often), ids of rank 1 to 3, float32 or float64."""
    B = draw(st.integers(0, 8))
    V = draw(st.integers(1, 8))
    D = draw(st.integers(1, 48))
    tail = draw(st.lists(st.sampled_from(LENGTHS), max_size=2))
    padding_idx = draw(st.none() | st.integers(-V, V - 1))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    module = nn.Embedding(V, D, padding_idx=padding_idx, dtype=dtype)
    ids = torch.randint(0, V, (B, *tail), generator=gen)
    G = torch.randn(*ids.shape, D, generator=gen, dtype=dtype)
    coef = torch.rand(B, generator=gen, dtype=dtype)
    return module, ids, G, coef


@given(embedding_cases())
def test_embedding_matches_oracle(case):
    module, ids, G, coef = case
    magnitude = layer_per_sample_grads(module, (ids,), G.abs())
    check_against_oracle(EmbeddingSamples(module, (ids,), G), module, (ids,), G, coef, magnitude)


def test_padding_rows_get_nothing():
    module = nn.Embedding(5, 3, padding_idx=1)
    ids = torch.tensor([[1, 1, 1], [1, 2, 2]])
    view = EmbeddingSamples(module, (ids,), torch.ones(2, 3, 3))
    assert view.norm_sq()[module.weight].tolist() == [0.0, 12.0]
    grad = view.clipped_grad(torch.ones(2))[module.weight]
    assert grad[1].abs().sum() == 0 and grad[2].tolist() == [2.0, 2.0, 2.0]


def test_frozen_weight_is_left_out():
    module = nn.Embedding(5, 3).requires_grad_(False)
    view = EmbeddingSamples(module, (torch.zeros(2, 4, dtype=torch.long),), torch.randn(2, 4, 3))
    assert view.norm_sq() == {} and view.clipped_grad(torch.ones(2)) == {}


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.numel = max([self.numel, *sizes])
        return out


def test_large_vocabulary_norms_never_touch_vocabulary_sized_tensors():
    V, D, B, T = 50_000, 8, 4, 16
    gen = torch.Generator().manual_seed(0)
    module = nn.Embedding(V, D, padding_idx=7, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=gen)
    ids[:, ::4] = ids[:, 1:2]  # repeated tokens
    ids[0, 3] = 7  # a padding position
    G = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    with LargestTensor() as mode:
        norms = EmbeddingSamples(module, (ids,), G).norm_sq()[module.weight]
    assert mode.numel <= B * T * D
    expected = torch.stack(
        [
            sum(G[i][ids[i] == v].sum(0).pow(2).sum() for v in ids[i].unique() if v != module.padding_idx)
            for i in range(B)
        ]
    )
    assert_rel_close("norm^2 at V = 50000", norms, expected, torch.float64)


IDS = torch.zeros(2, 4, dtype=torch.long)


@pytest.mark.parametrize(
    "module, ids, G, match",
    [
        (nn.Embedding(5, 3), torch.zeros(2, 4), torch.zeros(2, 4, 3), "integer token ids"),
        (nn.Embedding(5, 3), torch.tensor(1), torch.zeros(3), r"shape \[B, \.\.\.\]"),
        (nn.Embedding(5, 3), IDS, torch.zeros(2, 4, 2), r"\(2, 4, 3\)"),
        (nn.Embedding(5, 3, scale_grad_by_freq=True), IDS, torch.zeros(2, 4, 3), "scale_grad_by_freq=False"),
        (nn.Embedding(5, 3, sparse=True), IDS, torch.zeros(2, 4, 3), "sparse=False"),
    ],
)
def test_bad_input_is_refused(module, ids, G, match):
    with pytest.raises(LayerInputError, match=match):
        EmbeddingSamples(module, (ids,), G)
