"""Train the multi-step teacher: plain DDPM eps-prediction on the base digits.

Standard epsilon objective (Ho et al. 2020) in the variance-exploding form of docs/design.md:
``t ~ U{0..T-1}``, ``x_t = x0 + sigma_t n``, loss ``|net(c_in x_t, t, y) - n|^2``, with the class
label replaced by the "no class" token with probability ``cond_drop`` so classifier-free guidance
is available. An exponential moving average of the weights is the teacher.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pso.schedules import DiscreteSchedule

from .model import EpsMLP, ModelConfig

__all__ = ["TeacherConfig", "train_teacher"]


@dataclass(frozen=True)
class TeacherConfig:
    """Teacher training settings (all part of the cache key)."""

    model: ModelConfig = ModelConfig()
    steps: int = 6000
    batch: int = 256
    lr: float = 2e-3
    ema: float = 0.998
    cond_drop: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"steps and batch must be >= 1, got steps={self.steps}, batch={self.batch}.")
        if not (0.0 < self.lr < 1.0 and 0.0 <= self.ema < 1.0 and 0.0 <= self.cond_drop < 1.0):
            raise ValueError(
                f"need 0 < lr < 1, 0 <= ema < 1, 0 <= cond_drop < 1; got lr={self.lr}, ema={self.ema}, "
                f"cond_drop={self.cond_drop}."
            )


def cosine_lr(step: int, total: int, warmup: int = 100) -> float:
    """Linear warm-up then cosine decay to 0, as a multiplier of the base lr."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_teacher(
    x: torch.Tensor, y: torch.Tensor, model_sampling: DiscreteSchedule, config: TeacherConfig,
    make_net: Callable[[ModelConfig], EpsMLP] = EpsMLP,
) -> tuple[EpsMLP, list[float]]:
    """Train the teacher on clean images ``x`` with labels ``y``.

    ``make_net(model_config)`` builds the network (the task's conditioning; default the digits').
    Shapes: x (N, C, H, W) in [-1, 1], y (N,) int64. Returns the EMA network (eval mode, no grad)
    and the loss every 100 steps.
    """
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # parameter init only; every draw below uses `gen`
    net = make_net(config.model)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, config.steps))
    sigmas = model_sampling.sigmas
    n_t = sigmas.numel()
    losses = []
    for step in range(config.steps):
        idx = torch.randint(0, x.shape[0], (config.batch,), generator=gen)
        x0, yb = x[idx], y[idx].clone()
        yb[torch.rand(config.batch, generator=gen) < config.cond_drop] = net.num_classes
        t = torch.randint(0, n_t, (config.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sigmas[t]
        x_t = model_sampling.noise_scaling(sigma, noise, x0)
        eps = net(model_sampling.calculate_input(sigma, x_t), t.float(), yb)
        loss = (eps - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1.0 - config.ema)
        if step % 100 == 0:
            losses.append(float(loss.detach()))
    return ema.eval(), losses
