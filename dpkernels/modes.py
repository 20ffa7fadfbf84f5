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
    fsdp:         for models sharded with FSDP2's ``fully_shard``: each rank clips its own samples with
                  norms from its own activations (never summed across ranks); FSDP reduces the
                  clipped gradients and Opacus's FSDP optimizer adds the noise once
    """

    name: str
    passes: int
    linear_norm: str
    description: str
    fsdp: bool = False


MODES = {
    m.name: m
    for m in (
        Mode("ghost", 2, "auto", "norms without per-sample gradients, two backward passes"),
        Mode("bk", 1, "auto", "bookkeeping: one backward pass, clipped gradients from cached (A, G)"),
        Mode("flash", 2, "flash", "ghost with fused Triton norm kernels for Linear layers"),
        Mode("flash_bk", 1, "flash", "bookkeeping with fused Triton norm kernels for Linear layers"),
        Mode("ghost_fsdp", 2, "auto", "ghost on an FSDP2-sharded model", fsdp=True),
        Mode("flash_fsdp", 2, "flash", "flash on an FSDP2-sharded model", fsdp=True),
        Mode("bk_fsdp", 1, "auto", "bookkeeping on an FSDP2-sharded model", fsdp=True),
        Mode("flash_bk_fsdp", 1, "flash", "flash_bk on an FSDP2-sharded model", fsdp=True),
    )
}


# The modes of one process (the *_fsdp modes need an FSDP2-sharded model and a process group).
SINGLE_PROCESS_MODES = tuple(sorted(name for name, mode in MODES.items() if not mode.fsdp))


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"unknown dpkernels mode {name!r}; choose one of {sorted(MODES)}")
    return MODES[name]
