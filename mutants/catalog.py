"""Seeded bugs: realistic one-mistake changes that the test suite or the CPU gates must catch.

Each mutant is (file, exact original text, replacement): the original must occur exactly once in
the file (tests/test_mutants.py checks this in every run of the suite, so a mutant that drifted
from the code is noticed at once), and ``tests`` are the pytest arguments (a subset of the suite,
to stay fast) whose run must FAIL on the mutated tree.  ``python mutants/run.py`` (``tox -e
mutants``) applies each to a temporary copy of the tree and reports killed / total.
"""

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Mutant:
    name: str
    mistake: str  # what is wrong, and what it breaks
    file: str  # from the repository root
    original: str  # exact text, found exactly once in ``file``
    replacement: str
    tests: Tuple[str, ...]  # pytest arguments whose run must fail on the mutant


# pytest arguments that run the CPU cost gates (fast mode) of some step benchmarks
def gates(select: str) -> Tuple[str, ...]:
    return ("benchmarks/bench_steps.py", "--benchmark-disable", "--benchmark-compare", "-k", select)


OPTIMIZER = "dpkernels/optimizer.py"
SHARED_TESTS = ("tests/test_model_mechanisms.py", "-k", "used_several_times and float64")  # tied and reused parameters
CPU_KERNEL_TESTS = ("tests/test_kernels.py", "-m", "not interpreter and not gpu", "-k", "not subprocess")

MUTANTS = (
    Mutant(
        "clip-eps-1e-3",
        "the implementation's clipping epsilon 1e-3 instead of Opacus's 1e-6: every clipped sample is scaled 0.1% too low",
        "dpkernels/clipping/coefficients.py",
        "CLIP_EPS = 1e-6",
        "CLIP_EPS = 1e-3",
        ("tests/test_oracle.py",),
    ),
    Mutant(
        "no-min-1",
        "c_i = C / (||g_i|| + eps) without min(1, .): samples below the clip norm are scaled up",
        "dpkernels/clipping/coefficients.py",
        "return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)",
        "return max_grad_norm / (norms + CLIP_EPS)",
        ("tests/test_oracle.py",),
    ),
    Mutant(
        "noise-group-0-only",
        "noise only for param_groups[0]: the other groups are stepped with their clipped sums, no noise",
        OPTIMIZER,
        "        params = self.params\n        summed = [p.summed_grad for p in params]",
        "        params = [p for p in self.param_groups[0][\"params\"] if p.requires_grad]\n        summed = [p.summed_grad for p in params]",
        ("tests/test_optimizer_params.py::test_every_param_group_gets_its_noise_and_division",),
    ),
    Mutant(
        "scale-group-0-only",
        "division by the expected batch size only for param_groups[0]: the other groups step B times too far",
        OPTIMIZER,
        "grads = [p.grad for p in self.params]",
        "grads = [p.grad for p in self.param_groups[0][\"params\"] if p.requires_grad]",
        ("tests/test_optimizer_params.py::test_every_param_group_gets_its_noise_and_division",),
    ),
    Mutant(
        "params-at-make-private-only",
        "accumulation (so noise) only for parameters the optimizer held at make_private (Opacus gave them "
        "summed_grad then): a parameter group added later is not noised",
        OPTIMIZER,
        "        params = self.params\n        grown = ",
        "        params = [p for p in self.params if hasattr(p, \"summed_grad\")]\n        grown = ",
        ("tests/test_optimizer_params.py::test_add_param_group_of_a_parameter_the_model_clips",),
    ),
    Mutant(
        "unfrozen-parameter-stepped",
        "a parameter unfrozen after make_private (any parameter of the model) is stepped with its unclipped gradient",
        OPTIMIZER,
        "elif id(p) not in self.clipped:",
        "elif id(p) not in self.names:",
        ("tests/test_optimizer_params.py::test_a_parameter_unfrozen_after_make_private_is_refused",),
    ),
    Mutant(
        "frozen-parameter-stepped",
        "a parameter frozen after make_private keeps its zero gradient: momentum and weight decay step it, with no noise",
        OPTIMIZER,
        "                if not p.requires_grad:\n                    p.grad = None\n",
        "                if not p.requires_grad:\n                    pass\n",
        ("tests/test_optimizer_params.py::test_a_parameter_frozen_after_make_private_is_not_stepped",),
    ),
    Mutant(
        "noise-sigma-c-b",
        "noise std sigma C B instead of sigma C: B times the intended noise",
        OPTIMIZER,
        "self.noise_multiplier) * self.max_grad_norm",
        "self.noise_multiplier) * self.max_grad_norm * self.expected_batch_size",
        ("tests/test_optimizer_params.py::test_every_param_group_gets_its_noise_and_division",),
    ),
    Mutant(
        "no-division-by-b",
        "mean reduction without the division by the expected batch size",
        OPTIMIZER,
        "torch._foreach_div_(grads, self.expected_batch_size * self.accumulated_iterations)",
        "torch._foreach_div_(grads, self.accumulated_iterations)",
        ("tests/test_optimizer_params.py::test_every_param_group_gets_its_noise_and_division",),
    ),
    Mutant(
        "bias-norm-sum-of-squares",
        "the Linear bias norm as sum_t ||g_t||^2 instead of ||sum_t g_t||^2",
        "dpkernels/layers/linear.py",
        "out = {bias: sum_sq(self.b)} if self.b is not None else {}",
        "out = {bias: sum_sq(self.G)} if self.b is not None else {}",
        ("tests/test_layers_linear.py",),
    ),
    Mutant(
        "embedding-padding-counted",
        "positions holding padding_idx counted in the Embedding norm (PyTorch gives that row no gradient)",
        "dpkernels/layers/embedding.py",
        "    return ids != module.padding_idx",
        "    return torch.ones_like(ids, dtype=torch.bool)",
        ("tests/test_layers_embedding.py",),
    ),
    Mutant(
        "tiled-last-tile-dropped",
        "the CPU tiling's psg loop over T stops at the last full tile: a partial last tile is dropped",
        "dpkernels/kernels/tiled.py",
        "            for t0 in range(0, T, cfg.BT):\n                rows = slice(t0, min(t0 + cfg.BT, T))\n                tile",
        "            for t0 in range(0, T // cfg.BT * cfg.BT, cfg.BT):\n                rows = slice(t0, min(t0 + cfg.BT, T))\n                tile",
        CPU_KERNEL_TESTS,
    ),
    Mutant(
        "triton-t-loop-off-by-one",
        "the Triton psg kernel's loop over T chunks runs floor(n_t / BT) times: a partial last chunk is dropped",
        "dpkernels/kernels/linear_norm.py",
        "for i_t in range(0, tl.cdiv(n_t, BT)):",
        "for i_t in range(0, n_t // BT):",
        ("tests/test_kernels.py::test_interpreter_tests_pass_in_a_subprocess",),
    ),
    Mutant(
        "weight-grads-not-skipped",
        "autograd's weight gradients computed in every norms pass (one more 2 B T d p matmul per Linear and step)",
        "dpkernels/layers/linear.py",
        "        if ctx.owner.wants_weight_grads():",
        "        if ctx.owner.wants_weight_grads() or ctx.needs_input_grad[1]:",
        gates("linear-T128-B4 and fp32 and (ghost or bk)"),
    ),
    Mutant(
        "bk-holds-inputs",
        "bookkeeping keeps each Linear's A and G after forming its per-sample gradients: more memory at the step's peak",
        "dpkernels/layers/linear.py",
        "            self.A = self.G = None  # W and b are all that is still needed\n",
        "",
        gates("fp32 and bk"),
    ),
    Mutant(
        "tied-norm-no-cross-term",
        "a parameter used several times (tied Embedding / LM head, a layer called twice) gets ||g_i||^2 as the sum "
        "of its uses' squared norms, without 2 <g_u,i, g_v,i>: its per-sample norms, so the clip coefficients, are wrong",
        "dpkernels/clipping/module.py",
        "        self._add_cross_terms()\n",
        "",
        SHARED_TESTS,
    ),
    Mutant(
        "tied-pair-uses-per-layer",
        "a parameter's uses counted as its layer's calls: a Linear called twice still gets its cross term, but a "
        "weight tied across two layers called once each (Embedding and LM head) does not",
        "dpkernels/clipping/module.py",
        "            self._uses[p] = self._uses.get(p, 0) + 1",
        "            self._uses[p] = k + 1",
        SHARED_TESTS,
    ),
    Mutant(
        "tied-gram-not-transposed",
        "a tied pair whose Embedding gradient arrives first (the tied Linear called before the lookup): its "
        "[T_u, T_v] one-hot Gram is the [T_v, T_u] one left untransposed (the same shape when T_u == T_v), so the "
        "cross term pairs the wrong positions",
        "dpkernels/layers/shared.py",
        "        return left_gram(v, u, dt).transpose(1, 2)",
        "        return left_gram(v, u, dt)",
        SHARED_TESTS,
    ),
    Mutant(
        "mixed-forms-cross-term-index",
        "the cross term of a materialised use with a factored one (bookkeeping: a Linear called on a long and a short "
        "sequence) sums (L_t M) . R_s over every s, t instead of s = t",
        "dpkernels/layers/shared.py",
        'return torch.einsum("btr,brc,btc->b", f.L.to(dt), M, R)',
        'return torch.einsum("btr,brc,bsc->b", f.L.to(dt), M, R)',
        SHARED_TESTS,
    ),
)
