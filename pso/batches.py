"""Pair batches with references of bounded age: the data side of offline and full PSO.

A pair set holds P pairs ``(target i, reference i, prompt i)``; the references live in a
:class:`pso.references.ReferencePool` so they can be re-sampled from the current model.
:class:`PairBatchSource` draws the micro-batches of each optimizer step and, with ``max_age = K``,
re-samples every reference the step uses that was sampled ``K`` or more steps ago, right before the
step, from the current model (the trainer's ``refresh_fn``, called before every step). With
``K = 1`` every pair is trained against a reference the current model has just sampled (the notes'
and ``bench/digits``' "fresh every step": a pool as large as the batch, never reused), at the cost of
one few-step sampling of the batch per step; re-sampling the whole pool every K steps instead (the
old default) costs P samplings per refresh and trains on references up to K steps stale.

Draw order (reproducible from one generator): per step, the indices of all micro-batches first
(``randperm(P)[:B]`` each, or ``randint`` when B > P), then the re-sampling noise of the stale rows.
With ``max_age = 0`` nothing is re-sampled and the indices are drawn micro-batch by micro-batch.

Step-count mixing (``sub_schedules``, e.g. the 1- and 2-step schedules inside DMD2's 4 steps): a
model trained only against its 4-step samples drifts at 1 and 2 steps, because at the highest noise
level target and reference inputs are indistinguishable and the pairwise loss drives the prediction
along (target - reference) with nothing to stop it but the sigmoid, while 4-step samples barely
respond to that prediction. Half of the steps (drawn per step) instead sample the batch's references
with one of the sub-schedules and train at that schedule's levels (``PairBatch.sigmas``), so the
1-step output is itself the reference at its own level and the drive vanishes once it matches the
targets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .methods import PairBatch
from .references import ReferencePool
from .samplers import Denoiser

__all__ = ["PairBatchSource"]

#: ``targets(idx, cond, generator) -> (B, C, H, W)`` for pair indices idx (B,) and their conds.
TargetFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Generator], torch.Tensor]


def _indexable(targets) -> bool:
    return hasattr(targets, "__getitem__") and hasattr(targets, "shape")


class PairBatchSource:
    """The trainer's ``batch_source`` (and, with ``max_age > 0``, its ``refresh_fn`` via :meth:`prepare`).

    Args:
        pool: the references (P rows) and their conds; row i is pair i's reference.
        targets: (P, C, H, W) target latents (pair i's target is row i; a tensor or a streamed
            ``pso.dataset.LatentColumn``, indexed one batch at a time), or a :data:`TargetFn`.
        batch_size: pairs per micro-batch (B); grad_accum: micro-batches per optimizer step.
        max_age: re-sample a used reference once it is this many steps old (0 = never).
        needs_traj: hand the reference trajectories to the loss (Eq. 5).
        device: where the batch's tensors go.
    """

    def __init__(self, pool: ReferencePool, targets: torch.Tensor | TargetFn, batch_size: int,
                 grad_accum: int = 1, max_age: int = 0, needs_traj: bool = False,
                 device: torch.device | str = "cpu",
                 sub_schedules: Sequence[torch.Tensor] = ()):
        if batch_size < 1 or grad_accum < 1 or max_age < 0:
            raise ValueError(f"need batch_size >= 1, grad_accum >= 1, max_age >= 0; got "
                             f"batch_size={batch_size}, grad_accum={grad_accum}, max_age={max_age}")
        if sub_schedules and (max_age != 1 or needs_traj):
            raise ValueError(f"step-count mixing (sub_schedules) samples every step's references fresh "
                             f"with the step's schedule: it needs max_age=1 (got {max_age}) and a "
                             f"forward-noised loss "
                             f"(needs_traj={needs_traj})")
        if _indexable(targets) and targets.shape[0] != len(pool):
            raise ValueError(f"{targets.shape[0]} targets for {len(pool)} references; pair i is row i of "
                             "both")
        self.pool, self.targets = pool, targets
        self.batch_size, self.grad_accum, self.max_age = batch_size, grad_accum, max_age
        self.needs_traj, self.device = needs_traj, torch.device(device)
        self.sub_schedules = list(sub_schedules)
        self._sigmas: torch.Tensor | None = None  # this step's schedule when mixing step counts
        self._queue: list[torch.Tensor] = []
        self._prepared_step: int | None = None
        self.resampled = 0  # references re-sampled so far (cost accounting)

    def _draw(self, generator: torch.Generator) -> torch.Tensor:
        n = len(self.pool)
        if self.batch_size <= n:
            return torch.randperm(n, generator=generator)[: self.batch_size]
        return torch.randint(0, n, (self.batch_size,), generator=generator)

    def prepare(self, denoiser: Denoiser, step: int, generator: torch.Generator) -> None:
        """Before optimizer step ``step``: draw its micro-batches and re-sample their stale references
        with ``denoiser`` (the current model), no gradients."""
        self._queue = [self._draw(generator) for _ in range(self.grad_accum)]
        self._prepared_step = step
        self._sigmas = self._draw_schedule(generator)
        rows = torch.cat(self._queue)
        # a sub-schedule step needs references of that schedule: all of its rows, whatever their age
        if self._sigmas is not None:
            stale = torch.unique(rows)
        else:
            stale = self.pool.stale_rows(rows, step, self.max_age)
        with torch.no_grad():
            self.pool.refresh_rows(denoiser, stale, generator, step, sigmas=self._sigmas)
        self.resampled += int(stale.numel())

    def _draw_schedule(self, generator: torch.Generator) -> torch.Tensor | None:
        """None (the pool's own schedule) on half the steps; else one of the sub-schedules, uniformly."""
        if not self.sub_schedules:
            return None
        u = float(torch.rand((), generator=generator))
        if u < 0.5:
            return None
        k = len(self.sub_schedules)
        return self.sub_schedules[min(int((u - 0.5) * 2 * k), k - 1)]

    def __call__(self, step: int, generator: torch.Generator) -> PairBatch:
        if self.max_age:
            if self._prepared_step != step or not self._queue:
                raise RuntimeError(f"PairBatchSource with max_age={self.max_age}: prepare() must run before "
                                   f"step {step} (pass it as the trainer's refresh_fn, every step)")
            idx = self._queue.pop(0)
        else:
            idx = self._draw(generator)
        pool = self.pool
        cond = None if pool.cond is None else pool.cond[idx.to(pool.cond.device)]
        if _indexable(self.targets):  # a tensor, or a streamed column (pso.dataset.LatentColumn)
            target = self.targets[idx.to(self.targets.device)]
        else:
            target = self.targets(idx, cond, generator)
        traj = pool.trajectory.select(idx.to(pool.trajectory.latents.device)).to(self.device) \
            if self.needs_traj else None
        return PairBatch(target=target.to(self.device),
                         reference=pool.reference[idx.to(pool.reference.device)].to(self.device),
                         reference_traj=traj, cond=cond, sigmas=self._sigmas)
