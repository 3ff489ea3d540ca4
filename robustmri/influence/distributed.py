"""Influence over training samples split across the ranks of a process group (``torchrun``).

One meaning whatever the number of ranks: every rank extracts the penultimate features of its
own contiguous shard of the training and validation samples with the same weights and
BatchNorm statistics (the caller broadcasts rank 0's network first). Everything the solver
needs is a sum over samples, so it is all-reduced instead of gathering features:

- the validation gradient v = (1/N_val) sum_j g_j (each rank adds its shard's sum);
- the Hessian H = (1/N) sum_i kron(...) (``exact``) or its products H V (``cg``).

Every rank then solves the same small [C(d + 1)] system, and the per-sample scores of each
shard are all-gathered in rank order, which is the order of the samples: every rank holds
the same scores, ids and labels as one process would, up to the rounding of summing in
another order. ``lissa`` draws mini-batches from the whole training set, so for it the
(small, N x (d + 1)) features are all-gathered instead.

Self-influence (``self_influence=True``, the label audit) needs the same all-reduced Hessian
(for ``exact`` the very factor the solve uses) and then only each sample's own gradient: every
rank scores its shard against the whole set's ``H + lambda I`` and the scores are all-gathered
in the same order.
:func:`gather_rows` is the one all-gather of per-sample rows (losses, predictions) that the
label audit and PIE use for the rest.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from robustmri.influence.adapter import FinalLayer
from robustmri.influence.last_layer import SoftmaxLastLayer, augment
from robustmri.influence.scores import (InfluenceResult, collect_features, influence_scores, self_influence_factor,
                                        self_influence_of, solve)
from robustmri.influence.solvers import ExactSolver, LissaSolver, Solver


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``n`` items (the first ``n % world_size`` get one
    more)."""
    base, extra = divmod(int(n), int(world_size))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """``tensor`` reduced over the ranks (sum unless ``op``), a new tensor on ``tensor``'s device; ``tensor`` itself
    without a process group. A CPU tensor (the solver's float64 sums live on the CPU) travels through this
    process's GPU when the backend is NCCL, which has no CPU transport."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
    reduced = tensor.to(on, copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM if op is None else op)
    return reduced.to(tensor.device)


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``tensor`` concatenated in rank order (shards of unequal length allowed), on the CPU.

    With contiguous shards (:func:`shard_bounds`) rank order is sample order. Collective.
    """
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tensor.detach().cpu())
    return torch.cat(parts)


class ShardedLastLayer(SoftmaxLastLayer):
    """:class:`SoftmaxLastLayer` on this rank's shard, whose Hessian and full-set products are the whole set's.

    ``n`` is the number of training samples over all ranks; :meth:`hessian` and :meth:`hvp`
    (without ``indices``) all-reduce the shards' sums, so every rank gets the same matrix.
    """

    def __init__(self, weight, bias, features, labels, n_total: int):
        super().__init__(weight, bias, features, labels)
        self.local_n, self.n = self.n, int(n_total)

    def hessian(self) -> torch.Tensor:
        return all_reduce(super().hessian())  # each shard's sum already divided by the global n

    def hvp(self, vector: torch.Tensor, indices=None) -> torch.Tensor:
        if indices is not None:
            raise NotImplementedError("mini-batch Hessian products need the whole training set on every rank")
        local = super().hvp(vector) * (self.local_n / self.n) if self.local_n else torch.zeros_like(vector)
        return all_reduce(local)


def compute_influence_sharded(model, train_batches, val_batches, solver: Solver | None = None,
                              device="cpu", self_influence: bool = False) -> InfluenceResult:
    """:func:`robustmri.influence.compute_influence` with this rank's shards of the training and validation sets.

    Every rank must call it (collective); every rank gets the whole result, in rank order.
    """
    final = FinalLayer.of(model)
    solver = solver or ExactSolver()
    train_features, train_labels, ids = collect_features(final, train_batches, device, "influence: training features")
    val_features, val_labels, _ = collect_features(final, val_batches, device, "influence: validation features")
    counts = all_reduce(torch.tensor([len(train_labels), len(val_labels)], dtype=torch.float64))
    n_train, n_val = int(counts[0]), int(counts[1])
    layer = final.layer
    if isinstance(solver, LissaSolver):  # samples mini-batches from the whole set: gather the features
        problem = SoftmaxLastLayer.from_linear(layer, gather_rows(train_features).double(), gather_rows(train_labels))
        local = SoftmaxLastLayer.from_linear(layer, train_features.double(), train_labels)
    else:
        problem = local = ShardedLastLayer(layer.weight, layer.bias, train_features.double(), train_labels, n_train)
    theta_problem = SoftmaxLastLayer(layer.weight, layer.bias, val_features.double(), val_labels)
    augmented = augment(val_features.double())
    v_sum = theta_problem.residuals(augmented, val_labels).T @ augmented if len(val_labels) else \
        torch.zeros_like(theta_problem.theta)
    v = all_reduce(v_sum) / n_val
    factor = self_influence_factor(solver, problem) if self_influence else None  # of the whole set's Hessian
    s = solve(solver, problem, v, factor)
    share = local.n / n_train  # 1, or the shard's share for lissa (whose ``local`` divides by the shard's n)
    scores = influence_scores(local, s) * share
    own = None if factor is None else gather_rows(self_influence_of(local, factor) * share)
    return InfluenceResult(gather_rows(scores.float()), gather_rows(ids), gather_rows(train_labels), s.float(),
                           v.float(), solver.damping, own)

