"""Named workloads: model, synthetic batch and the loss of each kind of step (benchmarks, profiler, demo).

Each workload has a full size (the seeds' and anchors' configurations, for a GPU) and a small size
(the same architecture scaled down, for a CPU).  Batches are synthetic: random ids, images, targets.

The loss of a step is what its user writes (``StepLoss.call`` is recorded with every measurement):

    nondp          the idiomatic non-private loss: the model's natural mean loss on contiguous
                   logits, ``F.cross_entropy(logits.view(B*T, V), y.view(B*T))``, or a transformers
                   model's own ``labels=`` loss
    opacus_hooks   the same plain loss (Opacus's hooks mode clips per-sample gradients from it)
    opacus_ghost   Opacus's criterion: ``criterion(logits.view(B*T, V), y.view(B*T), shape=(B, T, V))``
                   for tokens, a per-sample criterion (reduction "none" -> [B]) otherwise
    dp             dpkernels' criterion on the logits as the model returns them (the README's call)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..testing import Case
from .dit import DiT, DiTConfig
from .gpt import GPT, GPTConfig

LOSS_KINDS = ("nondp", "opacus_hooks", "opacus_ghost", "dp")


class LinearStack(nn.Module):
    """``layers`` x Linear(d, d) with ReLU between them (the anchors' linear stack).  [B, T, d] -> [B, T, d]."""

    def __init__(self, d: int = 1024, layers: int = 8):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(torch.relu(x))
        return x


class PerSampleLoss(nn.Module):
    """A criterion whose reduction="none" output is one loss per sample [B] (extra dims averaged):
    what Opacus's ghost-clipping criterion needs for a non-token loss such as MSE on [B, T, d]."""

    def __init__(self, criterion_cls, reduction: str = "mean"):
        super().__init__()
        self.inner = criterion_cls(reduction="none")
        self.reduction = reduction

    def forward(self, output, target):
        per_sample = self.inner(output, target)
        if per_sample.dim() > 1:
            per_sample = per_sample.flatten(1).mean(1)
        if self.reduction == "none":
            return per_sample
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()


@dataclass(frozen=True)
class StepLoss:
    """One kind of step's loss: ``fn(model, criterion, batch) -> loss``, where ``criterion`` is what
    make_private returned (None for nondp and Opacus hooks), built from ``criterion`` (a factory,
    passed to make_private); ``call`` is the loss as its user writes it."""

    call: str
    fn: Callable
    criterion: Optional[Callable[[], nn.Module]] = None


def flat(z: torch.Tensor) -> torch.Tensor:
    """[B, T, V] -> [B*T, V] (a view of contiguous logits)."""
    return z.view(-1, z.shape[-1])


def token_losses() -> Dict[str, StepLoss]:
    """Next-token losses of a model returning logits [B, T, V] for targets [B, T] (batch: ids, targets)."""

    def plain(m, c, b):
        return F.cross_entropy(flat(m(*b[:-1])), b[-1].reshape(-1))

    def opacus_ghost(m, c, b):
        z = m(*b[:-1])
        return c(flat(z), b[-1].reshape(-1), shape=z.shape)

    def dp(m, c, b):
        return c(m(*b[:-1]), b[-1])

    calls = StepLoss("F.cross_entropy(logits.view(B*T, V), y.view(B*T))", plain)
    return {
        "nondp": calls,
        "opacus_hooks": calls,
        "opacus_ghost": StepLoss("criterion(logits.view(B*T, V), y.view(B*T), shape=(B, T, V))", opacus_ghost, nn.CrossEntropyLoss),
        "dp": StepLoss("criterion(logits, y)  # logits [B, T, V]", dp, nn.CrossEntropyLoss),
    }


def shifted(labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM targets: labels shifted left by one, the last position ignored (-100)."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def hf_causal_lm_losses() -> Dict[str, StepLoss]:
    """A transformers causal LM on batches (input_ids, labels): its own ``labels=`` loss (next token,
    mean over the B*(T-1) predicted tokens) for non-private training and Opacus hooks; the same
    per-token losses through the criteria otherwise (``shifted`` targets, as the model shifts them)."""

    def own(m, c, b):
        return m(input_ids=b[0], labels=b[1]).loss

    def opacus_ghost(m, c, b):
        z = m(input_ids=b[0]).logits
        return c(flat(z), shifted(b[1]).reshape(-1), shape=z.shape)

    def dp(m, c, b):
        return c(m(input_ids=b[0]).logits, shifted(b[1]))

    shift = "  # shifted = F.pad(labels[:, 1:], (0, 1), value=-100)"
    calls = StepLoss("model(input_ids=ids, labels=labels).loss", own)
    return {
        "nondp": calls,
        "opacus_hooks": calls,
        "opacus_ghost": StepLoss("criterion(logits.view(B*T, V), shifted.view(B*T), shape=(B, T, V))" + shift, opacus_ghost, nn.CrossEntropyLoss),
        "dp": StepLoss("criterion(model(input_ids=ids).logits, shifted)" + shift, dp, nn.CrossEntropyLoss),
    }


def hf_classifier_losses(input_name: str) -> Dict[str, StepLoss]:
    """A transformers classifier on batches (inputs, labels [B]): its own ``labels=`` loss, or the criteria on its logits [B, C]."""
    own = StepLoss(f"model({input_name}=x, labels=y).loss", lambda m, c, b: m(**{input_name: b[0]}, labels=b[1]).loss)
    on_logits = StepLoss(f"criterion(model({input_name}=x).logits, y)", lambda m, c, b: c(m(**{input_name: b[0]}).logits, b[1]), nn.CrossEntropyLoss)
    return {"nondp": own, "opacus_hooks": own, "opacus_ghost": on_logits, "dp": on_logits}


def classifier_losses() -> Dict[str, StepLoss]:
    """A model returning logits [B, C] for labels [B]."""
    plain = StepLoss("F.cross_entropy(logits, y)", lambda m, c, b: F.cross_entropy(m(*b[:-1]), b[-1]))
    on_logits = StepLoss("criterion(logits, y)", lambda m, c, b: c(m(*b[:-1]), b[-1]), nn.CrossEntropyLoss)
    return {"nondp": plain, "opacus_hooks": plain, "opacus_ghost": on_logits, "dp": on_logits}


def regression_losses() -> Dict[str, StepLoss]:
    """A model whose output is regressed on the last batch tensor with MSE (any shape)."""
    plain = StepLoss("F.mse_loss(out, target)", lambda m, c, b: F.mse_loss(m(*b[:-1]), b[-1]))
    return {
        "nondp": plain,
        "opacus_hooks": plain,
        "opacus_ghost": StepLoss("criterion(out, target)  # a per-sample MSE: reduction='none' -> [B]", lambda m, c, b: c(m(*b[:-1]), b[-1]), lambda: PerSampleLoss(nn.MSELoss)),
        "dp": StepLoss("criterion(out, target)", lambda m, c, b: c(m(*b[:-1]), b[-1]), nn.MSELoss),
    }


def case_losses(case: Case) -> Dict[str, StepLoss]:
    """Losses of a plain ``Case``: ``case.criterion`` on ``case.logits_of(model(*inputs))`` in every kind."""
    plain = StepLoss(f"{case.criterion.__name__}()(logits_of(out), y)", lambda m, c, b: case.criterion()(case.logits_of(m(*b[:-1])), b[-1]))
    wrapped = StepLoss("criterion(logits_of(out), y)", lambda m, c, b: c(case.logits_of(m(*b[:-1])), b[-1]), case.criterion)
    ghost = StepLoss("criterion(logits_of(out), y)  # per-sample", wrapped.fn, lambda: PerSampleLoss(case.criterion))
    return {"nondp": plain, "opacus_hooks": plain, "opacus_ghost": ghost, "dp": wrapped}


@dataclass(frozen=True)
class Workload:
    """A named (model, batch, losses): ``case`` builds the model and batch; B and T are recorded for
    reports; ``losses`` (``LOSS_KINDS`` -> StepLoss) default to the case's criterion on its logits;
    ``requires``: packages its model imports when built (e.g. "transformers")."""

    name: str
    case: Case
    B: int
    T: int
    losses: Dict[str, StepLoss] = field(default=None, compare=False)
    requires: Tuple[str, ...] = ()  # packages the model needs (e.g. "transformers")

    def __post_init__(self):
        if self.losses is None:
            object.__setattr__(self, "losses", case_losses(self.case))

    def loss(self, mode: str) -> StepLoss:
        """The StepLoss of a step mode: nondp, opacus_hooks, opacus_ghost, or any dpkernels mode."""
        return self.losses[mode if mode in self.losses else "dp"]


def tokens_case(name: str, build: Callable[[], nn.Module], vocab: int, T: int) -> Case:
    return Case(name, build, lambda B: (torch.randint(0, vocab, (B, T)), torch.randint(0, vocab, (B, T))))


def gpt2(T: int, B: int, small: bool) -> Workload:
    cfg = GPTConfig(vocab=503, d=64, layers=2, heads=4, max_len=T) if small else GPTConfig(max_len=T)
    return Workload(f"gpt2-T{T}-B{B}", tokens_case("gpt2", lambda: GPT(cfg), cfg.vocab, T), B, T, token_losses())


def llama(T: int, B: int, small: bool) -> Workload:
    from .llama import LlamaLM, LlamaSpec

    spec = LlamaSpec(vocab=320, hidden=64, layers=2, heads=4, intermediate=176, max_len=T) if small else LlamaSpec(max_len=T)
    return Workload(f"llama-T{T}-B{B}", tokens_case("llama", lambda: LlamaLM(spec), spec.vocab, T), B, T, token_losses(), ("transformers",))


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
    return Workload(f"llama3-L{spec.layers}-T{T}-B{B}", case, B, T, classifier_losses(), ("transformers",))


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
    return Workload(f"dit-B{B}", case, B, cfg.tokens, regression_losses())


def linear_stack(T: int, B: int, small: bool) -> Workload:
    d = 64 if small else 1024
    case = Case(
        "linear_stack",
        lambda: LinearStack(d),
        lambda B: (torch.randn(B, T, d), torch.randn(B, T, d)),
        criterion=nn.MSELoss,
    )
    return Workload(f"linear-T{T}-B{B}", case, B, T, regression_losses())


# ---- unmodified transformers models (from configs, random weights) --------------------------------------


def hf_llama(T: int, B: int, small: bool) -> Workload:
    """transformers' ``LlamaForCausalLM`` as shipped: d 1024, 8 layers, vocab 32000, untied head
    (issue 13's measurement), trained on its own next-token loss; batches (input_ids, labels)."""
    from .llama import LlamaSpec, llama_config

    spec = LlamaSpec(vocab=320, hidden=64, layers=2, heads=4, intermediate=176, max_len=T) if small else LlamaSpec(vocab=32000, hidden=1024, layers=8, heads=16, intermediate=2816, max_len=T)

    def build():
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(llama_config(spec, use_cache=False))

    return Workload(f"hf-llama-T{T}-B{B}", tokens_case("hf_llama", build, spec.vocab, T), B, T, hf_causal_lm_losses(), ("transformers",))


def hf_gpt2(T: int, B: int, small: bool) -> Workload:
    """transformers' ``GPT2LMHeadModel`` as shipped (Conv1D layers, [1, T] position ids, LM head tied
    to the token embedding): GPT-2 small, or the same scaled down; its own next-token loss."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if small:
        config = GPT2Config(vocab_size=503, n_embd=64, n_layer=2, n_head=4, n_positions=max(T, 128), use_cache=False)
    else:
        config = GPT2Config(n_positions=max(T, 1024), use_cache=False)
    case = tokens_case("hf_gpt2", lambda: GPT2LMHeadModel(config), config.vocab_size, T)
    return Workload(f"hf-gpt2-T{T}-B{B}", case, B, T, hf_causal_lm_losses(), ("transformers",))


def bert(T: int, B: int, small: bool, labels: int = 3) -> Workload:
    """Seed 002's model: transformers' ``DistilBertForSequenceClassification`` as shipped (T = 128
    there), SNLI-style 3 labels, trained on its own ``labels=`` loss."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    if small:
        config = DistilBertConfig(vocab_size=503, dim=64, n_layers=2, n_heads=4, hidden_dim=256, max_position_embeddings=max(T, 128), num_labels=labels)
    else:
        config = DistilBertConfig(max_position_embeddings=max(T, 512), num_labels=labels)
    case = Case(
        "bert",
        lambda: DistilBertForSequenceClassification(config),
        lambda B: (torch.randint(0, config.vocab_size, (B, T)), torch.randint(0, labels, (B,))),
    )
    return Workload(f"bert-T{T}-B{B}", case, B, T, hf_classifier_losses("input_ids"), ("transformers",))


def vit(B: int, small: bool, labels: int = 10) -> Workload:
    """transformers' ``ViTForImageClassification`` as shipped (ViT-B/16 at 224x224: 197 tokens, or the
    same scaled down), 10 labels, trained on its own ``labels=`` loss."""
    from transformers import ViTConfig, ViTForImageClassification

    if small:
        config = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=labels)
    else:
        config = ViTConfig(image_size=224, patch_size=16, num_labels=labels)
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    case = Case(
        "vit",
        lambda: ViTForImageClassification(config),
        lambda B: (torch.randn(B, config.num_channels, config.image_size, config.image_size), torch.randint(0, labels, (B,))),
    )
    return Workload(f"vit-B{B}", case, B, tokens, hf_classifier_losses("pixel_values"), ("transformers",))


# The step-level configurations of the benchmark issues: (builder, full (T, B), small (T, B) for a CPU).
STEP_CONFIGS = (
    (gpt2, (1024, 16), (64, 4)),
    (gpt2, (4096, 4), (128, 2)),
    (llama, (16384, 1), (128, 1)),
    (llama, (16384, 2), (128, 2)),
    (linear_stack, (4096, 4), (128, 4)),
    (linear_stack, (16384, 1), (256, 1)),
    (hf_llama, (1024, 8), (64, 2)),
)


def step_workloads(small: bool) -> Tuple[Workload, ...]:
    """The step-level configurations (small: the same architectures and shapes scaled down), and DiT-L at B=2."""
    sized = tuple(build(*(small_TB if small else full_TB), small) for build, full_TB, small_TB in STEP_CONFIGS)
    return sized + (dit(2, small),)
