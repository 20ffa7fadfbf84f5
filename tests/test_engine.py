"""dpkernels.PrivacyEngine as an Opacus user drives it: shapes of make_private, a training step,
gradient accumulation, errors that name the layer, noise and accounting left to Opacus."""

from __future__ import annotations

import copy
import io

import opacus
import pytest
import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn

from dpkernels import MODES, SINGLE_PROCESS_MODES, PrivacyEngine
from dpkernels.clipping import DPClippingModule, DPCriterion
from dpkernels.errors import CriterionError, LayerInputError, NonFiniteNormError, TiedParameterError, UnsupportedModuleError
from dpkernels.models import MLP
from dpkernels.testing import Case, assert_rel_close, dp_update, make_private, oracle_update, total_norm

MODE_NAMES = SINGLE_PROCESS_MODES
MLP_CASE = Case("mlp", MLP, lambda B: (torch.randn(B, 12), torch.randint(0, 5, (B,))))


def mlp_batch(B, dtype=torch.float32):
    return torch.randn(B, 12, dtype=dtype), torch.randint(0, 5, (B,))


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_make_private_returns_model_optimizer_criterion_loader(mode):
    model = MLP()
    dp_model, optimizer, criterion, loader = make_private(model, mlp_batch(4), MLP_CASE, mode, 1.0, "mean")
    assert isinstance(dp_model, DPClippingModule)
    assert isinstance(optimizer, DPOptimizerFastGradientClipping)
    assert isinstance(criterion, DPCriterion)
    assert isinstance(loader, torch.utils.data.DataLoader)


def test_opacus_modes_still_go_to_opacus():
    result = make_private(MLP(), mlp_batch(4), MLP_CASE, "hooks", 1.0, "mean")
    assert len(result) == 3
    assert isinstance(result[0], opacus.GradSampleModule)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_every_trainable_parameter_steps_and_the_optimizer_holds_them(mode):
    model = MLP()
    model.fc1.bias.requires_grad_(False)
    dp_model, optimizer, criterion, _ = make_private(model, mlp_batch(4), MLP_CASE, mode, 1.0, "mean", noise=1.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    before = [p.detach().clone() for p in model.parameters()]
    x, y = mlp_batch(4)
    criterion(dp_model(x), y).backward()
    optimizer.step()
    for p, old in zip(model.parameters(), before):
        assert torch.equal(p, old) != p.requires_grad, "trainable parameters move, frozen ones do not"
    assert len(trainable) == 5


@pytest.mark.parametrize("parts", [(0, 2, 6), (0, 1, 6), (0, 1, 2, 6)], ids=["2+4", "1+5", "1+1+4"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", MODE_NAMES)
def test_gradient_accumulation_equals_one_large_batch(mode, reduction, parts):
    torch.manual_seed(3)
    model = MLP().double()
    batch = mlp_batch(6, torch.float64)
    C, expected, _ = oracle_update(model, batch, MLP_CASE, reduction)
    dp_model, optimizer, criterion, _ = make_private(model, batch, MLP_CASE, mode, C, reduction)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = batch
    for start, stop in zip(parts, parts[1:]):
        criterion(dp_model(x[start:stop]), y[start:stop]).backward()
    optimizer.step()
    for n, p in model.named_parameters():
        assert_rel_close(n, before[n] - p.detach(), expected[n], torch.float64)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_single_sample_and_empty_batch(mode):
    torch.manual_seed(4)
    model = MLP().double()
    batch = mlp_batch(1, torch.float64)
    C, expected, _ = oracle_update(model, batch, MLP_CASE, "mean", quantile=0.0)
    got = dp_update(model, batch, MLP_CASE, mode, C / 2, "mean")  # the only sample is clipped
    assert_rel_close("B=1", torch.cat([g.flatten() for g in got.values()]), torch.cat([e.flatten() for e in expected.values()]) / 2, torch.float64)

    dp_model, optimizer, criterion, _ = make_private(model, mlp_batch(4), MLP_CASE, mode, 1.0, "mean", noise=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = mlp_batch(0, torch.float64)
    criterion(dp_model(x), y).backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), "noise 0 and no samples: no change"


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_batch_other_than_the_expected_size_is_divided_by_the_expected_size(mode):
    """Poisson sampling draws batches of any size: with mean reduction DP-SGD divides the clipped sum
    by the expected batch size (the loader's, 8 here), not by the batch's own 5; and a mean-reduction
    optimizer without an expected batch size is refused."""
    torch.manual_seed(6)
    model = MLP().double()
    batch = mlp_batch(5, torch.float64)
    C, expected, _ = oracle_update(model, batch, MLP_CASE, "mean")
    dp_model, optimizer, criterion, _ = make_private(model, mlp_batch(8, torch.float64), MLP_CASE, mode, C, "mean")
    assert optimizer.expected_batch_size == 8
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    criterion(dp_model(batch[0]), batch[1]).backward()
    optimizer.step()
    whole = total_norm(expected.values())
    for n, p in model.named_parameters():
        assert_rel_close(n, before[n] - p.detach(), expected[n] * 5 / 8, torch.float64, scale=whole)
    with pytest.raises(ValueError, match="expected batch size"):
        type(optimizer)(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=None, loss_reduction="mean")


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_non_finite_norm_refuses_the_step_and_names_the_sample(mode):
    model = MLP()
    dp_model, optimizer, criterion, _ = make_private(model, mlp_batch(4), MLP_CASE, mode, 1.0, "sum")
    x, y = mlp_batch(4)
    criterion(dp_model(x[:2]), y[:2]).backward()  # an accumulated micro-batch must survive
    grads = [p.grad.clone() for p in model.parameters()]
    x[3, 0] = float("nan")
    with pytest.raises(NonFiniteNormError, match=r"samples \[3\]"):
        criterion(dp_model(x), y).backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert dp_model._inputs == {} and dp_model._kept == [] and dp_model._param_norm_sq == []


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_non_finite_norm_on_a_first_micro_batch_leaves_no_gradient(mode):
    """Without an accumulated gradient, bookkeeping queues the clipped sums before it waits for the
    finiteness check: a refused step must still leave every p.grad None, and the next step is exact."""
    model = MLP()
    dp_model, optimizer, criterion, _ = make_private(model, mlp_batch(4), MLP_CASE, mode, 1.0, "sum")
    x, y = mlp_batch(4)
    bad = x.clone()
    bad[1, 2] = float("inf")
    with pytest.raises(NonFiniteNormError, match=r"samples \[1\]"):
        criterion(dp_model(bad), y).backward()
    assert all(p.grad is None for p in model.parameters())
    criterion(dp_model(x), y).backward()
    clean = MLP()
    clean.load_state_dict(model.state_dict())
    dp_clean, _, criterion_clean, _ = make_private(clean, mlp_batch(4), MLP_CASE, mode, 1.0, "sum")
    criterion_clean(dp_clean(x), y).backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), clean.parameters()))


@pytest.mark.gpu
def test_finiteness_check_on_cuda_waits_for_the_norms_only(monkeypatch):
    """On CUDA the check reads the norms' finiteness without waiting for device work queued after them
    (bookkeeping queues its clipped sums there): the device is still busy when a passing check returns.
    Steps alternating finite and NaN norms on one model each get their own verdict (no stale flag)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dp_model, optimizer, criterion, _ = make_private(MLP().cuda(), mlp_batch(4), MLP_CASE, "bk", 1.0, "sum")
    stream, check, busy = torch.cuda.current_stream(), DPClippingModule.check_norms_finite, []

    def check_behind_queued_work(self):
        torch.cuda._sleep(10**9)  # about half a second of device work between the norms and the check
        check(self)
        busy.append(not stream.query())

    monkeypatch.setattr(DPClippingModule, "check_norms_finite", check_behind_queued_work)
    for bad in (False, True, False, True, False):
        x, y = (t.cuda() for t in mlp_batch(4))
        if bad:
            x[2, 0] = float("nan")
            with pytest.raises(NonFiniteNormError, match=r"samples \[2\]"):
                criterion(dp_model(x), y).backward()
            assert all(p.grad is None for p in dp_model.parameters())
        else:
            criterion(dp_model(x), y).backward()
            assert busy.pop(), "the check waited for the work queued after the norms"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    assert busy == []
    twin = copy.deepcopy(dp_model)  # a copy holds flags of its own, with the same verdict
    assert dp_model._host_flags and twin._host_flags.keys() == dp_model._host_flags.keys()
    assert all(twin._host_flags[d] is not f and bool(twin._host_flags[d]) == bool(f) for d, f in dp_model._host_flags.items())
    torch.save(dp_model, io.BytesIO())


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale


class WithUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Custom()
        self.fc = nn.Linear(3, 3)
        self.b = nn.Bilinear(3, 3, 2)

    def forward(self, x):
        h = self.fc(self.a(x))
        return self.b(h, h)


def assert_step_equals_oracle(build, case, mode, B=5):
    """One DP step of ``mode`` on a float64 model equals the oracle, with a clip norm binding for some samples."""
    torch.manual_seed(0)
    model = build().double()
    batch = tuple(t.double() if t.is_floating_point() else t for t in case.batch(B))
    C, expected, norms = oracle_update(model, batch, case, "mean")
    assert 0 < int((norms > C).sum()) < B
    got = dp_update(model, batch, case, mode, C, "mean")
    whole = total_norm(expected.values())
    for n in expected:
        assert_rel_close(f"{case.name}/{mode}/{n}", got[n], expected[n], torch.float64, scale=whole)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_modules_without_a_rule_train_exactly_and_are_listed_on_a_sharded_model(mode):
    """Behaviour changed: modules owning parameters without a layer rule (a custom scale, nn.Bilinear)
    get per-sample gradients from torch.func; only an FSDP2-sharded model still refuses them, by name."""
    assert_step_equals_oracle(WithUnsupported, MLP_CASE.__class__("unsupported", WithUnsupported, lambda B: (torch.randn(B, 3), torch.randint(0, 2, (B,)))), mode)
    from dpkernels.clipping.module import check_supported

    with pytest.raises(UnsupportedModuleError) as err:
        check_supported(WithUnsupported(), sharded=True)
    message = str(err.value)
    assert "a (" in message and "Custom" in message and "b (" in message and "Bilinear" in message
    assert "fc (" not in message


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids)).mean(1)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = self.first

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


TOKENS_CASE = Case("tokens", None, lambda B: (torch.randint(0, 7, (B, 5)), torch.randint(0, 7, (B,))))


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("model, case", [(Tied, TOKENS_CASE), (Shared, Case("shared", Shared, lambda B: (torch.randn(B, 4), torch.randint(0, 4, (B,))))), (CalledTwice, Case("twice", CalledTwice, lambda B: (torch.randn(B, 4), torch.randint(0, 4, (B,)))))], ids=["tied", "shared", "called_twice"])
def test_tied_shared_and_reused_parameters_are_exact(model, case, mode):
    """Behaviour changed (these were refused): a parameter's per-sample gradient is the sum over its
    uses before the norm; on an FSDP2-sharded model tying is still refused by name."""
    assert_step_equals_oracle(model, case, mode)
    from dpkernels.clipping.module import check_untied

    if model is not CalledTwice:
        with pytest.raises(TiedParameterError, match="weight = "):
            check_untied(model())


class Unbatched(nn.Module):
    """A position embedding called on [T] ids, its [T, d] output broadcast over the batch."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(9, 4)
        self.pos = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.head(x.mean(1))


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_layer_without_batch_dimension_is_exact(mode):
    """Behaviour changed (this was refused): the [T, d] output is expanded to the batch."""
    case = Case("unbatched", Unbatched, lambda B: (torch.randint(0, 9, (B, 5)), torch.randint(0, 3, (B,))))
    assert_step_equals_oracle(Unbatched, case, mode)


def test_a_layer_called_on_one_samples_data_for_all_is_refused_by_name():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x[0]).expand(x.shape[0], 2)

    dp_model, _, criterion, _ = make_private(Flat(), mlp_batch(2), MLP_CASE, "bk", 1.0, "mean")
    with pytest.raises(LayerInputError, match=r"mixes samples.*\['fc'\]"):
        criterion(dp_model(torch.randn(2, 4)), torch.tensor([0, 1])).backward()


def test_criterion_is_restored_and_must_give_per_sample_losses():
    crit = nn.CrossEntropyLoss()
    model = MLP()
    dp_model, optimizer, criterion, _ = make_private(model, mlp_batch(3), MLP_CASE, "bk", 1.0, "mean")
    wrapped = DPCriterion(dp_model, crit, "mean", criterion.clipped_backward)
    x, y = mlp_batch(3)
    wrapped(dp_model(x), y).backward()
    assert crit.reduction == "mean"
    with pytest.raises(IndexError, match="out of bounds"):
        wrapped(dp_model(x), torch.tensor([0, 1, 99]))  # criterion raises: its reduction must still be restored
    assert crit.reduction == "mean"

    def bare(out, target):
        return (out - target).pow(2).mean()

    with pytest.raises(CriterionError, match="reduction"):
        DPCriterion(dp_model, bare, "mean", criterion.clipped_backward)

    class ScalarLoss(nn.Module):
        reduction = "mean"

        def forward(self, out, target):
            return out.sum()

    with pytest.raises(CriterionError, match="one loss per sample"):
        DPCriterion(dp_model, ScalarLoss(), "mean", criterion.clipped_backward)(dp_model(x), y)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_noise_comes_from_opacus_generator(mode, monkeypatch):
    """Same seeded generator -> identical noisy updates; every parameter's noise is drawn from it."""
    import dpkernels.optimizer as ours

    calls = []
    real = ours.gaussian_noise
    monkeypatch.setattr(ours, "gaussian_noise", lambda *a: calls.append(dict(zip(("std", "reference", "generator", "secure_mode"), a))) or real(*a))
    updates = []
    for _ in range(2):
        model = MLP()
        torch.manual_seed(0)
        model.load_state_dict(MLP().state_dict())
        gen = torch.Generator().manual_seed(123)
        dp_model, optimizer, criterion, _ = make_private(model, mlp_batch(4), MLP_CASE, mode, 1.0, "mean", noise=1.0, noise_generator=gen)
        torch.manual_seed(1)
        x, y = mlp_batch(4)
        before = [p.detach().clone() for p in model.parameters()]
        criterion(dp_model(x), y).backward()
        optimizer.step()
        updates.append([b - p.detach() for b, p in zip(before, model.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*updates))
    assert len(calls) == 2 * len(list(MLP().parameters()))
    assert all(kw["generator"] is not None for kw in calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("std", [0.0, 0.7])
def test_noise_is_opacus_noise_bit_for_bit(dtype, std):
    """dpkernels' noise (without Opacus's discarded zero tensor) is Opacus's ``_generate_noise``: the same
    numbers from the same generator state, and the generator moves on alike."""
    from opacus.optimizers.optimizer import _generate_noise

    from dpkernels.optimizer import gaussian_noise

    reference = torch.empty(3, 5, dtype=dtype)
    ours, theirs = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for _ in range(2):
        a = gaussian_noise(std, reference, ours, False)
        b = _generate_noise(std=std, reference=reference, generator=theirs, secure_mode=False)
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)
    assert torch.equal(ours.get_state(), theirs.get_state())


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_secure_mode_noise_uses_the_secure_generator(mode, monkeypatch):
    """secure_mode: the noise is drawn with secure_mode=True (Opacus's 4-sample construction) from the
    engine's secure generator, and a user noise_generator is refused as in Opacus.  torchcsprng (which
    makes Opacus's secure generator) has no wheel for this torch: a seeded torch.Generator stands in."""
    import dpkernels.optimizer as ours

    calls = []
    real = ours._generate_noise
    monkeypatch.setattr(ours, "_generate_noise", lambda **kw: calls.append(kw) or real(**kw))
    engine = PrivacyEngine()
    engine.secure_mode, engine.secure_rng = True, torch.Generator().manual_seed(5)
    model = MLP()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*mlp_batch(4)), batch_size=4)
    kwargs = dict(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader, criterion=nn.CrossEntropyLoss(),
                  noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode)
    with pytest.raises(ValueError, match="prohibited in secure mode"):
        engine.make_private(**kwargs, noise_generator=torch.Generator().manual_seed(1))
    dp_model, optimizer, criterion, _ = engine.make_private(**kwargs)
    x, y = mlp_batch(4)
    criterion(dp_model(x), y).backward()
    optimizer.step()
    assert calls and all(kw["secure_mode"] is True and kw["generator"] is engine.secure_rng for kw in calls)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_accountant_advances_as_with_opacus(mode):
    def epsilon(engine_cls, grad_sample_mode):
        model = MLP()
        data = torch.utils.data.TensorDataset(*mlp_batch(32))
        loader = torch.utils.data.DataLoader(data, batch_size=8)
        engine = engine_cls()
        out = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            criterion=nn.CrossEntropyLoss(), noise_multiplier=1.1, max_grad_norm=1.0,
            grad_sample_mode=grad_sample_mode,
        )
        dp_model, optimizer, criterion, loader = out
        for x, y in loader:
            criterion(dp_model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        return engine.accountant.history, engine.get_epsilon(1e-5)

    ours = epsilon(PrivacyEngine, mode)
    theirs = epsilon(opacus.PrivacyEngine, "ghost")
    assert ours[0] == theirs[0] and len(ours[0]) > 0
    assert ours[1] == theirs[1]


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_bf16_autocast_is_within_twice_plain_pytorch_bf16_error(mode):
    """Autocast bf16: norms in float32; the clipped update's error is bounded by PyTorch's own bf16 error."""
    torch.manual_seed(5)
    model = MLP(d_in=32, hidden=64)
    case = Case("mlp32", lambda: MLP(d_in=32, hidden=64), lambda B: (torch.randn(B, 32), torch.randint(0, 5, (B,))))
    batch = case.batch(8)
    C, expected, norms = oracle_update(model, batch, case, "mean")

    dp_model, optimizer, criterion, _ = make_private(copy.deepcopy(model), batch, case, mode, C, "mean")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = criterion(dp_model(batch[0]), batch[1])
    loss.backward()
    got = torch.cat([p.grad.flatten() for p in dp_model.parameters()]) / 8

    plain = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nn.functional.cross_entropy(plain(batch[0]), batch[1]).backward()
    plain_grad = torch.cat([p.grad.flatten() for p in plain.parameters()])
    exact_plain = torch.cat([g.flatten() for g in _mean_grad(model, batch).values()])

    ref = torch.cat([e.flatten() for e in expected.values()])
    err = (got.double() - ref).norm() / ref.norm()
    base = (plain_grad.double() - exact_plain).norm() / exact_plain.norm()
    assert err <= 2 * base + 1e-6, f"{err=:.3g} vs plain bf16 {base=:.3g}"


def _mean_grad(model, batch):
    m = copy.deepcopy(model).double()
    nn.functional.cross_entropy(m(batch[0].double()), batch[1]).backward()
    return {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_cached_tensors_are_released_after_the_step(mode):
    model = MLP()
    dp_model, optimizer, criterion, _ = make_private(model, mlp_batch(4), MLP_CASE, mode, 1.0, "mean")
    x, y = mlp_batch(4)
    criterion(dp_model(x), y).backward()
    assert dp_model._inputs == {} and dp_model._kept == [] and dp_model._param_norm_sq == []


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_single_sample_caches_nothing(mode):
    """B = 1: the per-sample gradient is the gradient; no layer input is kept for the backward pass."""
    dp_model, _, criterion, _ = make_private(MLP(), mlp_batch(1), MLP_CASE, mode, 1.0, "mean")
    x, y = mlp_batch(1)
    out = dp_model(x)
    assert dp_model._inputs == {} and dp_model.single_sample_step
    criterion(out, y).backward()
    assert dp_model.per_sample_gradient_norms.shape == (1,)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_norm_pass_skips_autograds_linear_weight_gradients(mode):
    """Autograd's own Linear dW is thrown away in a norms pass, so it is never computed there."""
    model = MLP()
    dp_model, _, criterion, _ = make_private(model, mlp_batch(4), MLP_CASE, mode, 1.0, "mean")
    reached = []
    for name in ("fc1", "fc2"):
        getattr(model, name).weight.register_hook(lambda g, name=name: reached.append(name) if g is not None else None)
    x, y = mlp_batch(4)
    criterion(dp_model(x), y).backward()
    assert reached == ([] if MODES[mode].passes == 1 else ["fc2", "fc1"]), "only ghost's second pass computes dW"


def test_wrapped_linear_survives_deepcopy_and_unwrapping():
    model = MLP()
    dp_model, _, _, _ = make_private(model, mlp_batch(4), MLP_CASE, "bk", 1.0, "mean")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.fc1.weight.mul_(2)
    x = torch.randn(3, 12)
    assert not torch.equal(twin(x), model(x)), "the copy computes with its own weights"
    plain = dp_model.to_standard_module()
    assert "forward" not in plain.fc1.__dict__ and torch.equal(plain(x), MLP.forward(plain, x))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("skipped", [0, 2], ids=["every-step", "two-skipped-steps"])
def test_optimizer_matches_opacus_bit_for_bit(reduction, skipped):
    """dpkernels.optimizer.DPOptimizer batches Opacus's loops without changing a bit of the result,
    also when steps are skipped (BatchMemoryManager) and gradients pile up in summed_grad."""
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from dpkernels.optimizer import DPOptimizer

    results = []
    for cls in (DPOptimizer, DPOptimizerFastGradientClipping):
        torch.manual_seed(0)
        model = MLP()
        optimizer = cls(torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=1.3, max_grad_norm=0.7,
                        expected_batch_size=4, loss_reduction=reduction, generator=torch.Generator().manual_seed(9))
        for _ in range(2):
            for micro in range(skipped + 1):
                for p in model.parameters():
                    p.grad = torch.randn_like(p)
                optimizer.signal_skip_step(do_skip=micro < skipped)
                optimizer.step()
                optimizer.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_optimizer_step_holds_no_copy_of_the_gradients():
    """Opacus copies every gradient into summed_grad at each step and keeps the copy until zero_grad;
    dpkernels' optimizer refers to p.grad instead: its step's peak is lower by the gradients' size
    (live-tensor tracker), and nothing is left in summed_grad after the step."""
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from dpkernels.optimizer import DPOptimizer
    from dpkernels.profiling import peak_memory

    model = nn.Linear(256, 256)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peaks = {}
    for cls in (DPOptimizer, DPOptimizerFastGradientClipping):
        optimizer = cls(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        with peak_memory(torch.device("cpu")) as mem:
            optimizer.step()
        peaks[cls] = mem["peak_bytes"]
        held = [p.summed_grad for p in model.parameters() if p.summed_grad is not None]
        assert (not held) == (cls is DPOptimizer)
        optimizer.zero_grad()
    assert peaks[DPOptimizer] <= peaks[DPOptimizerFastGradientClipping] - grad_bytes
