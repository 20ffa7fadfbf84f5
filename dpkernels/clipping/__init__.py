"""Clipping algorithms: ghost (two backward passes) and bookkeeping (one), over one module wrapper."""

from .bookkeeping import bookkeeping_backward
from .ghost import ghost_backward
from .loss import DPCriterion, PrivateLoss
from .module import DPClippingModule

__all__ = ["DPClippingModule", "DPCriterion", "PrivateLoss", "ghost_backward", "bookkeeping_backward"]
