"""Metrics of generated digits, calibrated on real images.

One small classifier (the *judge*) is trained here on real training images of both styles, with a
20-way output (digit x style). It gives:

- ``on_target``: fraction of samples the judge calls target style (probability summed over digits
  > 0.5). The judge is trained with random blur and noise on both styles, so that smeared ink does
  not count as "bold": style, not blur, decides (blur is the sharpness column's job).
- ``class_acc``: fraction of samples whose most likely digit (summed over styles) is the label the
  sample was conditioned on; collapse or illegible samples lower it.
- ``fd``: Frechet distance (Heusel et al. 2017, the FID formula) between the judge's penultimate
  features (64-d) of the samples and of the real held-out target images. Real-vs-real reference
  rows in the table give its floor at this sample size.
- ``sharpness``: mean absolute 4-neighbour Laplacian of the images (background padding), divided by
  the same number for the real held-out target images: 1.0 = as sharp as real target digits,
  < 1 blurrier, > 1 noisier or over-contrasted.
- ``out_of_range`` (JSON only): fraction of pixels with ``|x| > 1.1`` (real images have none);
  over-contrasted, blocky samples show up here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .data import IMAGE_SHAPE, NUM_CLASSES, DigitSplits

__all__ = ["Judge", "JudgeConfig", "evaluate", "frechet_distance", "laplacian_energy", "train_judge"]


@dataclass(frozen=True)
class JudgeConfig:
    """Training settings of the judge (part of the cache key)."""

    hidden: int = 256
    features: int = 64
    steps: int = 2000
    batch: int = 256
    lr: float = 2e-3
    max_blur: float = 1.0
    max_noise: float = 0.15
    seed: int = 0


class Judge(nn.Module):
    """MLP classifier over the pixels -> ``2 * num_classes`` logits (index ``2 * class + style``,
    style 1 = target). Digits: 64 pixels -> 20 logits.

    Shapes: forward x (B, *image_shape) -> logits (B, 2 * num_classes); features x -> (B, features).
    """

    def __init__(self, config: JudgeConfig = JudgeConfig(), image_shape: tuple[int, ...] = IMAGE_SHAPE,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(image_shape), config.hidden), nn.ReLU(),
            nn.Linear(config.hidden, config.features), nn.ReLU(),
        )
        self.head = nn.Linear(config.features, 2 * num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


_BLUR = torch.tensor([1.0, 2.0, 1.0])
_BLUR = (_BLUR[:, None] * _BLUR[None, :] / 16.0).view(1, 1, 3, 3)


def blur(x: torch.Tensor) -> torch.Tensor:
    """3x3 binomial blur of each channel with background (-1) padding. Shapes: (B, C, H, W) -> same."""
    c = x.shape[1]
    return nn.functional.conv2d(nn.functional.pad(x + 1.0, (1, 1, 1, 1)), _BLUR.expand(c, 1, 3, 3),
                                groups=c) - 1.0


def _augment(x: torch.Tensor, config: JudgeConfig, gen: torch.Generator) -> torch.Tensor:
    """Random blur amount in [0, max_blur] and Gaussian noise std in [0, max_noise]."""
    b = x.shape[0]
    a = torch.rand(b, 1, 1, 1, generator=gen) * config.max_blur
    s = torch.rand(b, 1, 1, 1, generator=gen) * config.max_noise
    return (1 - a) * x + a * blur(x) + s * torch.randn(x.shape, generator=gen)


def train_judge(splits: DigitSplits, config: JudgeConfig = JudgeConfig(),
                num_classes: int = NUM_CLASSES) -> tuple[Judge, dict[str, float]]:
    """Train the judge on the training splits of both styles.

    Returns the judge (eval mode) and its held-out accuracies (``digit_acc``, ``style_acc``) on the
    clean test images of both styles.
    """
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # parameter init only
    x = torch.cat([splits.base_train_x, splits.target_train_x])
    y = torch.cat([2 * splits.base_train_y, 2 * splits.target_train_y + 1])
    judge = Judge(config, tuple(x.shape[1:]), num_classes)
    opt = torch.optim.Adam(judge.parameters(), lr=config.lr)
    for _ in range(config.steps):
        idx = torch.randint(0, x.shape[0], (config.batch,), generator=gen)
        loss = nn.functional.cross_entropy(judge(_augment(x[idx], config, gen)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    judge.eval().requires_grad_(False)
    xt = torch.cat([splits.base_test_x, splits.target_test_x])
    yt = torch.cat([splits.base_test_y, splits.target_test_y])
    st = torch.cat([torch.zeros_like(splits.base_test_y), torch.ones_like(splits.target_test_y)])
    digit, style = _decide(judge(xt), num_classes)
    return judge, {"digit_acc": float((digit == yt).float().mean()),
                   "style_acc": float((style == st).float().mean())}


def _decide(logits: torch.Tensor, num_classes: int = NUM_CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """Class (summed over styles) and style (summed over classes, 1 = target) decisions.

    Shapes: logits (B, 2 * num_classes) -> class (B,), style (B,).
    """
    p = logits.softmax(dim=1).view(-1, num_classes, 2)
    return p.sum(dim=2).argmax(dim=1), (p.sum(dim=1)[:, 1] > 0.5).long()


def laplacian_energy(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute 4-neighbour Laplacian per image, background (-1) padding.

    Shapes: x (B, C, H, W) -> (B,) (mean over channels and pixels).
    """
    p = nn.functional.pad(x + 1.0, (1, 1, 1, 1))
    centre = p[:, :, 1:-1, 1:-1]
    lap = p[:, :, :-2, 1:-1] + p[:, :, 2:, 1:-1] + p[:, :, 1:-1, :-2] + p[:, :, 1:-1, 2:] - 4 * centre
    return lap.abs().flatten(1).mean(dim=1)


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula).

    ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``. Shapes: f1 (N1, D), f2 (N2, D).
    """
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    # A small ridge keeps sqrtm well defined when a ReLU feature is dead (constant) in a set.
    ridge = np.eye(f1.shape[1]) * 1e-6
    s1, s2 = np.cov(f1, rowvar=False) + ridge, np.cov(f2, rowvar=False) + ridge
    covmean = np.real(linalg.sqrtm(s1 @ s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@dataclass(frozen=True)
class Reference:
    """What samples are compared with: the judge, real target features, real target sharpness."""

    judge: Judge
    target_features: np.ndarray
    target_laplacian: float
    #: task-specific metrics: name -> fn(samples) -> per-sample scores (averaged); e.g. shapes' stripes
    extra: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)


def make_reference(judge: Judge, splits: DigitSplits,
                   extra: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> Reference:
    """Reference statistics from the held-out real target images."""
    with torch.no_grad():
        feats = judge.features(splits.target_test_x).double().numpy()
        lap = float(laplacian_energy(splits.target_test_x).mean())
    return Reference(judge, feats, lap, dict(extra or {}))


@torch.no_grad()
def evaluate(samples: torch.Tensor, labels: torch.Tensor, ref: Reference) -> dict[str, float]:
    """All metrics of a batch of samples.

    Shapes: samples (N, C, H, W), labels (N,) int64 (the conditioning class of each sample).
    Returns the :data:`METRICS` keys.
    """
    x = samples.float()
    if not bool(torch.isfinite(x).all()):
        return dict.fromkeys((*METRICS, *ref.extra), math.nan)
    digit, style = _decide(ref.judge(x), ref.judge.num_classes)
    clamped = x.clamp(-1.0, 1.0)
    return {
        "on_target": float(style.float().mean()),
        "fd": frechet_distance(ref.judge.features(x).double().numpy(), ref.target_features),
        "fd_clamped": frechet_distance(ref.judge.features(clamped).double().numpy(), ref.target_features),
        "sharpness": float(laplacian_energy(x).mean()) / ref.target_laplacian,
        "sharpness_clamped": float(laplacian_energy(clamped).mean()) / ref.target_laplacian,
        "class_acc": float((digit == labels).float().mean()),
        "out_of_range": float((x.abs() > 1.1).float().mean()),
        **{name: float(fn(x).mean()) for name, fn in ref.extra.items()},
    }


#: The keys :func:`evaluate` returns. ``*_clamped``: the same metric on samples clamped to [-1, 1]
#: (what a user sees once an image is saved): out-of-range pixels can flip an FD verdict.
METRICS = ("on_target", "fd", "fd_clamped", "sharpness", "sharpness_clamped", "class_acc", "out_of_range")
