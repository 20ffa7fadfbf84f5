"""The workloads of the benchmarks and the profiler: each kind of step computes the loss its user
writes, and all of them compute the same objective.

nondp and Opacus hooks: the idiomatic non-private loss (contiguous [B*T, V] logits, or a
transformers model's own labels= loss); Opacus ghost: Opacus's criterion call (shape= for tokens);
dpkernels modes: the README's criterion call on the logits the model returns.  No step runs a
cross-entropy over transposed logits.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

from dpkernels.clipping import DPCriterion
from dpkernels.models import workloads
from dpkernels.profiling.step import STEP_MODES, Trainer, pass_times

pytest.importorskip("transformers")

SMALL = {
    "gpt2": lambda: workloads.gpt2(11, 3, True),
    "linear": lambda: workloads.linear_stack(5, 3, True),
    "dit": lambda: workloads.dit(3, True),
    "llama3": lambda: workloads.llama3(6, 3, True),
    "hf_llama": lambda: workloads.hf_llama(7, 3, True),
    "hf_gpt2": lambda: workloads.hf_gpt2(7, 3, True),
    "bert": lambda: workloads.bert(7, 3, True),
    "vit": lambda: workloads.vit(3, True),
}


def wrapped(kind: str, loss):
    """The criterion a step of ``kind`` gets from make_private, built without a model (values only)."""
    criterion = loss.criterion()
    if kind == "dp":
        return DPCriterion(types.SimpleNamespace(), criterion, "mean", None)
    holder = types.SimpleNamespace(loss_reduction="mean")
    return DPLossFastGradientClipping(holder, holder, criterion, "mean")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_kind_of_step_computes_the_same_loss(name):
    """nondp's mean loss == Opacus ghost's and dpkernels' mean of per-sample losses, same model and batch."""
    workload = SMALL[name]()
    torch.manual_seed(0)
    model = workload.case.build().eval()  # dropout off: every kind sees the same function
    batch = workload.case.batch(workload.B)
    values = {}
    for kind in workloads.LOSS_KINDS:
        loss = workload.losses[kind]
        criterion = wrapped(kind, loss) if loss.criterion else None
        with torch.no_grad():
            values[kind] = float(loss.fn(model, criterion, batch).detach())
        assert "transpose" not in loss.call
    assert values["nondp"] == values["opacus_hooks"]
    for kind in ("opacus_ghost", "dp"):
        assert values[kind] == pytest.approx(values["nondp"], rel=1e-5), kind


def test_loss_calls_are_the_idiomatic_ones():
    gpt, hf, vit = workloads.gpt2(8, 2, True), workloads.hf_llama(8, 2, True), workloads.vit(2, True)
    assert gpt.loss("nondp").call == "F.cross_entropy(logits.view(B*T, V), y.view(B*T))"
    assert gpt.loss("bk").call.startswith("criterion(logits, y)") and gpt.loss("flash").call == gpt.loss("ghost").call
    assert gpt.loss("opacus_ghost").call == "criterion(logits.view(B*T, V), y.view(B*T), shape=(B, T, V))"
    assert hf.loss("nondp").call == "model(input_ids=ids, labels=labels).loss" == hf.loss("opacus_hooks").call
    assert vit.loss("nondp").call == "model(pixel_values=x, labels=y).loss"


@pytest.mark.parametrize("name", ["hf_gpt2", "bert", "vit", "hf_llama"])
def test_transformers_models_train_without_dp(name):
    """The unmodified transformers models take a non-private step (every trainable parameter moves);
    the Trainer records the loss call."""
    trainer = Trainer(SMALL[name](), "nondp", torch.device("cpu"))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.step()
    assert trainer.loss_call.endswith("labels=y).loss") or trainer.loss_call.endswith("labels=labels).loss")
    moved = [not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters())]
    assert all(moved), f"{moved.count(False)} parameters did not move"


@pytest.mark.parametrize("mode", ["opacus_hooks", "opacus_ghost"])
@pytest.mark.parametrize("name", ["vit", "hf_llama"])
def test_transformers_models_train_in_opacus_modes(name, mode):
    """Opacus's modes run ViT and the Llama causal LM as shipped (GPT-2's and DistilBERT's [1, T]
    position embeddings make Opacus itself fail: not ours to fix)."""
    trainer = Trainer(SMALL[name](), mode, torch.device("cpu"))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))


def test_profiler_knows_the_transformers_models_and_seed_002_is_real_distilbert():
    from dpkernels.profiling import experiments

    assert {"hf_gpt2", "hf_llama", "bert", "vit"} <= set(experiments.MODELS)
    spec = {"size": "small", "seq_len": 8, "batch": 2}
    assert type(experiments.workload_of({**spec, "model": "bert"}).case.build()).__name__ == "DistilBertForSequenceClassification"
    assert type(experiments.workload_of({**spec, "model": "hf_gpt2"}).case.build()).__name__ == "GPT2LMHeadModel"
    assert type(experiments.workload_of({**spec, "model": "vit", "seq_len": None}).case.build()).__name__ == "ViTForImageClassification"
    assert experiments.PRESETS["seed002"]["models"] == ["bert"]


def test_two_pass_floor_is_measured_per_pass():
    times = pass_times(Trainer(SMALL["linear"](), "nondp", torch.device("cpu")), 2)
    assert 0 < times["input_backward"] and 0 < times["forward"] and 0 < times["backward"]
    expected = (times["forward"] + times["input_backward"] + times["backward"]) / (times["forward"] + times["backward"])
    assert times["two_pass_floor"] == pytest.approx(expected)
    with_norms = (times["forward"] + 2 * times["backward"]) / (times["forward"] + times["backward"])
    assert times["two_backward_floor"] == pytest.approx(with_norms)


def backward_flops(trainer) -> int:
    """FLOPs of one backward pass of the trainer's loss."""
    from torch.utils.flop_counter import FlopCounterMode

    loss = trainer.forward_loss()
    with FlopCounterMode(display=False) as flops:
        loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return flops.get_total_flops()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the first layers' inputs need no gradient
def test_input_gradient_pass_reaches_every_layer_and_forms_no_weight_gradient():
    from dpkernels.profiling.step import input_gradients_only

    trainer = Trainer(SMALL["gpt2"](), "nondp", torch.device("cpu"))
    layers = [m for m in trainer.model.modules() if any(True for _ in m.parameters(recurse=False))]
    reached = set()
    hooks = [m.register_full_backward_hook(lambda m, gi, go: reached.add(m)) for m in layers]
    with input_gradients_only(trainer.model):
        trainer.forward_loss().backward()
    for h in hooks:
        h.remove()
    assert reached == set(layers)
    assert all(p.grad is None and p.requires_grad for p in trainer.model.parameters())


def test_input_gradient_pass_is_the_backward_without_weight_gradients():
    """8 x Linear(d, d) on data: a full backward is 8 weight-gradient GEMMs and 7 input-gradient ones
    (the first layer's input needs none); the input-gradient pass is the 7 alone, and holds no more
    memory than the full backward (not every layer output's gradient at once)."""
    from dpkernels.profiling.memory import peak_memory
    from dpkernels.profiling.step import input_gradients_only

    trainer = Trainer(SMALL["linear"](), "nondp", torch.device("cpu"))
    full = backward_flops(trainer)
    with input_gradients_only(trainer.model):
        assert backward_flops(trainer) * 15 == full * 7
    peaks = []
    for only_inputs in (False, True):
        with input_gradients_only(trainer.model) if only_inputs else contextlib.nullcontext():
            out = trainer.forward_loss()
            with peak_memory(torch.device("cpu")) as mem:
                out.backward()
            del out
        trainer.optimizer.zero_grad(set_to_none=True)
        peaks.append(mem["peak_bytes"])
    assert 0 < peaks[1] <= peaks[0]


def test_step_modes_cover_nondp_opacus_and_dpkernels():
    assert {"nondp", "opacus_hooks", "opacus_ghost", "ghost", "bk"} <= set(STEP_MODES)
    workload = SMALL["gpt2"]()
    assert {workload.loss(m).call for m in STEP_MODES} == {s.call for s in workload.losses.values()}
