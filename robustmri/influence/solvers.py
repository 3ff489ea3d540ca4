"""Inverse-Hessian-vector products s = (H + lambda I)^-1 v on the final layer, interchangeable by name.

Every solver is a :class:`Solver`: called with a :class:`SoftmaxLastLayer` problem and a
right-hand side v of shape [C, d + 1], it returns s of the same shape, and ``damping`` is
the lambda it effectively solves with. ``exact`` (Cholesky of the closed-form Hessian) is
the default; ``lissa`` is the authors' stochastic recursion; ``cg`` conjugate gradients.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch

from robustmri.influence.last_layer import SoftmaxLastLayer

#: The damping lambda of the exact and CG solvers when none is given: the one default of the
#: library, read by the bundle's ``influence_damping``, the label review and MONAI Label.
DEFAULT_DAMPING = 0.01


@runtime_checkable
class Solver(Protocol):
    """What every inverse-Hessian strategy offers."""

    damping: float

    def __call__(self, problem: SoftmaxLastLayer, v: torch.Tensor) -> torch.Tensor: ...


class ExactSolver:
    """(H + lambda I)^-1 v by Cholesky of the closed-form Hessian (float64)."""

    def __init__(self, damping: float = DEFAULT_DAMPING):
        if damping <= 0:
            raise ValueError("damping must be positive: the last-layer Hessian is singular")
        self.damping = float(damping)

    def factor(self, problem: SoftmaxLastLayer) -> torch.Tensor:
        """Cholesky factor of H + lambda I, for solving many right-hand sides with ``torch.cholesky_solve``."""
        hessian = problem.hessian().double()
        hessian.diagonal().add_(self.damping)
        return torch.linalg.cholesky(hessian)

    def __call__(self, problem: SoftmaxLastLayer, v: torch.Tensor) -> torch.Tensor:
        return self.solve_factored(self.factor(problem), v)

    @staticmethod
    def solve_factored(factor: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(H + lambda I)^-1 v from the Cholesky factor :meth:`factor` returned."""
        solution = torch.cholesky_solve(v.double().reshape(-1, 1), factor)
        return solution.reshape(v.shape).to(v.dtype)


class LissaSolver:
    """LiSSA (Agarwal et al. 2017) as the authors ran it.

    h_t = v + (1 - damp) h_{t-1} - H_B h_{t-1} / scale with mini-batches B drawn with
    replacement, s = h_T / scale. Its fixed point is (H + damp * scale * I)^-1 v, so the
    effective damping is ``damp * scale`` (2.5 in the reference setting), not ``damp``.
    """

    def __init__(self, damp: float = 0.05, scale: float = 50.0, batch_size: int = 10, depth: int | None = None,
                 repeats: int = 1, seed: int = 0):
        self.damp, self.scale, self.batch_size = float(damp), float(scale), int(batch_size)
        self.depth, self.repeats, self.seed = depth, int(repeats), int(seed)

    @property
    def damping(self) -> float:
        return self.damp * self.scale

    def __call__(self, problem: SoftmaxLastLayer, v: torch.Tensor) -> torch.Tensor:
        depth = self.depth or max(1, math.ceil(problem.n / self.batch_size))
        generator = torch.Generator().manual_seed(self.seed)
        estimates = []
        for _ in range(self.repeats):
            h = v.clone()
            for _ in range(depth):
                batch = torch.randint(problem.n, (self.batch_size,), generator=generator)
                h = v + (1 - self.damp) * h - problem.hvp(h, batch) / self.scale
            estimates.append(h / self.scale)
        return torch.stack(estimates).mean(0)


class ConjugateGradientSolver:
    """(H + lambda I)^-1 v by conjugate gradients on full-batch Hessian-vector products."""

    def __init__(self, damping: float = DEFAULT_DAMPING, tol: float = 1e-10, max_iter: int = 1000):
        if damping <= 0:
            raise ValueError("damping must be positive: the last-layer Hessian is singular")
        self.damping, self.tol, self.max_iter = float(damping), float(tol), int(max_iter)

    def __call__(self, problem: SoftmaxLastLayer, v: torch.Tensor) -> torch.Tensor:
        def apply(x):
            return problem.hvp(x) + self.damping * x

        x = torch.zeros_like(v)
        r = v.clone()
        p = r.clone()
        rr = (r * r).sum()
        threshold = self.tol ** 2 * (v * v).sum()  # stop at relative residual norm tol
        for _ in range(self.max_iter):
            if rr <= threshold:
                break
            ap = apply(p)
            alpha = rr / (p * ap).sum()
            x = x + alpha * p
            r = r - alpha * ap
            rr_new = (r * r).sum()
            p = r + (rr_new / rr) * p
            rr = rr_new
        return x


#: The strategies by name (the bundle's ``influence_solver``).
SOLVERS = {"exact": ExactSolver, "lissa": LissaSolver, "cg": ConjugateGradientSolver}


def make_solver(name: str | Solver = "exact", **kwargs) -> Solver:
    """A solver by name with its keyword arguments (``influence_solver_args``); a solver object is returned as it is."""
    if not isinstance(name, str):
        return name
    if name not in SOLVERS:
        raise ValueError(f"unknown inverse-Hessian solver {name!r}; expected one of {sorted(SOLVERS)}")
    return SOLVERS[name](**kwargs)
