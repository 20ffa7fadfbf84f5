"""``dpkernels.PrivacyEngine``: ``opacus.PrivacyEngine`` with the dpkernels clipping modes.

Every Opacus ``grad_sample_mode`` still goes to Opacus.  For a dpkernels mode (see ``dpkernels.modes``)
``make_private`` returns ``(model, optimizer, criterion, data_loader)`` like Opacus's ghost mode:
the model is a :class:`DPClippingModule`, the optimizer Opacus's ``DPOptimizerFastGradientClipping``
(``FSDPOptimizerFastGradientClipping`` for the *_fsdp modes) with its per-parameter loops batched and
no copy of the gradients (:mod:`dpkernels.optimizer`: noise, scaling, accountant hook, ``secure_mode``
and ``noise_generator`` unchanged), and the criterion
a :class:`DPCriterion` whose ``backward()`` runs the mode's clipping.

Opacus's own modes (``hooks``, ``ew``, ``functorch``) return what Opacus returns for them, three
objects ``(model, optimizer, data_loader)``, and train with the plain criterion.

Refused in every mode, before anything is wrapped: BatchNorm layers (each named, with the fix).
Warned once per ``make_private``: a flash mode whose model is not on a CUDA device (its Linear norms
then come from the PyTorch tiling of the Triton kernels: the same numbers, not the kernels' speed).
"""

from __future__ import annotations

import warnings

import opacus
from opacus.grad_sample import AbstractGradSampleModule
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from opacus.validators.errors import IllegalModuleConfigurationError
from opacus.validators.errors import UnsupportedModuleError as OpacusUnsupportedModuleError
from torch import nn
from torch.distributed.fsdp import FSDPModule

from .clipping import DPClippingModule, DPCriterion, bookkeeping_backward, ghost_backward
from .errors import UnsupportedModuleError
from .kernels.heuristics import interpreting
from .modes import MODES, get_mode
from .optimizer import DPOptimizer, FSDPOptimizer


class FlashFallbackWarning(UserWarning):
    """A flash mode runs without CUDA: Linear norms by the PyTorch tiling instead of Triton kernels."""


def refuse_batch_norm(module: nn.Module) -> None:
    """BatchNorm normalises each sample with statistics of the whole batch: no per-sample gradient exists."""
    found = [f"{name or '(root)'} ({type(m).__name__})" for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if found:
        raise UnsupportedModuleError(
            f"BatchNorm mixes the samples of a batch, so DP-SGD cannot clip per sample: {', '.join(found)}. "
            "Replace them before make_private with `model = opacus.validators.ModuleValidator.fix(model)` "
            "(BatchNorm -> GroupNorm), then build the optimizer on the fixed model's parameters."
        )


def warn_flash_without_cuda(module: nn.Module, mode: str) -> None:
    """One warning when a flash mode's Linear norms will not run as Triton kernels (see the module doc)."""
    on_cuda = any(p.is_cuda for p in module.parameters())
    if not on_cuda and not interpreting():
        warnings.warn(
            f"grad_sample_mode={mode!r}: the model is not on a CUDA device, so Linear per-sample norms run "
            "the PyTorch tiling of the Triton kernels instead of Triton (exact, without the kernels' speed); "
            "TRITON_INTERPRET=1 runs the Triton kernels through the interpreter instead",
            FlashFallbackWarning,
            stacklevel=5,
        )


def validate_for_dpkernels(module: nn.Module) -> None:
    """Opacus's module validation (train mode, BatchNorm and other layers Opacus refuses), except its
    refusal of nn.MultiheadAttention, which the dpkernels modes train as it is (layers/func.py)."""
    errors = [] if module.training else [IllegalModuleConfigurationError("Model needs to be in training mode")]
    for _, sub in trainable_modules(module):
        kind = type(sub)
        if kind in ModuleValidator.VALIDATORS and not issubclass(kind, nn.MultiheadAttention):
            errors.extend(ModuleValidator.VALIDATORS[kind](sub))
    if errors:
        raise OpacusUnsupportedModuleError(errors)


class PrivacyEngine(opacus.PrivacyEngine):
    """Opacus's PrivacyEngine, plus ``grad_sample_mode`` in ``dpkernels.modes.MODES``."""

    def _prepare_model(self, module: nn.Module, *, grad_sample_mode: str = "hooks", **kwargs):
        if grad_sample_mode not in MODES:
            return super()._prepare_model(module, grad_sample_mode=grad_sample_mode, **kwargs)
        mode = get_mode(grad_sample_mode)
        if not kwargs.get("wrap_model", True):
            raise ValueError(f"grad_sample_mode={mode.name!r} needs wrap_model=True")
        validate_for_dpkernels(module)
        if isinstance(module, AbstractGradSampleModule):
            raise ValueError("pass the plain nn.Module to make_private, not an already wrapped one")
        if mode.fsdp != isinstance(module, FSDPModule):
            raise ValueError(
                f"grad_sample_mode={mode.name!r} needs "
                + ("a model sharded with torch.distributed.fsdp.fully_shard" if mode.fsdp else "a model not sharded with FSDP2 (use the *_fsdp modes)")
            )
        if mode.linear_norm == "flash":
            warn_flash_without_cuda(module, mode.name)
        return DPClippingModule(
            module,
            batch_first=kwargs.get("batch_first", True),
            loss_reduction=kwargs.get("loss_reduction", "mean"),
            max_grad_norm=kwargs.get("max_grad_norm", 1.0),
            keep_samples=mode.passes == 1,
            linear_norm=mode.linear_norm,
            sharded=mode.fsdp,
        )

    def _prepare_optimizer(self, *, optimizer, grad_sample_mode: str = "hooks", clipping: str = "flat", distributed: bool = False, noise_generator=None, **kwargs):
        if grad_sample_mode not in MODES:
            return super()._prepare_optimizer(
                optimizer=optimizer, grad_sample_mode=grad_sample_mode, clipping=clipping, distributed=distributed, noise_generator=noise_generator, **kwargs
            )
        mode = get_mode(grad_sample_mode)
        if clipping != "flat" or distributed != mode.fsdp:
            where = "an FSDP2 (fully_shard) model" if mode.fsdp else "one process"
            raise ValueError(
                f"grad_sample_mode={grad_sample_mode!r} supports clipping='flat' on {where}; "
                f"got clipping={clipping!r}, distributed={distributed}"
            )
        if isinstance(optimizer, opacus.optimizers.DPOptimizer):
            optimizer = optimizer.original_optimizer
        generator = self.secure_rng if self.secure_mode else noise_generator
        # FSDP: Opacus's FSDP optimizer, noise once per coordinate (each rank noises its own shard)
        optimizer_class = FSDPOptimizer if mode.fsdp else DPOptimizer
        return optimizer_class(optimizer=optimizer, generator=generator, secure_mode=self.secure_mode, **kwargs)

    def _prepare_criterion(self, *, module, optimizer, criterion, loss_reduction: str = "mean", **kwargs):
        if not isinstance(module, DPClippingModule):
            return super()._prepare_criterion(module=module, optimizer=optimizer, criterion=criterion, loss_reduction=loss_reduction, **kwargs)
        backward = bookkeeping_backward if module.keep_samples else ghost_backward
        return DPCriterion(module, criterion, loss_reduction, backward)

    def make_private(self, *, module: nn.Module, criterion=None, grad_sample_mode: str = "hooks", loss_reduction: str = "mean", **kwargs):
        """As ``opacus.PrivacyEngine.make_private``.

        Returns ``(model, optimizer, criterion, data_loader)`` for a dpkernels mode (``dpkernels.MODES``:
        train with the returned criterion), and what Opacus returns for an Opacus mode: three objects,
        ``(model, optimizer, data_loader)``, for ``hooks``, ``ew`` and ``functorch``.  Raises
        ``UnsupportedModuleError`` for a model with BatchNorm layers, in every mode.
        """
        refuse_batch_norm(module)
        criterion = nn.CrossEntropyLoss(reduction=loss_reduction) if criterion is None else criterion
        result = super().make_private(module=module, criterion=criterion, grad_sample_mode=grad_sample_mode, loss_reduction=loss_reduction, **kwargs)
        if grad_sample_mode in MODES and isinstance(result[1], DPOptimizer):
            result[1].clipped_by(result[0])  # the parameters it may step: those the model clips
        if grad_sample_mode not in MODES or len(result) == 4:
            return result
        module, optimizer, data_loader = result
        criterion = self._prepare_criterion(module=module, optimizer=optimizer, criterion=criterion, loss_reduction=loss_reduction)
        return module, optimizer, criterion, data_loader
