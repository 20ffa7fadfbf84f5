"""The clipping modes, as data: one place to add a mode."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    """How one DP step computes the clipped gradient sum_i c_i g_i.

    passes:       backward passes per step: 2 = ghost (a second backward of sum_i c_i loss_i),
                  1 = bookkeeping (sum_i c_i g_i assembled from cached layer inputs and output grads)
    linear_norm:  how Linear per-sample norms are computed: "auto" (PyTorch, ghost or direct by cost)
                  or "flash" (Triton kernels)
    """

    name: str
    passes: int
    linear_norm: str
    description: str


MODES = {
    m.name: m
    for m in (
        Mode("ghost", 2, "auto", "norms without per-sample gradients, two backward passes"),
        Mode("bk", 1, "auto", "bookkeeping: one backward pass, clipped gradients from cached (A, G)"),
        Mode("flash", 2, "flash", "ghost with fused Triton norm kernels for Linear layers"),
        Mode("flash_bk", 1, "flash", "bookkeeping with fused Triton norm kernels for Linear layers"),
    )
}


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"unknown dpkernels mode {name!r}; choose one of {sorted(MODES)}")
    return MODES[name]
