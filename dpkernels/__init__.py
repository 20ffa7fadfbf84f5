"""dpkernels: exact per-sample gradient clipping for DP-SGD, as an Opacus 1.6 plug-in.

    from dpkernels import PrivacyEngine
    model, optimizer, criterion, loader = PrivacyEngine().make_private(..., grad_sample_mode="bk")
"""

from . import reference
from .engine import PrivacyEngine
from .modes import MODES, SINGLE_PROCESS_MODES

__version__ = "0.1.0"

__all__ = ["PrivacyEngine", "MODES", "SINGLE_PROCESS_MODES", "reference", "__version__"]
