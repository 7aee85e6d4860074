"""The benchmark's tasks: what data, image shape and conditioning a run uses.

``digits`` (``data.py``): sklearn's grey 8x8 digits, one class token per image, target ``bold``.
``shapes`` (``shapes.py``): 16x16 RGB coloured shapes conditioned on caption words, target
``striped``. Both run through the same harness (``run.py --task``), the same methods, metrics and
report, so a default has to win on both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import data, shapes
from .data import DigitSplits
from .model import EpsMLP, ModelConfig

__all__ = ["TASKS", "Task", "make_net"]


@dataclass(frozen=True)
class Task:
    """A benchmark task.

    ``tokens``: None for class-token conditioning (the class index is embedded), else a
    (num_classes + 1, L) word-id table (0 = padding; the last row is the empty caption) and the
    models embed the caption's words (``model.EpsMLP``). ``model``: the denoiser's size for this task.
    ``cache_prefix``: prepended to cached network names ("" for digits keeps the earlier caches).
    """

    name: str
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    styles: tuple[str, ...]
    default_style: str
    load: Callable[..., DigitSplits]
    model: ModelConfig
    tokens: Callable[[], torch.Tensor] | None = None
    vocab_size: int = 0
    cache_prefix: str = ""
    judge_hidden: int = 256
    n_eval: int = 1000  # samples per evaluation (a multiple of num_classes)
    noise_skip: bool = False  # model.EpsMLP's noise_skip (part of the cache key where set)
    teacher_steps: int = 6000
    distill_trajectories: int = 12288
    distill_steps: int = 6000
    #: extra metrics (metrics.Reference.extra): name -> per-sample score of samples
    metrics: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    #: the online methods' rewards of final samples (higher is better), by name; the first is the default;
    #: none: no online rows
    rewards: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)

    def reward(self, name: str | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The reward ``name`` (None: the task's first), or None for a task without rewards."""
        if not self.rewards:
            return None
        if name is None:
            return next(iter(self.rewards.values()))
        if name not in self.rewards:
            raise ValueError(f"task {self.name} has no reward {name!r}; choose one of {list(self.rewards)}")
        return self.rewards[name]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


TASKS: dict[str, Task] = {
    "digits": Task(
        name="digits", image_shape=data.IMAGE_SHAPE,
        class_names=tuple(f"digit {d}" for d in range(data.NUM_CLASSES)),
        styles=tuple(sorted(data.STYLES)), default_style="bold", load=data.load_splits,
        model=ModelConfig()),
    "shapes": Task(
        name="shapes", image_shape=shapes.IMAGE_SHAPE, class_names=shapes.CAPTIONS,
        styles=tuple(sorted(shapes.STYLES)), default_style="striped", load=shapes.load_splits,
        model=ModelConfig(width=384, depth=3), tokens=shapes.caption_tokens,
        vocab_size=len(shapes.VOCAB), cache_prefix="shapes-", judge_hidden=384, n_eval=960,
        noise_skip=True, teacher_steps=5000, distill_trajectories=8192, distill_steps=5000,
        metrics={"stripes": shapes.stripe_score, "bright": shapes.brightness_score,
                 "centre": shapes.centre_score},
        rewards={"stripes": shapes.stripe_score, "brightness": shapes.brightness_score,
                 "centre": shapes.centre_score}),
}


def make_net(task: Task, config: ModelConfig | None = None) -> EpsMLP:
    """A fresh denoiser network for ``task`` (``config`` defaults to the task's size)."""
    return EpsMLP(config or task.model, task.image_shape, task.num_classes,
                  task.tokens() if task.tokens is not None else None, task.vocab_size, task.noise_skip)


def arch_key(task: Task) -> tuple:
    """What of the task's network is not in its ModelConfig, for the cache keys (digits: nothing)."""
    return ({"noise_skip": True},) if task.noise_skip else ()
