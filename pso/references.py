"""A pool of reference samples that can be re-sampled from the current model during training.

Offline PSO (Eq. 6) with references sampled once from the starting model goes stale: as the model
moves, its own samples stop looking like the pool, and the notes' CPU experiment saw over-contrasted,
blocky results. Re-sampling the references from the *current* model every few steps (the trainer's
``ref_refresh_every``) keeps them on-policy; full PSO (Eq. 5) needs on-policy reference
trajectories by definition. The pool is part of the trainer's checkpoint (``state_dict``), so a
resumed run continues with exactly the references it had.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch

from .samplers import Denoiser, Trajectory, cat_trajectories, initial_latent, sample_trajectory

logger = logging.getLogger(__name__)


class ReferencePool:
    """References (clean latents and, optionally, their trajectories) for P pairs.

    Shapes: reference (P, C, H, W); cond (P, ...) tensor or None; trajectory of P samples or None;
    sigmas (N+1,). ``policy`` is the sampler policy used when re-sampling.

    ``extra_sigmas``: other schedules (e.g. the 1- and 2-step ones of the same model) to re-sample
    with as well: row i uses schedule ``i % (1 + len(extra_sigmas))`` (``sigmas`` first), so each
    step count a user runs has references of its own (the notes and the digits benchmark saw only
    the sampled step count protected). With extra schedules no trajectory is kept (rows would have
    different lengths): they serve forward-noised losses (Eq. 6), not Eq. 5.
    """

    def __init__(self, reference: torch.Tensor, cond: torch.Tensor | None, sigmas: torch.Tensor, policy: str,
                 model_sampling: Any, trajectory: Trajectory | None = None, chunk_size: int = 8,
                 extra_sigmas: Sequence[torch.Tensor] = ()):
        if trajectory is not None and trajectory.batch_size != reference.shape[0]:
            raise ValueError(f"{reference.shape[0]} references but a trajectory of {trajectory.batch_size}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.reference = reference
        self.trajectory = trajectory
        self.cond = cond
        self.sigmas = sigmas
        self.policy = policy
        self.model_sampling = model_sampling
        self.chunk_size = chunk_size
        self.schedules = [sigmas, *extra_sigmas]
        self.refreshes = 0
        # the optimizer step each reference was sampled at (the given ones: by the starting model, step 0)
        self.born = torch.zeros(reference.shape[0], dtype=torch.long)

    def __len__(self) -> int:
        return int(self.reference.shape[0])

    def refresh(self, denoiser: Denoiser, generator: torch.Generator, step: int = 0) -> None:
        """Re-sample every reference with ``denoiser`` (the current model, adapter on), no gradients.

        Starting noise and per-step noise come from ``generator`` only (schedule by schedule, chunk
        by chunk); the pool is processed in chunks of ``chunk_size`` to bound memory. ``step``: the
        optimizer step the references are sampled at (their age is counted from it).
        """
        self.refresh_rows(denoiser, torch.arange(len(self)), generator, step)
        self.refreshes += 1
        logger.debug("re-sampled %d references, %d schedule(s), refresh %d", len(self), len(self.schedules),
                     self.refreshes)

    def refresh_rows(self, denoiser: Denoiser, rows: torch.Tensor, generator: torch.Generator,
                     step: int, sigmas: torch.Tensor | None = None) -> None:
        """Re-sample the references of ``rows`` (distinct pool indices) with ``denoiser``, no gradients.

        Row ``i`` uses schedule ``i % len(self.schedules)``, or ``sigmas`` for every row when given (a
        sub-schedule: no trajectories are kept then); draws come from ``generator`` in schedule order,
        then chunk by chunk. The rows' age restarts at ``step``. Shapes: rows (R,) int64.
        """
        schedules = self.schedules if sigmas is None else [sigmas]
        k = len(schedules)
        rows = rows.to(torch.long).cpu()
        if rows.numel() == 0:
            return
        keep_traj = k == 1 and sigmas is None
        finals = self.reference.clone()
        traj_parts: list[tuple[torch.Tensor, Trajectory]] = []
        for j, sched in enumerate(schedules):
            rows_j = rows[rows % k == j]
            for start in range(0, rows_j.numel(), self.chunk_size):
                chunk = rows_j[start:start + self.chunk_size]
                ref = self.reference[chunk.to(self.reference.device)]
                noise = torch.randn(ref.shape, generator=generator, device=generator.device).to(ref)
                sig = sched.to(ref.device)
                cond = None if self.cond is None else self.cond[chunk.to(self.cond.device)]
                traj = sample_trajectory(denoiser, initial_latent(self.model_sampling, sig, noise), sig, cond,
                                         self.model_sampling, self.policy, generator, grad=False)
                finals[chunk.to(finals.device)] = traj.final.detach()
                if keep_traj:
                    traj_parts.append((chunk, traj.detach()))
        self.reference = finals
        if keep_traj:
            self.trajectory = _with_rows(self.trajectory, traj_parts, len(self))
        else:
            self.trajectory = None
        self.born[rows] = step

    def stale_rows(self, rows: torch.Tensor, step: int, max_age: int) -> torch.Tensor:
        """The distinct rows among ``rows`` whose references are ``max_age`` or more steps old at ``step``
        (sampled by a model ``max_age`` or more optimizer steps behind). Shapes: rows (R,) -> (S,)."""
        rows = torch.unique(rows.to(torch.long).cpu())
        return rows[(step - self.born[rows]) >= max_age]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"reference": self.reference.detach().cpu(), "refreshes": self.refreshes,
                                 "born": self.born.clone()}
        if self.trajectory is not None:
            state["trajectory"] = {k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                                   for k, v in self.trajectory.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.reference.device
        self.reference = state["reference"].to(device)
        self.refreshes = int(state["refreshes"])
        born = state.get("born")  # absent in checkpoints written before ages were kept
        self.born = torch.zeros(len(self), dtype=torch.long) if born is None else born.to(torch.long).cpu()
        traj = state.get("trajectory")
        self.trajectory = None if traj is None else Trajectory.from_state_dict(traj).to(device)


def _with_rows(base: Trajectory | None, parts: Sequence[tuple[torch.Tensor, Trajectory]],
               size: int) -> Trajectory | None:
    """``base`` with the trajectories of ``parts`` ((rows, trajectory of len(rows))) written into
    their rows; a new trajectory when ``parts`` cover all ``size`` rows; None when ``base`` is None
    and rows are missing (forward-noised losses need no trajectories)."""
    if not parts:
        return base
    rows = torch.cat([r for r, _ in parts])
    new = cat_trajectories([t for _, t in parts])
    if base is None:
        if rows.numel() != size or not bool((rows.sort().values == torch.arange(size)).all()):
            return None
        order = torch.argsort(rows)
        return new.select(order.to(new.latents.device))
    fields = {}
    for name in ("latents", "x0", "noise", "mean"):
        t = getattr(base, name).clone()
        t[rows.to(t.device)] = getattr(new, name).to(t)
        fields[name] = t
    return dataclasses.replace(base, **fields)
