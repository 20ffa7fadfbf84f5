"""The DP optimizer's parameter set: in every param group, every parameter that steps gets the noise
N(0, (sigma C)^2) and its reduction's division by B, or the step is refused with an error naming
it; no parameter is ever stepped without noise.

Noise statistics.  The loss is the output times 0, so every clipped gradient is exactly 0 and a
group's update divided by its learning rate is the noise alone: n = 10,100 coordinates of
N(0, s^2) per group (one Linear(100, 100)), s = sigma C / B (mean) or sigma C (sum).  The sample
standard deviation has a relative standard error of 1/sqrt(2 n) = 0.70%; the +-5% band is 7.1
standard errors wide, so a correct optimizer fails one group's check with probability < 2e-12
(and the seeds are fixed, so a run repeats).  A group without noise (std 0), noise sigma C B, a
missing or doubled division by B, all land far outside the band.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpkernels import SINGLE_PROCESS_MODES
from dpkernels.errors import UnsupportedModuleError
from dpkernels.optimizer import UnclippedParameterError
from dpkernels.testing import Case, make_private

SIGMA, C, B, WIDTH = 1.3, 0.7, 8, 100
BAND = 0.05


def zero_gradient_case(layers: int) -> Case:
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    return Case("zero-gradient", lambda: model, lambda n: (torch.randn(n, WIDTH), torch.zeros(n, WIDTH)), criterion=nn.MSELoss)


def private(case: Case, groups, reduction: str, mode: str, **sgd):
    """make_private with SGD over ``groups`` (a list of param-group dicts)."""
    model, batch = case.build(), case.batch(B)
    optimizer = torch.optim.SGD(groups(model), lr=1.0, **sgd)
    dp_model, dp_optimizer, criterion, _ = make_private(model, batch, case, mode, C, reduction, noise=SIGMA, optimizer=optimizer)
    return model, batch, dp_model, dp_optimizer, criterion


def step(dp_model, dp_optimizer, criterion, batch):
    x, y = batch
    criterion(dp_model(x) * 0, y).backward()  # every per-sample gradient is 0: the update is the noise
    dp_optimizer.step()
    dp_optimizer.zero_grad()


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_noise(name: str, update: torch.Tensor, lr: float, reduction: str) -> None:
    """update / lr has the standard deviation sigma C (/ B under mean reduction), to +-5%."""
    expected = SIGMA * C / (B if reduction == "mean" else 1)
    std = (update / lr).std().item()
    assert abs(std / expected - 1) < BAND, f"{name}: noise std {std:.4g}, expected sigma C{' / B' if reduction == 'mean' else ''} = {expected:.4g}"


def layer_update(before, model, i: int) -> torch.Tensor:
    after = snapshot(model)
    return torch.cat([(before[f"{i}.{k}"] - after[f"{i}.{k}"]).flatten() for k in ("weight", "bias")])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
def test_every_param_group_gets_its_noise_and_division(mode, reduction):
    """Groups with learning rates 1, 0.25, 0.5 and a frozen group: each trainable group's update is
    lr * N(0, (sigma C / B)^2); the frozen group does not move."""
    case = zero_gradient_case(4)
    lrs = (1.0, 0.25, 0.5)
    case.build()[3].requires_grad_(False)
    groups = lambda m: [{"params": m[i].parameters(), "lr": lr} for i, lr in enumerate(lrs)] + [{"params": m[3].parameters()}]
    model, batch, dp_model, optimizer, criterion = private(case, groups, reduction, mode)
    before = snapshot(model)
    step(dp_model, optimizer, criterion, batch)
    for i, lr in enumerate(lrs):
        assert_noise(f"group {i} (lr {lr})", layer_update(before, model, i), lr, reduction)
    assert torch.equal(layer_update(before, model, 3), torch.zeros(WIDTH * WIDTH + WIDTH))


@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
def test_a_parameter_frozen_after_make_private_is_not_stepped(mode):
    """Frozen between steps: momentum and weight decay would move it (Opacus leaves it a zero gradient
    the wrapped SGD steps); it stays put while the other group keeps getting noise."""
    case = zero_gradient_case(2)
    groups = lambda m: [{"params": m[0].parameters()}, {"params": m[1].parameters(), "lr": 0.5}]
    model, batch, dp_model, optimizer, criterion = private(case, groups, "mean", mode, momentum=0.9, weight_decay=0.1)
    step(dp_model, optimizer, criterion, batch)
    model[1].requires_grad_(False)
    before = snapshot(model)
    step(dp_model, optimizer, criterion, batch)
    assert torch.equal(layer_update(before, model, 1), torch.zeros(WIDTH * WIDTH + WIDTH))
    assert layer_update(before, model, 0).abs().min() > 0
    model[1].requires_grad_(True)  # trainable at make_private: clipped, so it may step again
    before = snapshot(model)
    step(dp_model, optimizer, criterion, batch)
    assert layer_update(before, model, 1).abs().min() > 0


@pytest.mark.parametrize("what", ["layer", "bias"])
@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
def test_a_parameter_unfrozen_after_make_private_is_refused(mode, what):
    """Frozen at make_private (a whole layer, or one bias of a trained layer), unfrozen before a step:
    its per-sample gradients are not clipped; the step is refused, naming it, and nothing moves."""
    case = zero_gradient_case(2)
    frozen = case.build()[1] if what == "layer" else case.build()[1].bias
    frozen.requires_grad_(False)
    model, batch, dp_model, optimizer, criterion = private(case, lambda m: m.parameters(), "mean", mode)
    frozen.requires_grad_(True)
    before = snapshot(model)
    x, y = batch
    if what == "layer":  # no call of the layer was recorded: refused at backward, before any gradient is kept
        with pytest.raises(UnsupportedModuleError, match=r"\['1\.weight', '1\.bias'\] received gradients outside every recorded layer call \(frozen when make_private"):
            criterion(dp_model(x), y).backward()
    else:  # the layer is recorded, its bias was not clipped: refused at the step
        criterion(dp_model(x), y).backward()
        with pytest.raises(UnclippedParameterError, match=r"would step 1\.bias \(param_groups\[0\]\['params'\]\[3\]\), whose"):
            optimizer.step()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
def test_add_param_group_of_a_parameter_the_model_clips(mode):
    """The optimizer starts with one layer; after make_private the other joins with its own learning
    rate: both groups get their noise (the model clipped the second layer all along)."""
    case = zero_gradient_case(2)
    model, batch, dp_model, optimizer, criterion = private(case, lambda m: m[0].parameters(), "mean", mode)
    optimizer.add_param_group({"params": model[1].parameters(), "lr": 0.25})
    before = snapshot(model)
    step(dp_model, optimizer, criterion, batch)
    assert_noise("group 0", layer_update(before, model, 0), 1.0, "mean")
    assert_noise("added group 1", layer_update(before, model, 1), 0.25, "mean")


@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
def test_add_param_group_of_a_parameter_outside_the_model_is_refused(mode):
    case = zero_gradient_case(1)
    model, batch, dp_model, optimizer, criterion = private(case, lambda m: m.parameters(), "mean", mode)
    outside = nn.Parameter(torch.zeros(3))
    optimizer.add_param_group({"params": [outside]})
    x, y = batch
    criterion(dp_model(x), y).backward()
    outside.grad = torch.ones(3)
    with pytest.raises(UnclippedParameterError, match=r"a parameter not in the model \(param_groups\[1\]\['params'\]\[0\]\)"):
        optimizer.step()
    assert torch.equal(outside, torch.zeros(3))
