"""The profiler's experiment matrix: the models, the presets, and one spec per (model, T, B, mode).

A spec is a JSON-able dict: ``experiment`` (its name, ``<model>_T<T>_B<B>_<mode>``), ``group``, ``mode``,
``model``, ``seq_len`` (None for image models), ``batch``, ``sharded``, ``gpus`` and the run's settings
(size, steps, warmup, grad_accum, optimizer, amp, device, threads, layers).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..models import workloads
from . import step

# gpt, llama, llama3, dit, linear: the project's models (llama/llama3 from transformers configs);
# hf_gpt2 (GPT2LMHeadModel, tied head), hf_llama (LlamaForCausalLM), bert (DistilBertForSequenceClassification),
# vit (ViTForImageClassification): transformers models as shipped, trained on their own labels= loss
MODELS = ("gpt", "llama", "llama3", "bert", "dit", "linear", "hf_gpt2", "hf_llama", "vit")
TRANSFORMERS_MODELS = ("llama", "llama3", "bert", "hf_gpt2", "hf_llama", "vit")  # need the `models` extra
NO_SEQ = ("dit", "vit")  # image models: the token count follows from the image and patch sizes
ALIASES = {"hooks": "opacus_hooks", "vanilla": "nondp"}
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SEQ = {"small": (64, 128), "full": (1024, 2048, 4096)}
DEFAULT_BATCH = {"small": (4,), "full": (8,)}
BERT_SEQ = 128  # seed 002's DistilBERT sequence length

PRESETS: Dict[str, dict] = {
    "seed000": {
        "help": "seed 000: GPT-2-size decoder at T=8192, non-private vs Opacus ghost vs our ghost, flash, bk",
        "models": ["gpt"], "seq": [8192], "batch": [2], "modes": ["nondp", "opacus_ghost", "ghost", "flash", "bk", "flash_bk"],
    },
    "seed002": {
        "help": "seed 002: transformers DistilBertForSequenceClassification as shipped, T=128, B=32, 4 micro-batches per step (step vs run peak)",
        "models": ["bert"], "seq": [128], "batch": [32], "grad_accum": 4, "steps": 5,
        "modes": ["nondp", "opacus_hooks", "opacus_ghost", "ghost", "bk"],
    },
    "dit-l": {
        "help": "seed 003: DiT-L (256x256 images, patch 8: 1024 tokens, d=1024, 24 layers), B=2, 3 steps",
        "models": ["dit"], "batch": [2], "steps": 3, "warmup": 0, "modes": ["nondp", "ghost", "flash", "bk", "flash_bk"],
    },
    "llama-fsdp": {
        "help": "seed 004: Llama-3-8B-shaped classifier, FSDP2 on 2 GPUs, bf16 mixed precision, T=1024/2048/4096, B=2 per GPU",
        "models": ["llama3"], "seq": [1024, 2048, 4096], "batch": [2], "amp": "bf16", "gpus": 2,
        "modes": ["nondp", "ghost_fsdp", "flash_fsdp", "flash_bk_fsdp"],
        "min_gpus": 2, "required_modes": ["ghost_fsdp", "flash_fsdp", "flash_bk_fsdp"],
    },
}


def available_modes() -> tuple:
    """Every mode a Trainer accepts (read at run time: new dpkernels modes appear here by themselves)."""
    return step.STEP_MODES + tuple(m for m in step.SHARDED_MODES if m not in step.STEP_MODES)


def is_fsdp(mode: str) -> bool:
    return mode in step.SHARDED_MODES and mode != "nondp"


def seq_lengths(model: str, settings: dict) -> List[Optional[int]]:
    """dit and vit have no sequence length of their own choosing (their token count follows from the image)."""
    if model in NO_SEQ:
        return [None]
    if settings["seq"]:
        return list(settings["seq"])
    return [BERT_SEQ] if model == "bert" else list(DEFAULT_SEQ[settings["size"]])


def experiment_specs(settings: dict) -> List[dict]:
    """One spec per (model, T, B, mode), in that nesting order."""
    keys = ("size", "steps", "warmup", "grad_accum", "optimizer", "amp", "device", "threads", "layers")
    # an FSDP2 comparison (several GPUs, or a *_fsdp mode) runs its nondp baseline sharded as well
    fsdp_run = settings["gpus"] > 1 or any(is_fsdp(m) for m in settings["modes"])
    specs = []
    for model in settings["models"]:
        for T in seq_lengths(model, settings):
            for B in settings["batch"]:
                for mode in settings["modes"]:
                    group = f"{model}_B{B}" if T is None else f"{model}_T{T}_B{B}"
                    sharded = fsdp_run and mode in step.SHARDED_MODES
                    specs.append({"experiment": f"{group}_{mode}", "group": group, "mode": mode, "model": model,
                                  "seq_len": T, "batch": B, "sharded": sharded, "gpus": settings["gpus"] if sharded else 1,
                                  **{k: settings[k] for k in keys}})
    return specs


def workload_of(spec: dict):
    small, T, B = spec["size"] == "small", spec["seq_len"], spec["batch"]
    if spec["model"] in NO_SEQ:
        return {"dit": workloads.dit, "vit": workloads.vit}[spec["model"]](B, small)
    if spec["model"] == "llama3":
        return workloads.llama3(T, B, small, spec["layers"])
    build = {"gpt": workloads.gpt2, "llama": workloads.llama, "bert": workloads.bert, "linear": workloads.linear_stack,
             "hf_gpt2": workloads.hf_gpt2, "hf_llama": workloads.hf_llama}
    return build[spec["model"]](T, B, small)
