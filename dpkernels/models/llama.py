"""Llama-style models from a ``transformers`` config with random weights (no download).

``transformers`` is optional: importing this module imports it.

  LlamaLM          input ids [B, T] -> logits [B, T, vocab]   (the model's own loss head is not used)
  LlamaClassifier  input ids [B, T] -> logits [B, labels]     (seed 004: sequence classification,
                   the logits of each sequence's last token)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LlamaSpec:
    """kv_heads None: as many key/value heads as query heads (no grouped-query attention)."""

    vocab: int = 32000
    hidden: int = 2048
    layers: int = 20
    heads: int = 16
    intermediate: int = 5632
    max_len: int = 16384
    kv_heads: int | None = None
    rope_theta: float = 10000.0


# Llama-3-8B's shape (meta-llama/Llama-3.1-8B-Instruct's config.json), the model of seed 004
LLAMA3_8B = LlamaSpec(vocab=128256, hidden=4096, layers=32, heads=32, intermediate=14336, max_len=8192, kv_heads=8, rope_theta=500000.0)


def llama_config(spec: LlamaSpec, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads or spec.heads,
        max_position_embeddings=spec.max_len,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        **extra,
    )


class LlamaLM(nn.Module):
    """transformers' LlamaForCausalLM returning plain logits."""

    def __init__(self, spec: LlamaSpec):
        super().__init__()
        from transformers import LlamaForCausalLM

        self.lm = LlamaForCausalLM(llama_config(spec))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


class LlamaClassifier(nn.Module):
    """transformers' LlamaForSequenceClassification returning plain logits [B, labels].

    Token 0 is the padding token (the head reads each sequence's last non-padding token): batches
    should draw ids from [1, vocab).
    """

    def __init__(self, spec: LlamaSpec, labels: int = 3):
        super().__init__()
        from transformers import LlamaForSequenceClassification

        self.lm = LlamaForSequenceClassification(llama_config(spec, num_labels=labels, pad_token_id=0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits
