"""Opacus's own fast-gradient-clipping tests, run against dpkernels: the peer suite.

The tests come unchanged from the installed Opacus wheel (``opacus/tests``).  Thin subclasses and
patched module globals make them build dpkernels objects where they would build Opacus's, while the
reference they compare against (Opacus's ``GradSampleModule`` in "hooks" mode + ``DPOptimizer``, or
Opacus's hooks-only norm sampler) stays Opacus's own.

What runs, and against what
    opacus.tests.grad_sample_module_fast_gradient_clipping_test
      GradSampleModuleFastGradientClippingTest   CLS = DPClippingModule, in both dpkernels modes:
                                                 ghost (two backward passes) and bk (bookkeeping,
                                                 keep_samples=True).  Its hypothesis tests name the
                                                 module globals ``GradSampleModuleFastGradientClipping``
                                                 and ``DPLossFastGradientClipping`` directly; for each
                                                 test both are patched (monkeypatch) to build our
                                                 module and the criterion ``dpkernels.PrivacyEngine``
                                                 builds (a ``DPCriterion`` -> ``PrivateLoss``), so the
                                                 per-parameter norms and weight updates compared with
                                                 Opacus's GradSampleModule come from dpkernels.
                                                 The inherited GradSampleModuleTest tests that hard-code
                                                 Opacus's GradSampleModule (test_remove_hooks,
                                                 test_standard_module_validation,
                                                 test_custom_module_validation, test_load_state_dict)
                                                 run too; they are part of the class.
      GradSampleModuleFastGradientClippingEmbeddingLayerTest
                                                 same patching, both modes.  Its two multi-GPU tests
                                                 skip unless 2 GPUs are present (Opacus's skipIf).
      DPTensorArithmeticTest                     the module global ``DPTensorFastGradientClipping`` is
                                                 patched to build our ``PrivateLoss`` (Opacus's
                                                 constructor takes an optimizer, ours does not) and
                                                 ``isinstance(x, DPTensorFastGradientClipping)`` to
                                                 mean ``isinstance(x, PrivateLoss)``.
    opacus.tests.grad_sample_hooks_fast_gradient_clipping_test
      only test_hooks_vs_wrapped_equivalence: Opacus's hooks-only ``GradSampleHooksFastGradientClipping``
      (per-sample gradients, use_ghost_clipping=False) against the *wrapped* module, which is ours
      (module global ``GradSampleModuleFastGradientClipping`` patched).  The file's other 8 tests
      exercise only ``GradSampleHooksFastGradientClipping``, the non-wrapping variant that attaches
      hooks to the user's model and is used without a wrapper (hooks.cleanup(), isinstance of the
      bare model, ...).  dpkernels has no hooks-only mode (``make_private(..., wrap_model=False)``
      raises for dpkernels modes), so those tests have nothing of ours to run against and are not
      collected here; running them unpatched would test Opacus against itself.
    opacus.tests.mixed_precision_test
      MixedPrecisionTest with Opacus's module global ``PrivacyEngine`` patched to
      ``dpkernels.PrivacyEngine`` and the two mode loops narrowed to ("ghost", wrap_model=True):
      that is the one Opacus mode name dpkernels implements ("ghost" is in ``dpkernels.MODES``), and
      the test's ``_get_training_components`` only knows Opacus's mode names, so "bk" cannot pass
      through it unchanged.  Opacus gates every test there on CUDA: on a CPU machine they skip.

Checked, not assumed
    An autouse fixture patches the globals and counts, per test, the ``DPClippingModule`` objects
    built, the backward-hook calls in which they computed norms, and the ``PrivateLoss`` objects
    built.  Each collected test method is wrapped (``@peer``) so that, after the Opacus test body
    passes, it asserts that the dpkernels objects it should have used were used; a test that would
    silently compare Opacus with itself fails instead.  A skipped test (SkipTest from setUp or the
    body) never reaches that check.  The fixture also asserts that every test starts with the
    float32 default dtype: Opacus's tests set float64 and leak it, and the root conftest's autouse
    fixture restores it after each test, unittest-style ones included.

torchvision
    ``opacus/tests/grad_sample_module_test.py`` (imported by the fast-gradient-clipping tests for
    their parent class) imports ``torchvision``.  The PyPI torchvision wheels cannot be imported
    beside the CPU torch 2.13 wheel used here ("operator torchvision::nms does not exist"), and none
    is installed.  Where ``import torchvision`` works (e.g. on the GPU machine), the real one is
    used.  Otherwise a stand-in sits in ``sys.modules`` only while that Opacus test module is
    imported, and provides exactly what it uses:
      transforms.Compose / ToTensor / Normalize   ToTensor takes the stand-in's uint8 [C, H, W]
                                                  images (the real one takes PIL images / HWC arrays)
      datasets.FakeData                           ``size`` random uint8 images of ``image_size``,
                                                  random int labels in [0, num_classes), seeded by
                                                  index, with the transform applied
      models.mobilenet_v3_small                   a tiny conv-BatchNorm2d-Hardswish-pool-linear net
                                                  (the real one's stem and head, shrunk); the
                                                  BatchNorm2d is what makes Opacus's GradSampleModule
                                                  raise NotImplementedError in
                                                  test_custom_module_validation
    None of this touches dpkernels: FakeData only feeds the SampleConvNet tests (outputs unaltered,
    zero_grad, ...), and mobilenet only Opacus's own validation.

Known differences (investigated, not hidden)
    test_gradient_calculation (embedding, both modes): the test compares Opacus-hooks
    ``summed_grad`` (sum_i c_i g_i, before the optimizer divides by the batch size) with
    ``p.grad`` after ``optimizer_gc.step()`` (divided by it).  Opacus meets it only because its
    criterion returns losses of shape [B, 1] here and ``DPTensorFastGradientClipping.backward``
    multiplies them by the [B] coefficients, broadcasting to [B, B]: that backpropagates
    (sum_j c_j) * sum_i loss_i, a factor B when nothing is clipped (and a wrong gradient when
    something is).  dpkernels folds [B, 1] to [B] and yields (1/B) sum_i c_i g_i, the DP-SGD mean:
    1/B of what the test expects.  Marked xfail(strict=True): it stays a live check.
    MixedPrecisionTest (CUDA): test_rnn/complex_model_precision use Opacus's DPLSTM, which
      dpkernels refuses by name (UnsupportedModuleError); our subclass asserts exactly that.
      test_multidevice_* (2 GPUs): they write ``p._norm_sample`` by hand and call get_norm_sample(),
      which in dpkernels reads the norms its own hooks recorded, so it raises "no per-sample norms".
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
import types
import unittest

import pytest
import torch
from torch import nn

from dpkernels import PrivacyEngine
from dpkernels.clipping import DPClippingModule, PrivateLoss, ghost_backward

pytestmark = pytest.mark.peer


# ---- torchvision: the real one where it imports, else a stand-in during one import -------------------


def _torchvision_imports() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    before = set(sys.modules)
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:  # e.g. RuntimeError: operator torchvision::nms does not exist
        for name in set(sys.modules) - before:
            if name == "torchvision" or name.startswith("torchvision."):
                del sys.modules[name]
        return False


class _Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class _ToTensor:
    """uint8 [C, H, W] -> float [C, H, W] in [0, 1]."""

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return img.to(torch.get_default_dtype()).div(255)


class _Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / std


class _FakeData(torch.utils.data.Dataset):
    """``size`` random uint8 images of ``image_size`` (C, H, W) and random int labels, seeded by index."""

    def __init__(self, size=1000, image_size=(3, 224, 224), num_classes=10, transform=None, target_transform=None, random_offset=0):
        self.size, self.image_size, self.num_classes = size, tuple(image_size), num_classes
        self.transform, self.target_transform, self.random_offset = transform, target_transform, random_offset

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if index >= self.size:
            raise IndexError(index)
        g = torch.Generator().manual_seed(index + self.random_offset)
        img = torch.randint(0, 256, self.image_size, generator=g, dtype=torch.uint8)
        target = int(torch.randint(0, self.num_classes, (1,), generator=g))
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def _mobilenet_v3_small(num_classes: int = 1000, **_):
    """Tiny stand-in: mobilenet_v3_small's stem (conv, BatchNorm2d, Hardswish) and a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def _stand_in() -> dict:
    tv = types.ModuleType("torchvision")
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.Compose, tv.transforms.ToTensor, tv.transforms.Normalize = _Compose, _ToTensor, _Normalize
    tv.datasets = types.ModuleType("torchvision.datasets")
    tv.datasets.FakeData = _FakeData
    tv.models = types.ModuleType("torchvision.models")
    tv.models.mobilenet_v3_small = _mobilenet_v3_small
    return {"torchvision": tv, "torchvision.transforms": tv.transforms, "torchvision.datasets": tv.datasets, "torchvision.models": tv.models}


@contextlib.contextmanager
def _torchvision_for_import():
    if _torchvision_imports():
        yield "real"
        return
    modules = _stand_in()
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield "stand-in"
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


with _torchvision_for_import() as TORCHVISION:
    _fgc = importlib.import_module("opacus.tests.grad_sample_module_fast_gradient_clipping_test")
_hooks = importlib.import_module("opacus.tests.grad_sample_hooks_fast_gradient_clipping_test")
_mp = importlib.import_module("opacus.tests.mixed_precision_test")


# ---- our objects under Opacus's names -----------------------------------------------------------------

GHOST = DPClippingModule
BOOKKEEPING = functools.partial(DPClippingModule, keep_samples=True)  # a partial is no descriptor: self.CLS(...) works


def dp_loss(module, optimizer, criterion, loss_reduction="mean"):
    """Opacus's ``DPLossFastGradientClipping(module, optimizer, criterion, loss_reduction)``, built the way
    ``dpkernels.PrivacyEngine.make_private`` builds its criterion (ghost or bookkeeping backward by module)."""
    return PrivacyEngine()._prepare_criterion(module=module, optimizer=optimizer, criterion=criterion, loss_reduction=loss_reduction)


class _BuildsOurs(type):
    """Metaclass for a stand-in of an Opacus class name: calling it builds our object, isinstance means ours."""

    def __call__(cls, *args, **kwargs):
        return cls.build(*args, **kwargs)

    def __instancecheck__(cls, obj):
        return isinstance(obj, cls.ours)


class DPTensorAsPrivateLoss(metaclass=_BuildsOurs):
    """``DPTensorFastGradientClipping(module, optimizer, loss_per_sample, loss_reduction)`` -> our PrivateLoss."""

    ours = PrivateLoss

    @staticmethod
    def build(module, optimizer, loss_per_sample, loss_reduction="mean"):
        # the optimizer has no role in PrivateLoss; the arithmetic tests never call backward()
        return PrivateLoss(module, loss_per_sample, loss_reduction, ghost_backward)


# ---- the spy and the patching fixture -----------------------------------------------------------------


class _Spy:
    """What dpkernels did during one test."""

    def reset(self):
        self.modules = []  # DPClippingModule objects built
        self.norm_hooks = 0  # layer calls whose per-sample norms those modules computed
        self.losses = 0  # PrivateLoss objects built

    def check(self, test_id: str, needs) -> None:
        seen = {"module": len(self.modules), "norms": self.norm_hooks, "loss": self.losses}
        missing = [what for what in needs if not seen[what]]
        assert not missing, (
            f"{test_id} passed without dpkernels doing {missing} (seen: {seen}); the peer test "
            "compared Opacus with itself — check the patched globals"
        )


SPY = _Spy()
SPY.reset()


@pytest.fixture(autouse=True)
def dpkernels_under_opacus_names(request, monkeypatch):
    """Patch the Opacus test modules' globals to dpkernels for this test, and count what dpkernels does."""
    assert torch.get_default_dtype() == torch.float32, "a previous test leaked its default dtype"
    SPY.reset()

    init = DPClippingModule.__init__
    finish = DPClippingModule._finish
    loss_init = PrivateLoss.__init__

    def counting_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        SPY.modules.append(self)

    def counting_finish(self, call):
        SPY.norm_hooks += 1
        return finish(self, call)

    def counting_loss_init(self, *args, **kwargs):
        loss_init(self, *args, **kwargs)
        SPY.losses += 1

    monkeypatch.setattr(DPClippingModule, "__init__", counting_init)
    monkeypatch.setattr(DPClippingModule, "_finish", counting_finish)
    monkeypatch.setattr(PrivateLoss, "__init__", counting_loss_init)

    ours = getattr(request.cls, "OURS", GHOST)
    monkeypatch.setattr(_fgc, "GradSampleModuleFastGradientClipping", ours)
    monkeypatch.setattr(_fgc, "DPLossFastGradientClipping", dp_loss)
    monkeypatch.setattr(_fgc, "DPTensorFastGradientClipping", DPTensorAsPrivateLoss)
    monkeypatch.setattr(_hooks, "GradSampleModuleFastGradientClipping", ours)
    monkeypatch.setattr(_mp, "PrivacyEngine", PrivacyEngine)
    yield SPY


def peer(default=("module",), **per_test):
    """Class decorator: after each collected test method passes, assert which dpkernels objects it used.

    needs: "module" (a DPClippingModule was built), "norms" (its backward hooks computed norms),
    "loss" (a PrivateLoss was built).  ``default`` applies to every test, ``per_test`` adds to it.
    """

    def decorate(cls):
        for name in unittest.TestLoader().getTestCaseNames(cls):
            needs = set(default) | set(per_test.pop(name, ()))
            setattr(cls, name, _checked(getattr(cls, name), needs))
        assert not per_test, f"no such tests in {cls.__name__}: {sorted(per_test)}"
        return cls

    return decorate


def _checked(test, needs):
    @functools.wraps(test)
    def run(self):
        test(self)
        SPY.check(self.id(), needs)

    return run


# ---- opacus.tests.grad_sample_module_fast_gradient_clipping_test ---------------------------------------

FGC_NEEDS = dict(
    test_zero_grad={"norms"},
    test_norm_calculation_fast_gradient_clipping={"norms", "loss"},
    test_weight_update_fast_gradient_clipping={"norms", "loss"},
)


@peer(**FGC_NEEDS)
class TestFastGradientClippingGhost(_fgc.GradSampleModuleFastGradientClippingTest):
    OURS = GHOST
    CLS = GHOST


@peer(**FGC_NEEDS)
class TestFastGradientClippingBookkeeping(_fgc.GradSampleModuleFastGradientClippingTest):
    OURS = BOOKKEEPING
    CLS = BOOKKEEPING


EMBEDDING_NEEDS = dict(
    test_norm_calculation={"norms"},
    test_gradient_calculation={"norms", "loss"},
)


OPACUS_EMBEDDING_TEST_BUG = (
    "Opacus's test compares summed_grad (before division by the batch size) with p.grad after step() "
    "(after it); Opacus meets it only through a [B,1]x[B] broadcast in its DPTensor.backward (see the "
    "module docstring). dpkernels gives the exact DP-SGD mean, 1/B of the expected value."
)


@peer(**EMBEDDING_NEEDS)
class TestEmbeddingLayerGhost(_fgc.GradSampleModuleFastGradientClippingEmbeddingLayerTest):
    OURS = GHOST
    test_gradient_calculation = pytest.mark.xfail(strict=True, reason=OPACUS_EMBEDDING_TEST_BUG)(
        _fgc.GradSampleModuleFastGradientClippingEmbeddingLayerTest.test_gradient_calculation
    )


@peer(**EMBEDDING_NEEDS)
class TestEmbeddingLayerBookkeeping(_fgc.GradSampleModuleFastGradientClippingEmbeddingLayerTest):
    OURS = BOOKKEEPING
    test_gradient_calculation = pytest.mark.xfail(strict=True, reason=OPACUS_EMBEDDING_TEST_BUG)(
        _fgc.GradSampleModuleFastGradientClippingEmbeddingLayerTest.test_gradient_calculation
    )


@peer(default=("loss",))
class TestPrivateLossArithmetic(_fgc.DPTensorArithmeticTest):
    pass


# ---- opacus.tests.grad_sample_hooks_fast_gradient_clipping_test ----------------------------------------


@peer(default=("module", "norms"))
class TestOpacusHooksVsOurWrapper(unittest.TestCase):
    """Opacus's hooks-only norm sampler against our wrapped module (see the module docstring)."""

    setUp = _hooks.GradSampleHooksFastGradientClippingTest.setUp
    test_hooks_vs_wrapped_equivalence = _hooks.GradSampleHooksFastGradientClippingTest.test_hooks_vs_wrapped_equivalence


# ---- opacus.tests.mixed_precision_test ------------------------------------------------------------------


@peer(default=("module", "norms", "loss"))
class TestMixedPrecisionGhost(_mp.MixedPrecisionTest):
    """Opacus's precision checks, model by model, with ghost mode through dpkernels.PrivacyEngine (CUDA only)."""

    def _test_low_precision_all_modes(self, model_class, model_kwargs, dataloader, low_precision_type):
        for dtype in low_precision_type:
            with self.subTest(grad_sample_mode="ghost", wrap_model=True, dtype=dtype):
                self._train_low_precision(
                    model=model_class(**model_kwargs), dataloader=dataloader, dtype=dtype, grad_sample_mode="ghost", wrap_model=True
                )

    # Opacus's RNN and complex models hold DPLSTM/DPGRU/DPRNN: refused by dpkernels (TestDPRNNRefused)
    test_rnn_model_precision = None
    test_complex_model_precision = None

    def _test_mixed_precision_all_modes(self, model_class, model_kwargs, dataloader, low_precision_type):
        for dtype in low_precision_type:
            with self.subTest(grad_sample_mode="ghost", wrap_model=True, dtype=dtype):
                self._train_mixed_precision(
                    model=model_class(**model_kwargs), dataloader=dataloader, dtype=dtype, grad_sample_mode="ghost", wrap_model=True
                )


class TestDPRNNRefused(unittest.TestCase):
    """The models of Opacus's test_rnn/complex_model_precision: dpkernels refuses DPLSTM/DPGRU/DPRNN
    by name at make_private (they alias their inner Linear weights), instead of clipping them wrongly."""

    def _assert_refused(self, model):
        from dpkernels.errors import UnsupportedModuleError

        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(2, 1)), batch_size=2)
        with self.assertRaisesRegex(UnsupportedModuleError, "DPLSTM|DPGRU|DPRNN"):
            PrivacyEngine().make_private(
                module=model, optimizer=optimizer, data_loader=loader, criterion=nn.CrossEntropyLoss(),
                noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost",
            )

    def test_rnn_model(self):
        self._assert_refused(_mp.RNNModel(input_dim=16, hidden_dim=32, output_dim=10))

    def test_complex_model(self):
        self._assert_refused(_mp.ComplexModel(input_dim=16, hidden_dim=32, output_dim=10, seq_len=10))
