"""Sampling with the project's samplers (``pso.samplers``) and the timestep sets of the benchmark.

Teacher: deterministic Euler in sigma space (= DDIM for an eps model) on a timestep grid that
passes through the student's timesteps, so one teacher run yields ODE pairs at all of them.
Student: the re-noising policy of Eq. 4 (``policy="renoise"``, DMD2 / LCM) on DMD2's 4-step
timesteps 999/749/499/249; 2-step sampling uses 999/499 and 1-step 999, so every evaluated step
count uses timesteps the student was distilled on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pso.samplers import Trajectory, initial_latent, sample_trajectory
from pso.schedules import DiscreteSchedule, few_step_sigmas

from .data import IMAGE_SHAPE

__all__ = ["STUDENT_TIMESTEPS", "draw_noise", "sample", "teacher_timesteps"]

#: Few-step timestep sets, by number of steps (4 = DMD2's ``FEW_STEP_TIMESTEPS["dmd2"]``).
STUDENT_TIMESTEPS: dict[int, tuple[int, ...]] = {1: (999,), 2: (999, 499), 4: (999, 749, 499, 249)}


def teacher_timesteps(steps_per_segment: int, anchors: Sequence[int] = STUDENT_TIMESTEPS[4]) -> list[int]:
    """Decreasing integer timesteps from ``anchors[0]`` to 0 that contain every anchor, with
    ``steps_per_segment`` (near-)equal steps between consecutive anchors and from the last to 0.

    Example: anchors 999/749/499/249, 5 per segment -> 999, 949, ..., 749, ..., 249, 199, ..., 0
    (20 steps; the final step then goes from t = 0 to sigma = 0).
    """
    points = [*anchors, 0]
    out: list[int] = []
    for a, b in zip(points, points[1:], strict=False):
        seg = torch.linspace(a, b, steps_per_segment + 1).round().long().tolist()
        out.extend(seg[:-1])
    out.append(0)
    return out


def draw_noise(n: int, generator: torch.Generator, shape: tuple[int, ...] = IMAGE_SHAPE) -> torch.Tensor:
    """Standard normal starting noise. Shapes: returns (n, *shape) (default the digits' (1, 8, 8))."""
    return torch.randn((n, *shape), generator=generator)


def sample(
    denoiser: Callable,
    noise: torch.Tensor,
    labels: torch.Tensor,
    timesteps: Sequence[int],
    model_sampling: DiscreteSchedule,
    policy: str,
    generator: torch.Generator | None,
    grad: bool = False,
) -> Trajectory:
    """Sample from pure noise (ComfyUI's txt2img start: ``max_denoise``) with ``pso.samplers``.

    Shapes: noise (B, 1, 8, 8) standard normal, labels (B,) int64; returns a Trajectory over
    ``len(timesteps)`` steps (``.final`` is (B, 1, 8, 8)).
    """
    sigmas = few_step_sigmas(model_sampling, list(timesteps))
    x = initial_latent(model_sampling, sigmas, noise, max_denoise=True)
    return sample_trajectory(denoiser, x, sigmas, labels, model_sampling, policy, generator, grad=grad)
