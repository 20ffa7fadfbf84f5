"""Named workloads (model + synthetic batch + loss) shared by the benchmarks, the profiler and the demo.

Each workload has a full size (the seeds' and anchors' configurations, for a GPU) and a small size
(the same architecture scaled down, for a CPU).  Batches are synthetic: random ids, images, targets.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from ..testing import Case
from .dit import DiT, DiTConfig
from .gpt import GPT, GPTConfig


class LinearStack(nn.Module):
    """``layers`` x Linear(d, d) with ReLU between them (the anchors' linear stack).  [B, T, d] -> [B, T, d]."""

    def __init__(self, d: int = 1024, layers: int = 8):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(torch.relu(x))
        return x


@dataclass(frozen=True)
class Workload:
    """A named (model, batch, loss): ``case`` builds them; B and T are recorded for reports."""

    name: str
    case: Case
    B: int
    T: int


def tokens_case(name: str, build: Callable[[], nn.Module], vocab: int, T: int) -> Case:
    return Case(
        name,
        build,
        lambda B: (torch.randint(0, vocab, (B, T)), torch.randint(0, vocab, (B, T))),
        logits_of=lambda out: out.transpose(1, 2),
    )


def gpt2(T: int, B: int, small: bool) -> Workload:
    cfg = GPTConfig(vocab=503, d=64, layers=2, heads=4, max_len=T) if small else GPTConfig(max_len=T)
    return Workload(f"gpt2-T{T}-B{B}", tokens_case("gpt2", lambda: GPT(cfg), cfg.vocab, T), B, T)


def llama(T: int, B: int, small: bool) -> Workload:
    from .llama import LlamaLM, LlamaSpec

    spec = LlamaSpec(vocab=320, hidden=64, layers=2, heads=4, intermediate=176, max_len=T) if small else LlamaSpec(max_len=T)
    return Workload(f"llama-T{T}-B{B}", tokens_case("llama", lambda: LlamaLM(spec), spec.vocab, T), B, T)


def llama3(T: int, B: int, small: bool, layers: Optional[int] = None, labels: int = 3) -> Workload:
    """Seed 004's model: Llama-3-8B's shape (``layers`` decoder layers, default its 32) classifying
    each sequence into ``labels`` classes from its last token; ids drawn from [1, vocab) (0 pads)."""
    from .llama import LLAMA3_8B, LlamaClassifier, LlamaSpec

    if small:
        spec = LlamaSpec(vocab=320, hidden=64, layers=layers or 2, heads=4, kv_heads=2, intermediate=176, max_len=T)
    else:
        spec = replace(LLAMA3_8B, layers=layers or LLAMA3_8B.layers, max_len=max(T, LLAMA3_8B.max_len))
    case = Case(
        "llama3",
        lambda: LlamaClassifier(spec, labels),
        lambda B: (torch.randint(1, spec.vocab, (B, T)), torch.randint(0, labels, (B,))),
    )
    return Workload(f"llama3-L{spec.layers}-T{T}-B{B}", case, B, T)


def dit(B: int, small: bool) -> Workload:
    cfg = DiTConfig(image=32, patch=8, d=64, layers=2, heads=4, classes=10) if small else DiTConfig()
    case = Case(
        "dit",
        lambda: DiT(cfg),
        lambda B: (
            torch.randn(B, cfg.channels, cfg.image, cfg.image),
            torch.rand(B) * 1000,
            torch.randint(0, cfg.classes, (B,)),
            torch.randn(B, cfg.channels, cfg.image, cfg.image),
        ),
        criterion=nn.MSELoss,
    )
    return Workload(f"dit-B{B}", case, B, cfg.tokens)


def linear_stack(T: int, B: int, small: bool) -> Workload:
    d = 64 if small else 1024
    case = Case(
        "linear_stack",
        lambda: LinearStack(d),
        lambda B: (torch.randn(B, T, d), torch.randn(B, T, d)),
        criterion=nn.MSELoss,
    )
    return Workload(f"linear-T{T}-B{B}", case, B, T)


# The step-level configurations of the benchmark issue: (builder, full (T, B), small (T, B) for a CPU).
STEP_CONFIGS = (
    (gpt2, (1024, 16), (64, 4)),
    (gpt2, (4096, 4), (128, 2)),
    (llama, (16384, 1), (128, 1)),
    (llama, (16384, 2), (128, 2)),
    (linear_stack, (4096, 4), (128, 4)),
    (linear_stack, (16384, 1), (256, 1)),
)


def step_workloads(small: bool) -> Tuple[Workload, ...]:
    """The step-level configurations (small: the same architectures and shapes scaled down), and DiT-L at B=2."""
    sized = tuple(build(*(small_TB if small else full_TB), small) for build, full_TB, small_TB in STEP_CONFIGS)
    return sized + (dit(2, small),)


class BertClassifier(nn.Module):
    """transformers' DistilBertForSequenceClassification (random weights) returning plain logits.

    Position ids are passed as a contiguous [B, T] tensor, so the position Embedding sees the batch
    dimension (per-sample norms need every trainable layer's input to start with the batch, and
    Opacus's embedding norm sampler views its input flat).
    ids [B, T] -> logits [B, labels].
    """

    def __init__(self, config):
        super().__init__()
        from transformers import DistilBertForSequenceClassification

        self.net = DistilBertForSequenceClassification(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
        return self.net(input_ids=ids, position_ids=positions).logits


def bert(T: int, B: int, small: bool, labels: int = 3) -> Workload:
    """The DistilBERT-style sequence classifier of seed 002 (T = 128 there), SNLI-style 3 labels."""
    from transformers import DistilBertConfig

    if small:
        config = DistilBertConfig(vocab_size=503, dim=64, n_layers=2, n_heads=4, hidden_dim=256, max_position_embeddings=max(T, 128), num_labels=labels)
    else:
        config = DistilBertConfig(max_position_embeddings=max(T, 512), num_labels=labels)
    case = Case(
        "bert",
        lambda: BertClassifier(config),
        lambda B: (torch.randint(0, config.vocab_size, (B, T)), torch.randint(0, labels, (B,))),
    )
    return Workload(f"bert-T{T}-B{B}", case, B, T)
