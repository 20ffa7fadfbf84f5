"""A Llama-style causal LM from a ``transformers`` config with random weights (no download).

``transformers`` is optional: importing this module imports it.
Input ids [B, T] -> logits [B, T, vocab] (the model's own loss head is not used).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LlamaSpec:
    vocab: int = 32000
    hidden: int = 2048
    layers: int = 20
    heads: int = 16
    intermediate: int = 5632
    max_len: int = 16384


class LlamaLM(nn.Module):
    """transformers' LlamaForCausalLM returning plain logits."""

    def __init__(self, spec: LlamaSpec):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=spec.vocab,
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.heads,
            max_position_embeddings=spec.max_len,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
        self.lm = LlamaForCausalLM(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits
