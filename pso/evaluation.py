"""Reward evaluation of few-step models at several step counts (the paper's Table 1 measurement).

The paper reports, for each model and step count (1, 2, 4), the mean reward of a fixed prompt set
sampled with fixed seeds. :func:`step_timesteps` gives the timestep set of each step count for the
usual few-step schedules; :class:`EvalScores` collects per-prompt scores and renders the table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import schedules

__all__ = ["STEP_SCHEDULES", "EvalScores", "parse_prompts", "parse_steps", "step_timesteps"]

#: Timestep sets per step count, name -> (function steps -> timesteps, description).
STEP_SCHEDULES: dict[str, tuple[Callable[[int], list[int]], str]] = {
    "trailing": (schedules.trailing_timesteps,
                 "DMD2 / Lightning / Hyper-SD: 999, 749, 499, 249 at 4 steps, 999, 499 at 2, 999 at 1"),
    "lcm": (schedules.lcm_timesteps, "LCM / LCM-LoRA: 999, 759, 499, 259 at 4 steps"),
    "turbo": (schedules.turbo_timesteps, "SDXL-Turbo as SDTurboScheduler: 999, 899, 799, 699 at 4 steps"),
}


def step_timesteps(schedule: str, steps: int) -> list[int]:
    """The integer timesteps of ``schedule`` at ``steps`` steps (decreasing)."""
    if schedule not in STEP_SCHEDULES:
        raise ValueError(f"unknown step schedule {schedule!r}; valid: {sorted(STEP_SCHEDULES)}")
    return list(STEP_SCHEDULES[schedule][0](steps))


def parse_steps(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4] (order kept, duplicates removed); every count an int in [1, 1000]."""
    out: list[int] = []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            n = int(part)
        except ValueError:
            raise ValueError(f"step counts {text!r}: {part!r} is not an integer; write e.g. 1,2,4") from None
        if not 1 <= n <= 1000:
            raise ValueError(f"step counts {text!r}: {n} is outside 1..1000")
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError(f"step counts {text!r} holds no number; write e.g. 1,2,4")
    return out


def parse_prompts(text: str) -> list[str]:
    """One prompt per non-empty line (whitespace stripped); at least one."""
    prompts = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not prompts:
        raise ValueError("the prompt list is empty: write one prompt per line")
    return prompts


@dataclass
class EvalScores:
    """Per-prompt reward scores of every (model, steps, reward) cell.

    scores[(model, steps, reward)]: (P,) float32, one score per prompt (same prompts and seeds in
    every cell).
    """

    models: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    rewards: list[str] = field(default_factory=list)
    scores: dict[tuple[str, int, str], torch.Tensor] = field(default_factory=dict)

    def add(self, model: str, steps: int, reward: str, scores: torch.Tensor) -> None:
        for seq, item in ((self.models, model), (self.steps, steps), (self.rewards, reward)):
            if item not in seq:
                seq.append(item)
        self.scores[(model, steps, reward)] = scores.detach().float().cpu().reshape(-1)

    def mean_sem(self, model: str, steps: int, reward: str) -> tuple[float, float]:
        """Mean and standard error of the mean over prompts (0 for one prompt)."""
        s = self.scores[(model, steps, reward)].double()
        sem = float(s.std(unbiased=True) / math.sqrt(s.numel())) if s.numel() > 1 else 0.0
        return float(s.mean()), sem

    def markdown(self, digits: Sequence[int] | None = None) -> str:
        """A markdown table: one row per (model, steps), one column per reward, "mean ± sem"."""
        head = "| model | steps | " + " | ".join(self.rewards) + " |"
        sep = "| --- | ---: | " + " | ".join("---:" for _ in self.rewards) + " |"
        rows = [head, sep]
        for m in self.models:
            for n in self.steps:
                cells = []
                for k, r in enumerate(self.rewards):
                    if (m, n, r) not in self.scores:
                        cells.append("")
                        continue
                    mean, sem = self.mean_sem(m, n, r)
                    d = digits[k] if digits else _digits(self.scores[(m, n, r)])
                    cells.append(f"{mean:.{d}f} ± {sem:.{d}f}")
                rows.append(f"| {m} | {n} | " + " | ".join(cells) + " |")
        return "\n".join(rows)


def _digits(scores: torch.Tensor) -> int:
    """Decimals that show a score's scale: 4 below 1 (HPSv2 ~0.27), 3 below 10, else 2."""
    top = float(scores.abs().max()) if scores.numel() else 0.0
    return 4 if top < 1 else 3 if top < 10 else 2
