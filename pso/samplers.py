"""Few-step samplers that record their trajectories, and the Gaussian policies they define.

A distilled model's sampler is a Markov chain over noisy latents (the paper's MDP, Sec. 2.1 and
Appendix A.2): at step n it predicts x0 at ``sigmas[n]`` and draws the next latent at
``sigmas[n+1]`` from a Gaussian ``N(mean, std^2 I)``. A *step policy* is the pure function
``(x, x0, sigma, sigma_next, model_sampling) -> (mean, std)`` of that Gaussian. The policies here
reproduce ComfyUI 0.3.75's samplers (``comfy/k_diffusion/sampling.py``) operation for operation, so
a recorded trajectory is bit for bit the one ComfyUI samples from the same noise, and
``latents[:, n+1] == mean[:, n] + std[n] * noise[:, n]`` holds exactly. Latents are float32 or
float64, as in ComfyUI's samplers: with bf16 / fp16 tensors PyTorch rounds a 0-d float32 *left*
operand to the tensor's dtype first, so ``std * z`` and ComfyUI's ``z * std`` would differ.

Randomness comes only from the ``torch.Generator`` (or the step-noise sampler) passed in; gradients
are off unless asked for. The host layer passes the running ComfyUI's own ``default_noise_sampler``
(:data:`NoiseSamplerFactory`), because how it seeds step noise changed between versions (since
ComfyUI v0.8.0 a CPU latent's generator is seeded with ``seed + 1``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from .schedules import check_sigmas, is_rectified_flow

logger = logging.getLogger(__name__)

__all__ = [
    "POLICIES",
    "Policy",
    "Trajectory",
    "cat_trajectories",
    "recorded_trajectory",
    "ancestral_sigmas",
    "euler_ancestral_rf_step",
    "euler_ancestral_step",
    "euler_step",
    "gaussian_log_prob",
    "get_policy",
    "initial_latent",
    "is_max_denoise",
    "renoise_step",
    "require_gaussian_policy",
    "sample_trajectory",
    "seeded_noise_sampler",
    "transition_log_probs",
]

#: ``denoiser(x, sigma, cond) -> x0``; x (B, ...), sigma (B,), returns (B, ...) (docs/design.md).
Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
#: ``noise(sigma, sigma_next) -> z``: one step's standard normal noise, shaped like the starting latent.
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``factory(x, seed) -> NoiseSampler``, the signature of ComfyUI's ``default_noise_sampler``.
NoiseSamplerFactory = Callable[[torch.Tensor, "int | None"], NoiseSampler]
#: A step policy: ``step(x, x0, sigma, sigma_next, model_sampling) -> (mean, std)`` of the next latent.
PolicyStepFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]
]


def _append_dims(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    """k-diffusion's ``append_dims``: () -> (1,) * ndim; (B,) -> (B, 1, ..., 1)."""
    return sigma[(...,) + (None,) * (ndim - sigma.ndim)]


def _zero(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.new_zeros(())


# --------------------------------------------------------------------------------------------
# Step policies (pure functions)
# --------------------------------------------------------------------------------------------
def ancestral_sigmas(sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k-diffusion / ComfyUI ``get_ancestral_step`` with eta = 1.

    ``sigma_up = min(sigma_next, sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2))``,
    ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``, so ``sigma_down^2 + sigma_up^2 = sigma_next^2``.
    The paper's Appendix A.2 (Eq. 14) prints these two swapped (its ``sigma_hat`` would be imaginary).

    Shapes: sigma, sigma_next () -> (sigma_down (), sigma_up ()).
    """
    sigma_up = torch.minimum(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def renoise_step(
    x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, model_sampling: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predict-and-renoise policy of DMD2 / LCM (paper Eq. 4; ComfyUI ``sample_lcm``).

    Eq. 4, ``x_{t_{n-1}} = sqrt(abar) f(x_{t_n}) + sqrt(1 - abar) z``, divided by sqrt(abar) (the
    variance-exploding frame) is ``x0 + sigma_next z``; for rectified flow ``(1 - s) x0 + s z``.
    Both are ``model_sampling.noise_scaling(sigma_next, z, x0)``, which is what ComfyUI evaluates:
    ``mean = noise_scaling(sigma_next, 0, x0)``, ``std = noise_scaling(sigma_next, 1, 0)``.
    Final step (sigma_next = 0): ``(x0, 0)``. (Log-densities in the two frames differ by a
    constant that cancels in every log-ratio PSO uses.)

    Shapes: x, x0 (B, ...); sigma, sigma_next (); returns mean (B, ...), std ().
    """
    if not bool(sigma_next > 0):
        return x0, _zero(sigma_next)
    mean = model_sampling.noise_scaling(sigma_next, torch.zeros_like(x0), x0)
    std = model_sampling.noise_scaling(sigma_next, sigma_next.new_ones(()), sigma_next.new_zeros(()))
    return mean, std


def euler_ancestral_step(
    x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, model_sampling: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler ancestral step, eta = 1 (SDXL-Turbo; paper Appendix A.2, Eq. 14; ComfyUI
    ``sample_euler_ancestral``).

    ``d = (x - x0) / sigma``, ``mean = x + d (sigma_down - sigma)``, ``std = sigma_up`` with
    :func:`ancestral_sigmas`; when ``sigma_down == 0`` (the final step) ``(x0, 0)``. On a
    rectified-flow model ComfyUI runs :func:`euler_ancestral_rf_step` instead, and so does this.

    Shapes: x, x0 (B, ...); sigma, sigma_next (); returns mean (B, ...), std ().
    """
    if is_rectified_flow(model_sampling):
        return euler_ancestral_rf_step(x, x0, sigma, sigma_next, model_sampling)
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next)
    if bool(sigma_down == 0):
        return x0, _zero(sigma_next)
    d = (x - x0) / _append_dims(sigma, x.ndim)
    mean = x + d * (sigma_down - sigma)
    return mean, sigma_up


def euler_ancestral_rf_step(
    x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, model_sampling: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified-flow Euler ancestral step, eta = 1 (ComfyUI ``sample_euler_ancestral_RF``).

    ``sigma_down = sigma_next (1 + (sigma_next / sigma - 1))`` (= sigma_next^2 / sigma),
    ``a = 1 - sigma_next``, ``a_down = 1 - sigma_down``, ``r = sigma_down / sigma``;
    ``mean = (a / a_down) (r x + (1 - r) x0)``,
    ``std = sqrt(sigma_next^2 - sigma_down^2 a^2 / a_down^2)``; final step ``(x0, 0)``.
    With a perfect x0 this keeps the marginal ``(1 - s) x0 + s n`` at every level.

    Shapes: x, x0 (B, ...); sigma, sigma_next (); returns mean (B, ...), std ().
    """
    if bool(sigma_next == 0):
        return x0, _zero(sigma_next)
    downstep_ratio = 1 + (sigma_next / sigma - 1)  # ComfyUI multiplies the bracket by eta = 1 (exact)
    sigma_down = sigma_next * downstep_ratio
    alpha_ip1 = 1 - sigma_next
    alpha_down = 1 - sigma_down
    renoise_coeff = (sigma_next**2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
    ratio = sigma_down / sigma
    mean = (alpha_ip1 / alpha_down) * (ratio * x + (1 - ratio) * x0)
    return mean, renoise_coeff


def euler_step(
    x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, model_sampling: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic Euler step (ComfyUI ``sample_euler``, s_churn = 0; Lightning, Hyper-SD, schnell).

    ``mean = x + (x - x0) / sigma * (sigma_next - sigma)``, ``std = 0``: no Gaussian policy, so
    Eqs. 5 and 7 cannot use it; Eq. 6 can. The final step is also this formula (not x0), as in ComfyUI.

    Shapes: x, x0 (B, ...); sigma, sigma_next (); returns mean (B, ...), std () = 0.
    """
    d = (x - x0) / _append_dims(sigma, x.ndim)
    mean = x + d * (sigma_next - sigma)
    return mean, _zero(sigma_next)


@dataclass(frozen=True)
class Policy:
    """A registered step policy.

    Attributes:
        name: registry key.
        step: the :data:`PolicyStepFn`.
        stochastic: whether it defines a Gaussian policy (some step has std > 0).
        draws_noise: ``(sigma, sigma_next) -> bool``, whether ComfyUI's sampler draws noise on that
            step (it draws nothing on the final step); keeps the generator stream in step with it.
        comfy_sampler: the ComfyUI sampler name it reproduces.
        description: one line for users.
    """

    name: str
    step: PolicyStepFn
    stochastic: bool
    draws_noise: Callable[[torch.Tensor, torch.Tensor], bool]
    comfy_sampler: str
    description: str


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy(
            name="renoise",
            step=renoise_step,
            stochastic=True,
            draws_noise=lambda s, sn: bool(sn > 0),
            comfy_sampler="lcm",
            description="predict x0, re-noise to the next level (Eq. 4; DMD2, LCM)",
        ),
        Policy(
            name="euler_ancestral",
            step=euler_ancestral_step,
            stochastic=True,
            draws_noise=lambda s, sn: bool(ancestral_sigmas(s, sn)[0] != 0),
            comfy_sampler="euler_ancestral",
            description="Euler ancestral, eta 1 (Appendix A.2; SDXL-Turbo)",
        ),
        Policy(
            name="euler_ancestral_rf",
            step=euler_ancestral_rf_step,
            stochastic=True,
            draws_noise=lambda s, sn: bool(sn != 0),
            comfy_sampler="euler_ancestral (on a rectified-flow model)",
            description="rectified-flow Euler ancestral, eta 1",
        ),
        Policy(
            name="euler",
            step=euler_step,
            stochastic=False,
            draws_noise=lambda s, sn: False,
            comfy_sampler="euler",
            description="deterministic Euler (Lightning, Hyper-SD, FLUX.1-schnell); no Gaussian policy",
        ),
    )
}

_STOCHASTIC = sorted(k for k, p in POLICIES.items() if p.stochastic)


def get_policy(name: str, model_sampling: Any = None) -> Policy:
    """Look a policy up; with ``model_sampling``, resolve it as ComfyUI would run it.

    ComfyUI's "euler_ancestral" runs the rectified-flow variant on a CONST model, so
    ``get_policy("euler_ancestral", flow_ms)`` returns "euler_ancestral_rf"; "euler_ancestral_rf"
    on an eps / v model is refused (its formulas assume sigma in [0, 1]).
    """
    if name not in POLICIES:
        raise ValueError(f"unknown sampler policy {name!r}; valid ones are {sorted(POLICIES)}.")
    if model_sampling is None:
        return POLICIES[name]
    const = is_rectified_flow(model_sampling)
    if name == "euler_ancestral" and const:
        logger.debug("euler_ancestral on a rectified-flow model runs euler_ancestral_rf, as ComfyUI does")
        return POLICIES["euler_ancestral_rf"]
    if name == "euler_ancestral_rf" and not const:
        raise ValueError(
            f"policy 'euler_ancestral_rf' is for rectified-flow (CONST) models, but the model sampling is "
            f"{type(model_sampling).__name__}; use 'euler_ancestral' for eps / v models."
        )
    return POLICIES[name]


# --------------------------------------------------------------------------------------------
# Trajectory
# --------------------------------------------------------------------------------------------
_TENSOR_FIELDS = ("sigmas", "latents", "x0", "noise", "mean", "std")
_FORMAT = "pso.trajectory/1"


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class Trajectory:
    """A batch of B sampled trajectories over N steps (docs/design.md).

    Attributes:
        sigmas: (N+1,) the noise levels; step n goes from ``sigmas[n]`` to ``sigmas[n+1]``.
        latents: (B, N+1, ...) index 0 the starting latent, index N the final sample.
        x0: (B, N, ...) the x0 predicted at each step.
        noise: (B, N, ...) the z drawn at each step (0 where none was drawn).
        mean: (B, N, ...) the policy's Gaussian mean at each step.
        std: (N,) the policy's standard deviation at each step (0: deterministic step).
        policy: the :data:`POLICIES` key that made it.

    Invariant: ``latents[:, n+1] == mean[:, n] + std[n] * noise[:, n]`` bit for bit (float32 /
    float64 latents, where ``std * noise == noise * std``, ComfyUI's order).
    """

    sigmas: torch.Tensor
    latents: torch.Tensor
    x0: torch.Tensor
    noise: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    policy: str

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown trajectory policy {self.policy!r}; valid ones are {sorted(POLICIES)}.")
        check_sigmas(self.sigmas, what="a trajectory's sigmas")
        n = self.sigmas.numel() - 1
        b = self.latents.shape[0] if self.latents.ndim >= 2 else -1
        rest = tuple(self.latents.shape[2:])
        expected = {"latents": (b, n + 1) + rest, "x0": (b, n) + rest, "noise": (b, n) + rest,
                    "mean": (b, n) + rest, "std": (n,)}
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(
                    f"Trajectory.{name} has shape {got}, expected {shape} "
                    f"(B={b}, N={n} from sigmas and latents)."
                )

    @property
    def num_steps(self) -> int:
        """N."""
        return self.sigmas.numel() - 1

    @property
    def batch_size(self) -> int:
        """B."""
        return self.latents.shape[0]

    @property
    def final(self) -> torch.Tensor:
        """The final samples, (B, ...)."""
        return self.latents[:, -1]

    def stochastic_steps(self) -> list[int]:
        """Indices n with ``std[n] > 0`` (the transitions that have a log-probability)."""
        return [int(i) for i in torch.nonzero(self.std > 0).flatten().tolist()]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Trajectory:
        return replace(self, **{k: fn(getattr(self, k)) for k in _TENSOR_FIELDS})

    def to(self, device: torch.device | str) -> Trajectory:
        """A copy with every tensor on ``device``."""
        return self._map(lambda t: t.to(device))

    def detach(self) -> Trajectory:
        """A copy with every tensor detached from the autograd graph."""
        return self._map(lambda t: t.detach())

    def select(self, batch_idx: int | slice | Sequence[int] | torch.Tensor) -> Trajectory:
        """The trajectories at ``batch_idx`` (an int keeps the batch dimension, size 1)."""
        idx: Any = batch_idx
        if isinstance(batch_idx, int) and not isinstance(batch_idx, bool):
            i = batch_idx % self.batch_size if -self.batch_size <= batch_idx < self.batch_size else None
            if i is None:
                raise IndexError(f"batch index {batch_idx} out of range for batch size {self.batch_size}.")
            idx = slice(i, i + 1)
        elif isinstance(batch_idx, (list, tuple)):
            idx = torch.as_tensor(batch_idx, dtype=torch.long, device=self.latents.device)
        per_sample = {k: getattr(self, k)[idx] for k in ("latents", "x0", "noise", "mean")}
        return replace(self, **per_sample)

    def state_dict(self) -> dict[str, torch.Tensor | str]:
        """Tensors (contiguous, detached) plus strings: tensors go to safetensors, strings to its
        metadata (``{k: v for k, v in sd.items() if isinstance(v, str)}``)."""
        out: dict[str, torch.Tensor | str] = {
            k: getattr(self, k).detach().contiguous() for k in _TENSOR_FIELDS
        }
        out["policy"] = self.policy
        out["format"] = _FORMAT
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor | str]) -> Trajectory:
        """Inverse of :meth:`state_dict` (accepts the tensors and metadata merged in one dict)."""
        missing = [k for k in (*_TENSOR_FIELDS, "policy") if k not in state]
        if missing:
            raise KeyError(f"trajectory state is missing {missing}; it has {sorted(state)}.")
        fmt = state.get("format", _FORMAT)
        if fmt != _FORMAT:
            raise ValueError(f"trajectory format {fmt!r} is not {_FORMAT!r}; re-record the trajectories.")
        kwargs = {f.name: state[f.name] for f in fields(cls)}
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
def is_max_denoise(model_sampling: Any, sigmas: torch.Tensor) -> bool:
    """ComfyUI's ``KSAMPLER.max_denoise``: the schedule starts at (or above) ``sigma_max``
    (relative tolerance 1e-5), i.e. from pure noise."""
    max_sigma = float(model_sampling.sigma_max)
    sigma = float(sigmas[0])
    return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma


def initial_latent(
    model_sampling: Any,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    latent_image: torch.Tensor | None = None,
    max_denoise: bool | None = None,
) -> torch.Tensor:
    """The latent at ``sigmas[0]`` as ComfyUI's KSAMPLER makes it:
    ``noise_scaling(sigmas[0], noise, latent_image, max_denoise)``.

    eps / v: ``latent + noise * sigmas[0]``, or ``latent + noise * sqrt(1 + sigmas[0]^2)`` with
    max_denoise (pure noise in the variance-preserving frame); const: ``s noise + (1 - s) latent``.

    Args:
        noise: (B, ...) standard normal noise.
        latent_image: (B, ...) the clean latent to start from (img2img); None -> zeros (txt2img).
        max_denoise: None decides as ComfyUI does (:func:`is_max_denoise`); True / False forces it
            (DMD2 1-step at t = 399 was trained on unit noise, which needs True).

    Returns:
        x: (B, ...) the starting latent for :func:`sample_trajectory`.
    """
    check_sigmas(sigmas)
    if latent_image is None:
        latent_image = torch.zeros_like(noise)
    if max_denoise is None:
        max_denoise = is_max_denoise(model_sampling, sigmas)
    return model_sampling.noise_scaling(sigmas[0].to(noise.device), noise, latent_image, max_denoise)


def seeded_noise_sampler(x: torch.Tensor, seed: int | None) -> NoiseSampler:
    """pso's own step-noise sampler for use without a host: ``torch.randn`` of x's shape, dtype and
    device from a generator on x's device seeded with ``seed``, one draw per call. (ComfyUI's
    ``default_noise_sampler`` did exactly this up to v0.8.0, and still does on GPUs; inside ComfyUI
    the node layer passes the running host's own function instead, never this one.)"""
    generator = None if seed is None else torch.Generator(device=x.device).manual_seed(int(seed))
    shape, dtype, layout, device = x.size(), x.dtype, x.layout, x.device

    def draw(sigma: Any, sigma_next: Any) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, layout=layout, device=device, generator=generator)

    return draw


def sample_trajectory(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Any,
    model_sampling: Any,
    policy: str,
    generator: torch.Generator | None,
    grad: bool = False,
    noise_sampler: NoiseSampler | None = None,
) -> Trajectory:
    """Run a few-step sampler and record its trajectory (the paper's reverse trajectory x^rho).

    Step n: ``x0 = denoiser(x, sigmas[n] * ones(B), cond)``, ``(mean, std) = policy(...)``,
    ``x = mean + z * std`` with ``z = torch.randn(x.shape, generator=generator, dtype, device)``
    drawn once per step, in step order, only where ComfyUI's sampler draws (stochastic policy, not
    the final step); or ``z = noise_sampler(sigmas[n], sigmas[n+1])`` when one is given. With the
    host's own ``default_noise_sampler(x, seed)`` (extra_args "seed") as ``noise_sampler`` the
    latents are bit-identical to what that host's sampler gives.

    Args:
        denoiser: ``denoiser(x, sigma, cond) -> x0``.
        x: (B, ...) float32 / float64, the latent at ``sigmas[0]`` (see :func:`initial_latent`).
        sigmas: (N+1,) strictly decreasing, >= 0 (normally ending in 0).
        cond: passed to the denoiser unchanged.
        model_sampling: ours or ComfyUI's.
        policy: a :data:`POLICIES` key (resolved with :func:`get_policy`).
        generator: the only source of randomness; may be None for a deterministic policy or when
            ``noise_sampler`` is given.
        grad: record the autograd graph (default off: ``torch.set_grad_enabled(False)``).
        noise_sampler: ``noise(sigma, sigma_next) -> z`` (B, ...), e.g. ComfyUI's
            ``default_noise_sampler(x, seed)`` built on this ``x``; replaces ``generator``.

    Returns:
        a :class:`Trajectory` with B trajectories of N steps.
    """
    pol = get_policy(policy, model_sampling)
    sigmas = check_sigmas(sigmas).to(x.device)
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"sample_trajectory needs a float32 or float64 latent, got {x.dtype}: ComfyUI's samplers run "
            "in float32 (the model casts internally), and a reduced-precision latent would make the "
            "recorded trajectory differ from ComfyUI's and mix dtypes inside it. Pass x.float(); the "
            "denoiser may still compute in half precision."
        )
    shape, dtype, device = x.shape, x.dtype, x.device  # ComfyUI's noise sampler fixes these at start
    s_in = x.new_ones([x.shape[0]])
    latents, x0s, noises, means, stds = [x], [], [], [], []
    with torch.set_grad_enabled(grad):
        for n in range(sigmas.numel() - 1):
            sigma, sigma_next = sigmas[n], sigmas[n + 1]
            x0 = denoiser(x, sigma * s_in, cond)
            mean, std = pol.step(x, x0, sigma, sigma_next, model_sampling)
            if pol.draws_noise(sigma, sigma_next) and noise_sampler is not None:
                z = noise_sampler(sigma, sigma_next)
                if z.shape != shape:
                    raise ValueError(f"the noise sampler returned shape {tuple(z.shape)} at step {n}; the "
                                     f"latent is {tuple(shape)} (build it on the starting latent x)")
                z = z.to(device=device, dtype=dtype)
            elif pol.draws_noise(sigma, sigma_next):
                if generator is None:
                    raise ValueError(
                        f"policy {pol.name!r} draws noise at step {n}: pass a torch.Generator or a noise "
                        "sampler (randomness is explicit in pso)."
                    )
                # drawn where the generator lives (a trainer's CPU generator with CUDA latents), then moved
                z = torch.randn(shape, generator=generator, dtype=dtype, device=generator.device).to(device)
            else:
                z = torch.zeros_like(mean)
            x = mean + z * std  # ComfyUI's operand order (equal to std * z in float32 / float64)
            latents.append(x)
            x0s.append(x0)
            noises.append(z)
            means.append(mean)
            stds.append(std)
        return Trajectory(
            sigmas=sigmas,
            latents=torch.stack(latents, dim=1),
            x0=torch.stack(x0s, dim=1),
            noise=torch.stack(noises, dim=1),
            mean=torch.stack(means, dim=1),
            std=torch.stack(stds),
            policy=pol.name,
        )


def recorded_trajectory(
    x: Sequence[torch.Tensor | None], x0: Sequence[torch.Tensor | None], noise: dict[int, torch.Tensor],
    final: torch.Tensor | None, sigmas: torch.Tensor, model_sampling: Any, policy: str
) -> Trajectory:
    """The trajectory of a sampling run another sampler made (the host's, recorded step by step), with
    each step's Gaussian from ``policy``: what PSO scores the run's steps with.

    Shapes: sigmas (N+1,); x[n] and x0[n] (B, C, H, W) before step n and its x0 prediction (None:
    not reported); noise[n] (B, C, H, W) the draw of step n where it drew one; final (B, C, H, W) the
    sampler's output. Returns a Trajectory with latents (B, N+1, C, H, W), x0 / noise / mean
    (B, N, C, H, W), std (N,). Raises RuntimeError where the recorded run is not the policy's
    (a step missing, noise drawn where the policy draws none or the other way round).
    """
    pol = get_policy(policy, model_sampling)
    n_steps = sigmas.numel() - 1
    missing = [n for n in range(n_steps) if x[n] is None]
    if missing or final is None:
        raise RuntimeError(
            f"PSO reference sampling: the host's sampler did not report steps {missing} of {n_steps} "
            f"(final latent {'missing' if final is None else 'present'}); it must call its callback "
            "once per step, as ComfyUI 0.3.75's samplers do."
        )
    with torch.inference_mode(False), torch.no_grad():
        sigmas = sigmas.detach().clone().to(final.device)
        means, stds, noises = [], [], []
        for n in range(n_steps):
            mean, std = pol.step(x[n], x0[n], sigmas[n], sigmas[n + 1], model_sampling)
            if pol.draws_noise(sigmas[n], sigmas[n + 1]) != (n in noise):
                drew = "drew" if n in noise else "drew no"
                raise RuntimeError(
                    f"PSO reference sampling: at step {n} (sigma {float(sigmas[n]):.6g} -> "
                    f"{float(sigmas[n + 1]):.6g}) the host's sampler {drew} noise but policy {pol.name!r} "
                    "expects the opposite; this host's sampler differs from the one PSO reproduces."
                )
            means.append(mean)
            stds.append(torch.as_tensor(std, dtype=sigmas.dtype, device=sigmas.device).reshape(()))
            noises.append(noise.get(n, torch.zeros_like(x[n])))
        return Trajectory(
            sigmas=sigmas,
            latents=torch.stack([*x, final], dim=1),
            x0=torch.stack(x0, dim=1),
            noise=torch.stack(noises, dim=1),
            mean=torch.stack(means, dim=1),
            std=torch.stack(stds),
            policy=pol.name,
        )


def cat_trajectories(trajs: Sequence[Trajectory]) -> Trajectory:
    """Concatenate trajectories of one schedule and policy along the batch. Shapes: B_i -> sum B_i."""
    first = trajs[0]
    for t in trajs[1:]:
        if t.policy != first.policy or not torch.equal(t.sigmas.cpu(), first.sigmas.cpu()):
            raise ValueError("cannot concatenate trajectories of different schedules or policies: "
                             f"{first.policy} {first.sigmas.tolist()} vs {t.policy} {t.sigmas.tolist()}")
    if len(trajs) == 1:
        return first
    return Trajectory(sigmas=first.sigmas, latents=torch.cat([t.latents for t in trajs]),
                      x0=torch.cat([t.x0 for t in trajs]), noise=torch.cat([t.noise for t in trajs]),
                      mean=torch.cat([t.mean for t in trajs]), std=first.std, policy=first.policy)


# --------------------------------------------------------------------------------------------
# Log-probabilities
# --------------------------------------------------------------------------------------------
def gaussian_log_prob(
    x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float
) -> torch.Tensor:
    """Per-element mean of the Gaussian log density ``log N(x_next; mean, std^2 I)``.

    ``-(x_next - mean)^2 / (2 std^2) - log std - log(2 pi) / 2``, averaged over all non-batch
    elements (docs/design.md "per-element means"): multiply by ``x_next[0].numel()`` for the log
    density of a whole latent. Computed in at least float32.

    Shapes: x_next, mean (B, ...); std () or (B,) or broadcastable, > 0; returns (B,).
    """
    ct = torch.promote_types(torch.promote_types(x_next.dtype, mean.dtype), torch.float32)
    std = torch.as_tensor(std, device=mean.device).to(ct)
    if bool((std <= 0).any()):
        raise ValueError(
            f"std must be > 0 for a log-probability, got {std.detach().flatten().tolist()[:8]}; "
            "deterministic steps (std 0) have none."
        )
    if std.ndim == 1 and x_next.ndim > 1 and std.shape[0] == x_next.shape[0]:
        std = std.view(std.shape[:1] + (1,) * (x_next.ndim - 1))
    z = (x_next.to(ct) - mean.to(ct)) / std
    log_p = -0.5 * z**2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_p.expand(x_next.shape).reshape(x_next.shape[0], -1).mean(dim=1)


def require_gaussian_policy(name: str) -> None:
    """Refuse a deterministic step policy where transition log-probabilities are needed (Eqs. 5, 7)."""
    if POLICIES[name].stochastic:
        return
    raise ValueError(
        f"trajectory policy {name!r} is deterministic (std = 0 at every step): it defines no Gaussian "
        "policy, so it has no transition log-probabilities. Full PSO (Eq. 5) and online PSO (Eq. 7) "
        f"need one: record trajectories with a stochastic policy {_STOCHASTIC}. Offline PSO (Eq. 6) "
        "forward-noises both samples and needs no log-probabilities, so it works with any sampler."
    )


def transition_log_probs(
    denoiser: Denoiser,
    traj: Trajectory,
    cond: Any,
    model_sampling: Any,
    steps: Sequence[int] | None = None,
    grad: bool = True,
    return_x0: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities ``log pi(x_{n+1} | x_n)`` of recorded transitions under ``denoiser``
    (the current or the frozen model): the terms of Eqs. 5 and 7.

    x0 is re-predicted at each recorded latent (treated as data: detached), the trajectory's policy
    gives ``(mean, std)``, and :func:`gaussian_log_prob` scores the recorded next latent. The
    Gaussian log-ratio of two models at one transition is
    ``-(|x - mu_theta|^2 - |x - mu_pre|^2) / (2 std^2)``, the per-step term of Eqs. 5 and 7.

    Args:
        steps: step indices; default the stochastic ones (the paper's sums run n = 2..N and leave
            out the final, deterministic step).
        grad: build the autograd graph through the denoiser (default on).
        return_x0: also return the denoiser's x0 predictions at the scored steps, so a caller that
            needs them (``pso.methods.first_step_shift``) does not call the denoiser again.

    Returns:
        (B, T) per-element-mean log-probabilities, T = len(steps); with ``return_x0`` also the
        predictions, (B, T, ...), in the order of ``steps``.
    """
    require_gaussian_policy(traj.policy)
    pol = get_policy(traj.policy, model_sampling)
    stochastic = traj.stochastic_steps()
    chosen = stochastic if steps is None else [int(n) for n in steps]
    if not chosen:
        raise ValueError(
            f"no transitions to score: the trajectory has N={traj.num_steps} step(s) and stochastic steps "
            f"{stochastic}. Sample with at least 2 steps (the final step is deterministic)."
        )
    for n in chosen:
        if not 0 <= n < traj.num_steps or n not in stochastic:
            raise ValueError(
                f"step {n} has no log-probability: valid steps are the stochastic ones {stochastic} "
                f"(N={traj.num_steps}; std={traj.std.tolist()}). The final step is deterministic."
            )
    latents = traj.latents.detach()
    s_in = latents.new_ones([traj.batch_size])
    out, x0s = [], []
    with torch.set_grad_enabled(grad):
        for n in chosen:
            x = latents[:, n]
            sigma, sigma_next = traj.sigmas[n], traj.sigmas[n + 1]
            x0 = denoiser(x, sigma * s_in, cond)
            mean, std = pol.step(x, x0, sigma, sigma_next, model_sampling)
            out.append(gaussian_log_prob(latents[:, n + 1], mean, std))
            if return_x0:
                x0s.append(x0)
        lp = torch.stack(out, dim=1)
        return (lp, torch.stack(x0s, dim=1)) if return_x0 else lp
