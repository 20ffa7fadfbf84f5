"""Real models as users bring them: unmodified ``transformers``, ``timm``, ``torchvision`` and ``peft``
models, built from tiny configs with random weights, train exactly in every single-process mode.

Each case is one DP step (noise 0, SGD lr 1) compared with the float64 per-sample oracle
(``dpkernels.reference``) on EVERY trainable parameter, with a clip norm (the median per-sample norm)
that binds for some samples only.  float64 at 1e-10 where the model computes in float64; float32 at
1e-5 everywhere (``transformers``' RMSNorms normalise in float32 whatever the model dtype, so those
models have no float64-exact gradient).  Nothing is passed to a model that its users would not pass:
no hand-made position ids, no swapped layers.

Packages that are absent skip with the reason.  The cases that need timm or torchvision carry the
``vision`` marker: CI runs them in a second environment with ``pip install .[test,vision]``
(``pytest tests/test_real_models.py -m vision``), since torchvision needs the torch build it was made for.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

from dpkernels import SINGLE_PROCESS_MODES
from dpkernels.testing import Case, assert_rel_close, dp_update, oracle_update, total_norm

VOCAB = 61
B = 4
T = 8


def need(module: str):
    """Import ``module`` or skip the test with the reason (the extra that installs it)."""
    extra = "vision" if module in ("timm", "torchvision") else "test"
    try:
        return __import__(module)
    except ImportError as e:  # torchvision may be present but not load beside this torch build
        pytest.skip(f"{module} is not importable here ({e}); pip install '.[{extra}]'")


def ids(B_: int, T_: int, low: int = 1) -> torch.Tensor:
    """Token ids in [low, VOCAB): id 0 is kept for padding where a model needs a pad token."""
    return torch.randint(low, VOCAB, (B_, T_))


def labels(B_: int, classes: int = 3) -> torch.Tensor:
    return torch.randint(0, classes, (B_,))


def logits(out) -> torch.Tensor:
    """A transformers model output's classification logits [B, classes]."""
    return out.logits


def token_logits(out) -> torch.Tensor:
    """A transformers LM output's logits [B, T, V] as [B, V, T] (class dimension 1)."""
    return out.logits.transpose(1, 2)


# ---- transformers ---------------------------------------------------------------------------------


def gpt2_config(**kw):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, **kw)


def gpt2_cls():
    from transformers import GPT2ForSequenceClassification

    return GPT2ForSequenceClassification(gpt2_config(num_labels=3))


def gpt2_lm_tied():
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(gpt2_config())
    assert model.lm_head.weight is model.transformer.wte.weight, "the case is about a tied LM head"
    return model


def bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def distilbert_cls():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(
        vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=3,
    )
    return DistilBertForSequenceClassification(config)


def roberta_cls():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=T + 4, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1,
    )
    return RobertaForSequenceClassification(config)


def llama_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, pad_token_id=0, **kw,
    )


def llama_cls():
    from transformers import LlamaForSequenceClassification

    return LlamaForSequenceClassification(llama_config(num_labels=3))


def llama_lm_tied():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight, "the case is about a tied LM head"
    return model


def t5_config():
    from transformers import T5Config

    return T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0, feed_forward_proj="relu",
        decoder_start_token_id=0, pad_token_id=0,
    )


class T5EncoderClassifier(nn.Module):
    """A user's classifier over an unmodified T5EncoderModel: mean of the last hidden states -> Linear."""

    def __init__(self):
        super().__init__()
        from transformers import T5EncoderModel

        self.encoder = T5EncoderModel(t5_config())
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids):
        return self.head(self.encoder(input_ids=input_ids).last_hidden_state.mean(1))


def t5_seq2seq():
    from transformers import T5ForConditionalGeneration

    return T5ForConditionalGeneration(t5_config())


def vit_hf():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


def lora(model, targets):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0))


def lora_gpt2_lm():
    from transformers import GPT2LMHeadModel

    return lora(GPT2LMHeadModel(gpt2_config()), ["c_attn"])


def lora_llama_lm():
    from transformers import LlamaForCausalLM

    return lora(LlamaForCausalLM(llama_config()), ["q_proj", "v_proj"])


# ---- timm, torchvision, torch -----------------------------------------------------------------------


def timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=3)


def timm_vit_wrapped():
    return nn.Sequential(timm_vit())


def group_norm(model):
    """BatchNorm -> GroupNorm, as Opacus's tutorial does (``ModuleValidator.fix``)."""
    from opacus.validators import ModuleValidator

    return ModuleValidator.fix(model)


def timm_resnet18_gn():
    import timm

    return group_norm(timm.create_model("resnet18", pretrained=False, num_classes=3))


def tv_resnet18_gn():
    from torchvision.models import resnet18

    return group_norm(resnet18(num_classes=3))


class EncoderLayerClassifier(nn.Module):
    """Embedding -> nn.TransformerEncoderLayer (nn.MultiheadAttention, sequence-first as by default) -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids):
        h = self.layer(self.emb(input_ids).transpose(0, 1))  # [T, B, d]
        return self.head(h.mean(0))


@dataclass(frozen=True)
class RealCase:
    """A model zoo entry: the Case (build, batch, loss), the packages it needs, its batch size, and
    the dtypes it is checked in: float32 only where the model casts to float32 inside (no float64-exact
    gradient), float64 only for the ResNets (11 M parameters: one float64 oracle is what CI can afford,
    and the float32 rounding of a plain per-sample loop of that depth is itself about 1e-5)."""

    case: Case
    packages: tuple = ("transformers",)
    batch_size: int = B
    dtypes: tuple = (torch.float64, torch.float32)


def image(B_: int, size: int = 8) -> torch.Tensor:
    return torch.randn(B_, 3, size, size)


def seq2seq_batch(B_: int):
    return ids(B_, T), torch.ones(B_, T, dtype=torch.long), ids(B_, 5), ids(B_, 5)


F32, F64 = (torch.float32,), (torch.float64,)
CASES = [
    RealCase(Case("gpt2_cls", gpt2_cls, lambda n: (ids(n, T), labels(n)), logits_of=logits)),
    RealCase(Case("gpt2_lm_tied", gpt2_lm_tied, lambda n: (ids(n, T), ids(n, T)), logits_of=token_logits)),
    RealCase(Case("bert_cls", bert_cls, lambda n: (ids(n, T), labels(n)), logits_of=logits)),
    RealCase(Case("distilbert_cls", distilbert_cls, lambda n: (ids(n, T), labels(n)), logits_of=logits)),
    RealCase(Case("roberta_cls", roberta_cls, lambda n: (ids(n, T, low=2), labels(n)), logits_of=logits)),
    RealCase(Case("llama_cls", llama_cls, lambda n: (ids(n, T), labels(n)), logits_of=logits), dtypes=F32),
    RealCase(Case("llama_lm_tied", llama_lm_tied, lambda n: (ids(n, T), ids(n, T)), logits_of=token_logits), dtypes=F32),
    RealCase(Case("t5_encoder_cls", T5EncoderClassifier, lambda n: (ids(n, T), labels(n))), dtypes=F32),
    # T == B: the relative-attention-bias Embedding gets bucket ids [T, T] with no batch dimension
    RealCase(Case("t5_encoder_cls_T=B", T5EncoderClassifier, lambda n: (ids(n, n), labels(n))), dtypes=F32),
    RealCase(Case("t5_seq2seq", t5_seq2seq, seq2seq_batch, logits_of=token_logits), dtypes=F32),
    RealCase(Case("vit_hf", vit_hf, lambda n: (image(n), labels(n)), logits_of=logits)),
    RealCase(Case("lora_gpt2_lm", lora_gpt2_lm, lambda n: (ids(n, T), ids(n, T)), logits_of=token_logits), packages=("transformers", "peft")),
    RealCase(Case("lora_llama_lm", lora_llama_lm, lambda n: (ids(n, T), ids(n, T)), logits_of=token_logits), packages=("transformers", "peft"), dtypes=F32),
    RealCase(Case("timm_vit", timm_vit, lambda n: (image(n), labels(n))), packages=("timm",)),
    RealCase(Case("timm_vit_wrapped", timm_vit_wrapped, lambda n: (image(n), labels(n))), packages=("timm",)),
    RealCase(Case("timm_resnet18_gn", timm_resnet18_gn, lambda n: (image(n, 16), labels(n))), packages=("timm",), dtypes=F64),
    RealCase(Case("tv_resnet18_gn", tv_resnet18_gn, lambda n: (image(n, 16), labels(n))), packages=("torchvision",), dtypes=F64),
    RealCase(Case("torch_encoder_layer", EncoderLayerClassifier, lambda n: (ids(n, T), labels(n))), packages=()),
]

PARAMS = [
    pytest.param(
        rc,
        dtype,
        id=f"{rc.case.name}-{str(dtype).removeprefix('torch.')}",
        marks=[pytest.mark.vision] if {"timm", "torchvision"} & set(rc.packages) else [],
    )
    for rc in CASES
    for dtype in rc.dtypes
]


@functools.lru_cache(maxsize=None)
def oracle(name: str, dtype: torch.dtype):
    """(model, batch, clip norm, expected update, per-sample norms) of a case: built once per dtype."""
    rc = next(rc for rc in CASES if rc.case.name == name)
    torch.manual_seed(0)
    model = rc.case.build().to(dtype)
    batch = tuple(t.to(dtype) if t.is_floating_point() else t for t in rc.case.batch(rc.batch_size))
    C, expected, norms = oracle_update(model, batch, rc.case, "mean")
    return model, batch, C, expected, norms


@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
@pytest.mark.parametrize("rc, dtype", PARAMS)
def test_real_model_update_equals_oracle(rc: RealCase, dtype, mode):
    for package in rc.packages:
        need(package)
    model, batch, C, expected, norms = oracle(rc.case.name, dtype)
    n = batch[0].shape[0]
    assert 0 < int((norms > C).sum()) < n, "the clip norm must bind for some samples and not others"

    got = dp_update(model, batch, rc.case, mode, C, "mean")

    assert got.keys() == expected.keys()
    whole = total_norm(expected.values())
    for name in expected:
        assert_rel_close(f"{rc.case.name}/{mode}/{name}", got[name], expected[name], dtype, scale=whole)
