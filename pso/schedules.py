"""Noise schedules, parameterisations and few-step timestep sets, in ComfyUI's "sigma space".

Everything here mirrors the arithmetic of ComfyUI 0.3.75 (``comfy/model_sampling.py``,
``comfy/samplers.py``, ``comfy_extras/nodes_custom_sampler.py``) without importing it, so that a
trajectory sampled with :mod:`pso.samplers` on our classes is the one ComfyUI would sample, and so
that ComfyUI's own ``model_sampling`` objects can be passed wherever ours are (duck typing).

Conventions (``docs/design.md``):

- eps / v models, variance-exploding form: ``x = x0 + sigma * noise`` with
  ``sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod)``. The paper's Eq. 4 is written in the
  variance-preserving form ``x_vp = sqrt(abar) x0 + sqrt(1 - abar) z``; ``x = x_vp / sqrt(abar)``.
- const (rectified flow): ``x = (1 - sigma) * x0 + sigma * noise`` with ``sigma`` in [0, 1].
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "BETA_SCHEDULES",
    "DISCRETE_PREDICTIONS",
    "FEW_STEP_TIMESTEPS",
    "PARAMETERIZATIONS",
    "DiscreteSchedule",
    "FlowSchedule",
    "add_noise",
    "alphas_cumprod",
    "check_sigmas",
    "eps_to_x0",
    "few_step_sigmas",
    "flow_sigmas",
    "flow_to_x0",
    "is_rectified_flow",
    "lcm_timesteps",
    "noise_from_x0",
    "parameterization",
    "simple_sigmas",
    "sub_schedule",
    "time_snr_shift",
    "trailing_timesteps",
    "turbo_timesteps",
    "v_to_x0",
    "x0_to_eps",
    "x0_to_flow",
    "x0_to_v",
]


# --------------------------------------------------------------------------------------------
# Beta schedules
# --------------------------------------------------------------------------------------------
def _betas_scaled_linear(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    # SD 1.x / SDXL. ComfyUI calls this "linear" (make_beta_schedule), diffusers "scaled_linear".
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def _betas_linear(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    # DDPM (Ho et al. 2020). diffusers "linear"; ComfyUI "sqrt_linear".
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def _betas_cosine(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    # Nichol & Dhariwal (2021), s = 8e-3, betas clipped to 0.999: ComfyUI's make_beta_schedule
    # "cosine". beta_start / beta_end are not used by this schedule.
    s = 8e-3
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps + s
    f = torch.cos(t / (1 + s) * math.pi / 2).pow(2)
    f = f / f[0]
    return torch.clamp(1 - f[1:] / f[:-1], min=0, max=0.999)


#: Registry of beta schedules: name -> ``betas(num_timesteps, beta_start, beta_end)`` (float64).
BETA_SCHEDULES: dict[str, Callable[[int, float, float], torch.Tensor]] = {
    "scaled_linear": _betas_scaled_linear,
    "linear": _betas_linear,
    "cosine": _betas_cosine,
}


def alphas_cumprod(
    kind: str = "scaled_linear",
    num_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> torch.Tensor:
    """Cumulative products ``abar_t = prod_{s<=t} (1 - beta_s)`` of a DDPM beta schedule.

    The defaults are SD 1.x / SDXL (and so SDXL-Turbo, DMD2, LCM, Lightning, Hyper-SD).

    Args:
        kind: one of :data:`BETA_SCHEDULES` ("scaled_linear", "linear", "cosine").
        num_timesteps: number of training timesteps T (>= 2).
        beta_start, beta_end: first and last beta, ``0 < beta_start < beta_end < 1``.

    Returns:
        abar: (T,) float64, decreasing, in (0, 1]. Float64 because ComfyUI computes the schedule in
        float64 and only rounds the sigma table to float32 (:class:`DiscreteSchedule` does the same).
    """
    if kind not in BETA_SCHEDULES:
        raise ValueError(
            f"Unknown beta schedule kind {kind!r}; valid kinds are {sorted(BETA_SCHEDULES)}. "
            "SD 1.x and SDXL-based models use 'scaled_linear'."
        )
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}; SD and SDXL use 1000.")
    if not (0.0 < beta_start < beta_end < 1.0):
        raise ValueError(
            f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start!r}, beta_end={beta_end!r}; "
            "SD and SDXL use beta_start=0.00085, beta_end=0.012."
        )
    betas = BETA_SCHEDULES[kind](num_timesteps, beta_start, beta_end)
    return torch.cumprod(1.0 - betas, dim=0)


_default_alphas_cumprod = alphas_cumprod  # DiscreteSchedule's argument shadows the name


# --------------------------------------------------------------------------------------------
# Parameterisation detection (works on ComfyUI's objects by duck typing)
# --------------------------------------------------------------------------------------------
#: The parameterisations pso supports.
PARAMETERIZATIONS: tuple[str, ...] = ("eps", "v", "const")

# ComfyUI builds a model's sampling object as ``class ModelSampling(<sampling base>, <type>)``
# where <type> is one of the classes below (comfy/model_base.py, comfy_extras/nodes_model_advanced.py).
# Value None: recognised, but its denoising / noising rule is not one pso implements.
_HOST_TYPE_NAMES: dict[str, str | None] = {
    "EPS": "eps",
    "LCM": "eps",  # EPS noising with LCM's boundary-condition scaling of the prediction
    "V_PREDICTION": "v",
    "CONST": "const",
    "EDM": None,
    "X0": None,
    "IMG_TO_IMG": None,
    "COSMOS_RFLOW": None,
}


def _host_type(model_sampling: object) -> tuple[str | None, str | None]:
    """(class name, parameterisation) of the first ComfyUI type class in the MRO, else (None, None)."""
    for cls in type(model_sampling).__mro__:
        if cls.__name__ in _HOST_TYPE_NAMES:
            return cls.__name__, _HOST_TYPE_NAMES[cls.__name__]
    return None, None


def parameterization(model_sampling: object) -> str:
    """Which rule relates ``x``, ``x0`` and the noise for a model sampling object.

    Works on :class:`DiscreteSchedule` / :class:`FlowSchedule` (attribute ``pso_parameterization``)
    and on ComfyUI's objects, by the name of the first type class in their MRO: ``EPS`` and ``LCM``
    -> "eps", ``V_PREDICTION`` -> "v", ``CONST`` -> "const". (ComfyUI's ``V_PREDICTION`` subclasses
    ``EPS`` and ``EDM`` subclasses ``V_PREDICTION``; the first match in MRO order is the most
    derived one, so an ``EDM`` model is not mistaken for a v model.)

    Returns:
        one of :data:`PARAMETERIZATIONS`.
    """
    own = getattr(model_sampling, "pso_parameterization", None)
    if isinstance(own, str):
        return own
    name, param = _host_type(model_sampling)
    if param is not None:
        return param
    mro = [c.__name__ for c in type(model_sampling).__mro__]
    supported = sorted(k for k, v in _HOST_TYPE_NAMES.items() if v is not None)
    if name is not None:
        raise ValueError(
            f"model sampling type {name} (MRO {mro}) is not supported by PSO; supported ComfyUI types "
            f"are {supported}. Use an eps, v-prediction or rectified-flow (CONST) model."
        )
    raise TypeError(
        f"cannot tell the parameterisation of {type(model_sampling).__name__} (MRO {mro}): expected "
        f"pso.schedules.DiscreteSchedule / FlowSchedule or a ComfyUI model_sampling whose MRO contains "
        f"one of {supported}."
    )


def is_rectified_flow(model_sampling: object) -> bool:
    """True for rectified-flow sampling (ComfyUI: ``isinstance(ms, CONST)``); never raises."""
    if getattr(model_sampling, "pso_parameterization", None) == "const":
        return True
    return any(cls.__name__ == "CONST" for cls in type(model_sampling).__mro__)


# --------------------------------------------------------------------------------------------
# Conversions (pure functions, ComfyUI's sigma convention)
# --------------------------------------------------------------------------------------------
def _sigma_like(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Reshape sigma for broadcasting against x like ComfyUI's ``reshape_sigma``.

    sigma: () or (1,) -> (); (B,) -> (B, 1, ..., 1) with x.ndim dims. Floats become 0-d tensors.
    """
    if not isinstance(sigma, torch.Tensor):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.nelement() == 1:
        return sigma.view(())
    return sigma.view(sigma.shape[:1] + (1,) * (x.ndim - 1))


def eps_to_x0(x: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x0 from an eps prediction (ComfyUI ``EPS.calculate_denoised``): ``x0 = x - eps * sigma``.

    Shapes: x, eps (B, ...); sigma () or (B,); returns (B, ...).
    """
    return x - eps * _sigma_like(sigma, x)


def x0_to_eps(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """eps implied by an x0 for eps / v models (variance exploding): ``(x - x0) / sigma``.

    Shapes: x, x0 (B, ...); sigma () or (B,), > 0; returns (B, ...).
    """
    return (x - x0) / _sigma_like(sigma, x)


def v_to_x0(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float, sigma_data: float = 1.0
) -> torch.Tensor:
    """x0 from a v prediction (ComfyUI ``V_PREDICTION.calculate_denoised``, Salimans & Ho 2022).

    ``x0 = x sd^2 / (sigma^2 + sd^2) - v sigma sd / sqrt(sigma^2 + sd^2)`` with x = x0 + sigma n and
    v = alpha n - s x0, alpha = sd / sqrt(sigma^2 + sd^2), s = sigma / sqrt(sigma^2 + sd^2).

    Shapes: x, v (B, ...); sigma () or (B,); returns (B, ...).
    """
    s = _sigma_like(sigma, x)
    return x * sigma_data**2 / (s**2 + sigma_data**2) - v * s * sigma_data / (s**2 + sigma_data**2) ** 0.5


def x0_to_v(
    x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float, sigma_data: float = 1.0
) -> torch.Tensor:
    """The v target implied by x0 (inverse of :func:`v_to_x0`).

    ``v = (x sd^2 / (sigma^2 + sd^2) - x0) * sqrt(sigma^2 + sd^2) / (sigma sd)``.

    Shapes: x, x0 (B, ...); sigma () or (B,), > 0; returns (B, ...).
    """
    s = _sigma_like(sigma, x)
    var = s**2 + sigma_data**2
    return (x * sigma_data**2 / var - x0) * var**0.5 / (s * sigma_data)


def flow_to_x0(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x0 from a rectified-flow velocity (ComfyUI ``CONST.calculate_denoised``): ``x - v * sigma``.

    Here v = noise - x0, the derivative of x = (1 - sigma) x0 + sigma noise in sigma.
    Shapes: x, velocity (B, ...); sigma () or (B,); returns (B, ...).
    """
    return x - velocity * _sigma_like(sigma, x)


def x0_to_flow(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Rectified-flow velocity implied by x0: ``(x - x0) / sigma`` (= noise - x0).

    Shapes: x, x0 (B, ...); sigma () or (B,), > 0; returns (B, ...).
    """
    return (x - x0) / _sigma_like(sigma, x)


def _check_param(param: str) -> None:
    if param not in PARAMETERIZATIONS:
        raise ValueError(
            f"unknown parameterisation {param!r}; valid ones are {list(PARAMETERIZATIONS)} "
            "(pso.schedules.parameterization(model_sampling) gives the right one)."
        )


def noise_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float, param: str) -> torch.Tensor:
    """The noise ``n`` implied by a noisy latent and an x0 (forward process inverted for n).

    eps / v: ``x = x0 + sigma n`` -> ``n = (x - x0) / sigma``;
    const:   ``x = (1 - sigma) x0 + sigma n`` -> ``n = (x - (1 - sigma) x0) / sigma``.
    This is the eps target of the paper's Eqs. 5-6 in the variance-exploding convention.

    Shapes: x, x0 (B, ...); sigma () or (B,), > 0; returns (B, ...).
    """
    _check_param(param)
    s = _sigma_like(sigma, x)
    if param == "const":
        return (x - (1.0 - s) * x0) / s
    return (x - x0) / s


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float, param: str) -> torch.Tensor:
    """Forward process q(x_sigma | x0): eps / v ``x0 + sigma n``; const ``(1 - sigma) x0 + sigma n``.

    Same values as ComfyUI's ``noise_scaling(sigma, noise, x0)`` (max_denoise False).
    Shapes: x0, noise (B, ...); sigma () or (B,); returns (B, ...).
    """
    _check_param(param)
    s = _sigma_like(sigma, noise)
    if param == "const":
        return s * noise + (1.0 - s) * x0
    return noise * s + x0


# --------------------------------------------------------------------------------------------
# Model sampling classes
# --------------------------------------------------------------------------------------------
#: Predictions a :class:`DiscreteSchedule` model can make.
DISCRETE_PREDICTIONS: dict[str, str] = {
    "eps": "the network predicts the noise (SD 1.x, SDXL, SDXL-Turbo, DMD2, LCM, Lightning)",
    "v": "the network predicts v = alpha n - s x0 (SD 2.x 768, v-prediction fine-tunes)",
}


class DiscreteSchedule(torch.nn.Module):
    """A DDPM-discretised eps / v model's sampling, with the API of ComfyUI's
    ``ModelSamplingDiscrete`` + ``EPS`` / ``V_PREDICTION`` (sigma_data = 1).

    ``sigmas[t] = sqrt((1 - abar_t) / abar_t)`` is computed in float64 and stored as float32, and
    ``log_sigmas`` is the float64 log rounded to float32, exactly as ComfyUI stores them; so
    ``sigma(t)`` / ``timestep(sigma)`` give the same numbers as ComfyUI's object.

    Args:
        alphas_cumprod: (T,) cumulative alphas; None -> :func:`alphas_cumprod` defaults (SD/SDXL).
        prediction: "eps" or "v" (see :data:`DISCRETE_PREDICTIONS`).
    """

    sigma_data = 1.0

    def __init__(self, alphas_cumprod: torch.Tensor | None = None, prediction: str = "eps") -> None:
        super().__init__()
        if prediction not in DISCRETE_PREDICTIONS:
            raise ValueError(
                f"unknown prediction {prediction!r}; valid ones are {sorted(DISCRETE_PREDICTIONS)}. "
                "Rectified-flow models use pso.schedules.FlowSchedule instead."
            )
        if alphas_cumprod is None:
            abar = _default_alphas_cumprod()
        else:
            abar = torch.as_tensor(alphas_cumprod).to(torch.float64)
        if abar.ndim != 1 or abar.numel() < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with >= 2 entries, got shape {tuple(abar.shape)}.")
        if not bool(((abar > 0) & (abar <= 1)).all()) or not bool((abar[1:] <= abar[:-1]).all()):
            raise ValueError(
                "alphas_cumprod must be non-increasing and in (0, 1]; got values from "
                f"{abar.min().item():.6g} to {abar.max().item():.6g}. "
                "Build it with pso.schedules.alphas_cumprod()."
            )
        self.prediction = prediction
        self.num_timesteps = int(abar.numel())
        sigmas = ((1 - abar) / abar) ** 0.5
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    @property
    def pso_parameterization(self) -> str:
        """"eps" or "v" (read by :func:`parameterization`)."""
        return self.prediction

    @property
    def sigma_min(self) -> torch.Tensor:
        """Smallest sigma of the table (t = 0), 0-d float32."""
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        """Largest sigma of the table (t = T - 1), 0-d float32."""
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Nearest table index in log-sigma (ComfyUI snaps to an integer step).

        Shapes: sigma (...,) -> (...,) int64 on sigma's device.
        """
        log_sigma = sigma.log()
        dists = log_sigma.to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Sigma at a (possibly fractional) timestep, interpolating log-sigma linearly between the
        neighbouring table entries; clamped to [0, T - 1].

        Shapes: timestep (...,) any real/int dtype -> (...,) float32 on timestep's device.
        """
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=(len(self.sigmas) - 1))
        low_idx = t.floor().long()
        high_idx = t.ceil().long()
        w = t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp().to(timestep.device)

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma at a fraction of the denoising process (0 -> effectively infinite, 1 -> 0)."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        percent = 1.0 - percent
        return self.sigma(torch.tensor(percent * 999.0)).item()  # ComfyUI uses 999, not T - 1

    def noise_scaling(
        self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor, max_denoise: bool = False
    ) -> torch.Tensor:
        """Noise a clean latent to level sigma: ``noise * sigma + latent`` (variance exploding).

        With ``max_denoise`` the noise is scaled by ``sqrt(1 + sigma^2)`` instead: the noisy latent
        is then pure noise in the variance-preserving frame, as ComfyUI starts txt2img at sigma_max.
        Shapes: sigma () or (B,); noise, latent_image (B, ...) -> (B, ...).
        """
        sigma = _sigma_like(sigma, noise)
        if max_denoise:
            noise = noise * torch.sqrt(1.0 + sigma**2.0)
        else:
            noise = noise * sigma
        noise += latent_image  # in place, as ComfyUI: the result keeps noise's dtype
        return noise

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Identity for eps / v models. Shapes: latent (B, ...) -> (B, ...)."""
        return latent

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The network's input ``x / sqrt(sigma^2 + sigma_data^2)`` (the variance-preserving latent).

        Shapes: sigma () or (B,); x (B, ...) -> (B, ...).
        """
        sigma = _sigma_like(sigma, x)
        return x / (sigma**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(
        self, sigma: torch.Tensor, model_output: torch.Tensor, model_input: torch.Tensor
    ) -> torch.Tensor:
        """x0 from the network output: eps ``x - out * sigma``; v see :func:`v_to_x0`.

        Shapes: sigma () or (B,); model_output, model_input (B, ...) -> (B, ...).
        """
        if self.prediction == "v":
            return v_to_x0(model_input, model_output, sigma, self.sigma_data)
        return eps_to_x0(model_input, model_output, sigma)


class FlowSchedule(torch.nn.Module):
    """Rectified-flow sampling with the API of ComfyUI's ``ModelSamplingDiscreteFlow`` + ``CONST``.

    ``x = (1 - sigma) x0 + sigma noise``; ``sigma(t) = time_snr_shift(shift, t / multiplier)``.
    ComfyUI's settings: FLUX.1-schnell ``shift=1.0, multiplier=1.0``; SD3 ``shift=3.0,
    multiplier=1000`` (comfy/supported_models.py). The defaults are the class defaults of ComfyUI.

    Args:
        shift: time-SNR shift alpha > 0 (1.0 = no shift).
        multiplier: timestep scale the network was trained with (> 0).
    """

    pso_parameterization = "const"

    def __init__(self, shift: float = 1.0, multiplier: float = 1000) -> None:
        super().__init__()
        if not (isinstance(shift, (int, float)) and shift > 0 and math.isfinite(shift)):
            raise ValueError(
                f"shift must be a finite number > 0, got {shift!r}; 1.0 means no shift (FLUX.1-schnell)."
            )
        if not (isinstance(multiplier, (int, float)) and multiplier > 0 and math.isfinite(multiplier)):
            raise ValueError(
                f"multiplier must be a finite number > 0, got {multiplier!r}; "
                "FLUX.1-schnell uses 1.0, SD3 1000."
            )
        self.shift = shift
        self.multiplier = multiplier
        timesteps = 1000
        ts = self.sigma((torch.arange(1, timesteps + 1, 1) / timesteps) * multiplier)
        self.register_buffer("sigmas", ts)

    @property
    def sigma_min(self) -> torch.Tensor:
        """Smallest sigma of the table, 0-d float32."""
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        """Largest sigma of the table (1.0), 0-d float32."""
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """``sigma * multiplier`` (no snapping). Shapes: (...,) -> (...,)."""
        return sigma * self.multiplier

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """``time_snr_shift(shift, timestep / multiplier)``. Shapes: (...,) -> (...,)."""
        return time_snr_shift(self.shift, timestep / self.multiplier)

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma at a fraction of the denoising process (0 -> 1.0, 1 -> 0.0)."""
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return time_snr_shift(self.shift, 1.0 - percent)

    def noise_scaling(
        self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor, max_denoise: bool = False
    ) -> torch.Tensor:
        """``sigma * noise + (1 - sigma) * latent`` (max_denoise has no effect for flow models).

        Shapes: sigma () or (B,); noise, latent_image (B, ...) -> (B, ...).
        """
        sigma = _sigma_like(sigma, noise)
        return sigma * noise + (1.0 - sigma) * latent_image

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """``latent / (1 - sigma)``. Shapes: latent (B, ...) -> (B, ...)."""
        sigma = _sigma_like(sigma, latent)
        return latent / (1.0 - sigma)

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Identity: flow networks take x as is. Shapes: x (B, ...) -> (B, ...)."""
        return x

    def calculate_denoised(
        self, sigma: torch.Tensor, model_output: torch.Tensor, model_input: torch.Tensor
    ) -> torch.Tensor:
        """x0 from the predicted velocity: ``x - out * sigma``. Shapes: (B, ...) -> (B, ...)."""
        return flow_to_x0(model_input, model_output, sigma)


def time_snr_shift(alpha: float, t: torch.Tensor | float) -> torch.Tensor | float:
    """ComfyUI's time shift for flow models (SD3, Esser et al. 2024): ``alpha t / (1 + (alpha - 1) t)``.

    Shapes: t (...,) or float -> same.
    """
    if alpha == 1.0:
        return t
    return alpha * t / (1 + (alpha - 1) * t)


# --------------------------------------------------------------------------------------------
# Few-step timestep sets
# --------------------------------------------------------------------------------------------
def trailing_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """diffusers' ``timestep_spacing="trailing"`` (Lin et al. 2024, "Common diffusion noise
    schedules and sample steps are flawed"): ``round(arange(T, 0, -T/steps)) - 1``.

    Returns: ``steps`` ints, decreasing, starting at T - 1 (4 steps: 999, 749, 499, 249).
    """
    _check_steps(steps, num_train_timesteps)
    ratio = num_train_timesteps / steps
    return [int(round(num_train_timesteps - k * ratio)) - 1 for k in range(steps)]


def lcm_timesteps(
    steps: int, original_inference_steps: int = 50, num_train_timesteps: int = 1000
) -> list[int]:
    """diffusers ``LCMScheduler.set_timesteps`` (strength 1): the skipping-step grid
    ``arange(1, K + 1) * (T // K) - 1`` (K = original_inference_steps), reversed, indexed at
    ``floor(linspace(0, K, steps, endpoint=False))``.

    Returns: ``steps`` ints, decreasing (4 steps, K = 50: 999, 759, 499, 259).
    """
    _check_steps(steps, original_inference_steps)
    k = num_train_timesteps // original_inference_steps
    origin = [(i + 1) * k - 1 for i in range(original_inference_steps)][::-1]
    return [origin[math.floor(i * original_inference_steps / steps)] for i in range(steps)]


def turbo_timesteps(steps: int, denoise: float = 1.0) -> list[int]:
    """ComfyUI's ``SDTurboScheduler`` node: ``flip(arange(1, 11) * 100 - 1)[start:start + steps]``
    with ``start = 10 - int(10 * denoise)`` (4 steps: 999, 899, 799, 699).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 10:
        raise ValueError(f"steps must be an int in [1, 10] (SDTurboScheduler's range), got {steps!r}.")
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be in [0, 1], got {denoise!r}.")
    start = 10 - int(10 * denoise)
    return [999 - 100 * i for i in range(10)][start : start + steps]


def _check_steps(steps: int, limit: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= limit:
        raise ValueError(f"steps must be an int in [1, {limit}], got {steps!r}.")


#: Few-step timestep sets users run, name -> decreasing integer timesteps (sigmas via
#: :func:`few_step_sigmas`). Where each comes from:
FEW_STEP_TIMESTEPS: dict[str, tuple[int, ...]] = {
    # DMD2 SDXL 4-step (Yin et al. 2024b): README runs LCMScheduler with timesteps=[999, 749, 499, 249];
    # the PSO authors' DMD2 config uses the same. Sampled with the "renoise" policy (ComfyUI "lcm").
    "dmd2": (999, 749, 499, 249),
    # DMD2 SDXL 1-step: README runs timesteps=[399] (the generator maps pure noise to an image at
    # t = 399): start it with initial_latent(..., max_denoise=True) so its input is unit noise.
    "dmd2_1": (399,),
    # LCM / LCM-LoRA 4-step: diffusers LCMScheduler, original_inference_steps=50 (lcm_timesteps(4)).
    "lcm_4": (999, 759, 499, 259),
    # SDXL-Turbo / SD-Turbo as ComfyUI runs them: SDTurboScheduler node (turbo_timesteps(4), (1)).
    # (diffusers' EulerAncestralDiscreteScheduler with trailing spacing would give 999, 749, 499, 249.)
    "turbo_4": (999, 899, 799, 699),
    "turbo_1": (999,),
    # SDXL-Lightning 4-step: model card asks for "trailing" timesteps (trailing_timesteps(4)).
    "lightning_4": (999, 749, 499, 249),
    # Hyper-SD SDXL 4-step: DDIM/TCD with trailing spacing (trailing_timesteps(4)).
    "hyper_4": (999, 749, 499, 249),
    # SDXL-Lightning 2-step (trailing_timesteps(2)); also the 2-step schedule inside DMD2's 4 steps.
    "lightning_2": (999, 499),
}


def check_sigmas(sigmas: torch.Tensor, min_steps: int = 1, what: str = "sigmas") -> torch.Tensor:
    """The one check of a few-step schedule (the SIGMAS type), wherever one enters: a 1-D tensor of N+1
    noise levels, finite, >= 0 and strictly decreasing, with N >= ``min_steps`` steps (2 for training:
    the last step is deterministic, so a 1-step schedule has no stochastic transition, paper n = 2..N).

    ``what`` names the value in the error (e.g. "PSO Online Train: SIGMAS"). Returns ``sigmas``.
    """
    steps = f"at least {min_steps} step{'s' if min_steps > 1 else ''}"
    problem = None
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1:
        shown = f"shape {tuple(sigmas.shape)}" if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
        problem = "which is not a 1-D tensor"
    else:
        values = sigmas.detach().double().cpu()
        shown = values.tolist()
        if values.numel() < min_steps + 1:
            problem = f"which has fewer than {min_steps} step{'s' if min_steps > 1 else ''}"
        elif not bool(torch.isfinite(values).all() and (values >= 0).all()):
            problem = "which holds a level that is not finite and >= 0"
        elif bool((values[1:] >= values[:-1]).any()):
            problem = "which is not strictly decreasing"
    if problem is None:
        return sigmas
    fix = ("Training needs " + steps + ": the last step of a few-step sampler is deterministic and has no "
           "transition to train (paper: sums over n = 2..N); use a schedule of at least 2 steps (e.g. PSO "
           "Few-Step Sigmas with 4 steps)." if min_steps >= 2 else
           "Build them with pso.schedules.few_step_sigmas or a scheduler node (e.g. PSO Few-Step Sigmas).")
    raise ValueError(f"{what} must be a 1-D tensor of N+1 noise levels, finite, >= 0 and strictly "
                     f"decreasing, with {steps}; got {shown}, {problem}. {fix}")


def few_step_sigmas(model_sampling: object, timesteps: str | Sequence[int]) -> torch.Tensor:
    """Sigmas for a few-step timestep set, built as ComfyUI's SDTurboScheduler builds them:
    ``ms.sigma(int64 timesteps)`` followed by a 0.

    Args:
        model_sampling: ours or ComfyUI's (with an LCM model's distilled sampling, its 50-entry
            table maps the same timesteps to the same sigmas).
        timesteps: a :data:`FEW_STEP_TIMESTEPS` name or a decreasing sequence of ints >= 0.

    Returns:
        sigmas: (N+1,) float32 decreasing, ending in 0 (the SIGMAS type).
    """
    if isinstance(timesteps, str):
        if timesteps not in FEW_STEP_TIMESTEPS:
            raise ValueError(
                f"unknown few-step timestep set {timesteps!r}; valid ones are {sorted(FEW_STEP_TIMESTEPS)}, "
                "or pass the integer timesteps themselves."
            )
        timesteps = FEW_STEP_TIMESTEPS[timesteps]
    ts = [int(t) for t in timesteps]
    if not ts or min(ts) < 0 or any(b >= a for a, b in zip(ts, ts[1:], strict=False)):
        raise ValueError(f"timesteps must be a non-empty, strictly decreasing list of ints >= 0, got {ts}.")
    sig = model_sampling.sigma(torch.tensor(ts, dtype=torch.long))
    return torch.cat([sig, sig.new_zeros([1])])


def sub_schedule(sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """The ``steps``-step schedule inside an N-step one: every (N/steps)-th sigma from the top, then
    the final sigma.

    For DMD2's 4-step timesteps 999/749/499/249 this gives 999/499 (2 steps) and 999 (1 step), the
    step counts DMD2 was distilled on; Lightning/Hyper trailing timesteps nest the same way. Used to
    sample references at the other step counts a user runs (issue "host-faithful training").

    Shapes: sigmas (N+1,) decreasing, ending in the final sigma; returns (steps+1,) of the same dtype.
    """
    n = int(sigmas.shape[0]) - 1
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or n < 1 or n % steps:
        raise ValueError(f"cannot take a {steps!r}-step schedule out of a {n}-step one: the step count "
                         f"must divide {n} (choose from {[k for k in range(1, n + 1) if n % k == 0]}).")
    idx = torch.arange(0, n, n // steps)
    return torch.cat([sigmas[idx], sigmas[-1:]])


def simple_sigmas(model_sampling: object, steps: int) -> torch.Tensor:
    """ComfyUI's "simple" scheduler: every ``len(table)/steps``-th entry of the sigma table from the
    top, then 0.

    Shapes: returns (steps+1,) float32 ending in 0.
    """
    n = len(model_sampling.sigmas)
    _check_steps(steps, n)
    ss = n / steps
    sigs = [float(model_sampling.sigmas[-(1 + int(x * ss))]) for x in range(steps)]
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def flow_sigmas(steps: int, shift: float = 1.0, multiplier: float = 1.0) -> torch.Tensor:
    """Sigmas of ComfyUI's "simple" scheduler on a flow model (how FLUX.1-schnell is usually run).

    Defaults are FLUX.1-schnell's ComfyUI sampling settings (shift 1.0, multiplier 1.0), giving
    ``1 - k/steps``; with shift s each value t becomes ``s t / (1 + (s - 1) t)``.

    Shapes: returns (steps+1,) float32, starting at 1.0, ending in 0.
    """
    return simple_sigmas(FlowSchedule(shift=shift, multiplier=multiplier), steps)
