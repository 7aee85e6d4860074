"""A tiny class-conditional eps-prediction denoiser in the DDPM discrete formulation.

The network ``EpsMLP(x_in, t, y) -> eps`` is a residual MLP over the 64 pixels with a sinusoidal
timestep embedding and a class embedding (class ``NUM_CLASSES`` is the "no class" token used for
classifier-free guidance). :class:`EpsDenoiser` turns it into the ``denoiser(x, sigma, cond) -> x0``
of docs/design.md exactly as ComfyUI's ``EPS`` model sampling does:

    c_in = 1 / sqrt(sigma^2 + 1),  t = model_sampling.timestep(sigma),
    eps = net(c_in * x, t, cond),  x0 = x - sigma * eps,

with ``x = x0 + sigma * noise`` (variance exploding form). The schedule is SD/SDXL's scaled-linear
1000-step DDPM schedule (``pso.schedules.DiscreteSchedule()``), the one DMD2 was distilled on, so
the few-step timesteps 999/749/499/249 are DMD2's.

Why an MLP and not a conv UNet: at 8x8 a residual MLP is a good denoiser and ~30x cheaper per
sample on a CPU than a UNet with useful width, which keeps the whole benchmark under 15 minutes on
two cores. All its weights are ``nn.Linear`` layers, which ``pso.lora`` adapts (target "all_linear").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pso.schedules import DiscreteSchedule, alphas_cumprod

from .data import IMAGE_SHAPE, NUM_CLASSES

__all__ = ["EpsDenoiser", "EpsMLP", "ModelConfig", "make_schedule", "timestep_embedding"]


def make_schedule() -> DiscreteSchedule:
    """SD / SDXL's 1000-step scaled-linear schedule (beta 0.00085 .. 0.012), eps prediction."""
    return DiscreteSchedule(alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012), prediction="eps")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM / ldm.

    Shapes: t (B,) -> (B, dim) float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


@dataclass(frozen=True)
class ModelConfig:
    """Width and depth of :class:`EpsMLP`."""

    width: int = 256
    depth: int = 3
    emb_dim: int = 128

    def __post_init__(self) -> None:
        for name in ("width", "depth", "emb_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name}={value!r} must be an int >= 1.")
        if self.emb_dim % 2:
            raise ValueError(f"ModelConfig.emb_dim={self.emb_dim} must be even (sin and cos halves).")


class _Block(nn.Module):
    """Pre-norm residual MLP block with an additive conditioning projection."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.cond = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Shapes: h (B, W), c (B, W) -> (B, W)."""
        a = nn.functional.silu(self.fc1(self.norm(h)) + self.cond(c))
        return h + self.fc2(a)


class EpsMLP(nn.Module):
    """``net(x_in, t, y) -> eps``: residual MLP over the flattened image.

    Conditioning: ``y`` (B,) int64 class indices in [0, num_classes] (num_classes = unconditional).
    Without ``tokens`` each class has its own embedding (the digits). With ``tokens`` (a
    (num_classes + 1, L) table of word ids, 0 = padding, last row the empty caption) a class is
    embedded as the sum of its caption's word embeddings plus a learned "empty caption" vector where
    the caption is empty: the model reads words, so "red circle" and "red square" share "red".

    ``noise_skip``: when the image has more values than the MLP is wide (shapes: 768 > 384) the
    network cannot pass the noise through its narrower hidden layer, and eps, which is mostly that
    noise, is out of reach (a first shapes teacher stalled at eps MSE 0.5 at every level). With
    ``noise_skip`` the prediction is ``gate(t) * x_in + MLP(x_in, t, y)``: a learned per-timestep
    scalar carries the noise, the MLP the image's low-dimensional content.

    Shapes: x_in (B, *image_shape) (already scaled by c_in), t (B,) timesteps in [0, 999], y (B,);
    returns eps (B, *image_shape).
    """

    def __init__(self, config: ModelConfig = ModelConfig(), image_shape: tuple[int, ...] = IMAGE_SHAPE,
                 num_classes: int = NUM_CLASSES, tokens: torch.Tensor | None = None,
                 vocab_size: int = 0, noise_skip: bool = False) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        n_pix = math.prod(image_shape)
        w = config.width
        self.t_mlp = nn.Sequential(nn.Linear(config.emb_dim, w), nn.SiLU(), nn.Linear(w, w))
        if tokens is None:
            self.y_emb = nn.Embedding(num_classes + 1, w)
        else:
            if tokens.shape[0] != num_classes + 1 or int(tokens.max()) > vocab_size:
                raise ValueError(f"tokens {tuple(tokens.shape)} (max id {int(tokens.max())}) must be "
                                 f"({num_classes + 1}, L) with ids <= vocab_size={vocab_size}.")
            self.register_buffer("tokens", tokens.clone(), persistent=False)
            self.word_emb = nn.Embedding(vocab_size + 1, w, padding_idx=0)
            self.empty_emb = nn.Parameter(torch.zeros(w))
        self.inp = nn.Linear(n_pix, w)
        self.blocks = nn.ModuleList(_Block(w) for _ in range(config.depth))
        self.out_norm = nn.LayerNorm(w)
        self.out = nn.Linear(w, n_pix)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        if noise_skip:  # eps = gate(t) * x_in + MLP: see the class docstring
            self.skip_gate = nn.Linear(w, 1)
            nn.init.zeros_(self.skip_gate.weight)
            nn.init.zeros_(self.skip_gate.bias)

    def cond_embedding(self, y: torch.Tensor) -> torch.Tensor:
        """Shapes: y (B,) -> (B, width)."""
        if not hasattr(self, "word_emb"):
            return self.y_emb(y)
        words = self.tokens[y]  # (B, L)
        empty = (words == 0).all(dim=1, keepdim=True).to(self.empty_emb.dtype)
        return self.word_emb(words).sum(dim=1) + empty * self.empty_emb

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        temb = self.t_mlp(timestep_embedding(t, self.config.emb_dim))
        c = nn.functional.silu(temb + self.cond_embedding(y))
        h = self.inp(x_in.flatten(1))
        for block in self.blocks:
            h = block(h, c)
        eps = self.out(nn.functional.silu(self.out_norm(h))).view(x_in.shape)
        if hasattr(self, "skip_gate"):
            gate = self.skip_gate(nn.functional.silu(temb)).view(-1, *([1] * (x_in.dim() - 1)))
            eps = eps + gate * x_in
        return eps


class EpsDenoiser:
    """``denoiser(x, sigma, cond) -> x0`` over an :class:`EpsMLP` (ComfyUI's EPS arithmetic).

    ``cond`` is the (B,) int64 class labels (``net.num_classes`` = unconditional). With
    ``guidance != 1`` the prediction is classifier-free guided:
    ``eps = eps_u + guidance * (eps_c - eps_u)`` (two network calls).

    Shapes: x (B, *image_shape), sigma (B,) > 0, cond (B,); returns x0 like x.
    """

    def __init__(self, net: EpsMLP, model_sampling: DiscreteSchedule, guidance: float = 1.0) -> None:
        self.net = net
        self.model_sampling = model_sampling
        self.guidance = float(guidance)

    def eps(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The (guided) eps prediction. Shapes as the class."""
        ms = self.model_sampling
        x_in = ms.calculate_input(sigma, x)
        t = ms.timestep(sigma).float()
        if self.guidance == 1.0:
            return self.net(x_in, t, cond)
        uncond = torch.full_like(cond, self.net.num_classes)
        both = self.net(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([cond, uncond]))
        eps_c, eps_u = both.chunk(2)
        return eps_u + self.guidance * (eps_c - eps_u)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.model_sampling.calculate_denoised(sigma, self.eps(x, sigma, cond), x)
