"""Exceptions raised instead of computing a wrong gradient.

Each message names the layer (or parameter, or sample) at fault and says what to do.
"""


class UnsupportedModuleError(ValueError):
    """A trainable module has no per-sample norm rule (raised when the model is wrapped)."""


class TiedParameterError(ValueError):
    """A parameter is owned by several modules of an FSDP2-sharded model (unsharded models sum the uses)."""


class LayerInputError(ValueError):
    """A layer received an input of a rank or dtype its per-sample rule cannot handle."""


class NonFiniteNormError(FloatingPointError):
    """A per-sample gradient norm is NaN or Inf; the step is refused and gradients are untouched."""


class CriterionError(ValueError):
    """The criterion cannot give one loss per sample."""
