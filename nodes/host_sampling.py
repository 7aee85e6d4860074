"""Sample reference trajectories through the ComfyUI host, exactly as the user's sampler makes them.

PSO scores each sampling step under the Gaussian policy the sampler draws it from (Sec. 2.1,
Appendix A.2), so the trajectories it trains on must be the ones the user's SAMPLER / SIGMAS /
seed produce in ComfyUI, bit for bit. :func:`sample_trajectories` therefore runs the host's own
sampling path (a ``CFGGuider``, the RandomNoise node's noise, ``guider.sample``) with a recording
copy of the user's ``KSAMPLER``, and turns what it saw into a :class:`pso.samplers.Trajectory`:

- the callback ``callback(i, x0, x, total)`` gives x before step i and the guided x0 prediction;
- the running host's own ``k_diffusion.sampling.default_noise_sampler(x, seed)``, wrapped so that
  every draw is recorded (never a copy of it: how it seeds changed in ComfyUI v0.8.0, which on CPU
  seeds with ``seed + 1``);
- the sampler function's return value is the final latent.

Everything is in the model's inner latent space (after ``process_latent_in``), where training runs.

Inference mode: ComfyUI runs every node under ``torch.inference_mode()``, and tensors made there
cannot be used by autograd later. The host's sampler runs in whatever mode the caller is in (in a
node: inference mode, exactly as the user's own sampling runs, so the model's weights and patches
are used as usual); each recorded tensor is copied under ``torch.inference_mode(False)`` the moment
it is seen, and the Trajectory is assembled there too, so none of its tensors is an inference
tensor and training can use them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..pso import samplers
from ..pso.schedules import check_sigmas

logger = logging.getLogger(__name__)

__all__ = ["HOST_SAMPLERS", "HostSampler", "host_noise_sampler", "policy_for_sampler", "sample_trajectories"]


def host_noise_sampler(x: torch.Tensor, seed: int | None) -> Callable[[Any, Any], torch.Tensor]:
    """The running host's ``default_noise_sampler(x, seed)``: the step noise its stochastic samplers
    draw when no noise sampler is given (a :data:`pso.samplers.NoiseSamplerFactory`). Looked up at
    call time, so PSO's own sampling (online rounds, previews) draws exactly what this ComfyUI
    version's sampler draws."""
    from comfy.k_diffusion import sampling as k_sampling

    return k_sampling.default_noise_sampler(x, seed=seed)


@dataclass(frozen=True)
class HostSampler:
    """A ComfyUI sampler that PSO can record and score.

    Attributes:
        function: name of its function in ``comfy.k_diffusion.sampling`` (matched by identity).
        policy: the :data:`pso.samplers.POLICIES` key that reproduces its step.
        takes_noise_sampler: whether the function accepts ``noise_sampler=`` (stochastic samplers).
        required: extra options that must have exactly these values when present (the defaults).
        ignored: extra options accepted with any value (they have no effect on the step).
        hint: how a user gets it.
    """

    function: str
    policy: str
    takes_noise_sampler: bool
    required: dict[str, float] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()
    hint: str = ""


#: ComfyUI sampler name -> how PSO records and scores it. The single source of truth for the
#: supported samplers (dispatch and error messages).
HOST_SAMPLERS: dict[str, HostSampler] = {
    "lcm": HostSampler(
        "sample_lcm", "renoise", True,
        hint="DMD2 / LCM: predict x0, re-noise to the next level (KSamplerSelect 'lcm')"),
    "euler_ancestral": HostSampler(
        "sample_euler_ancestral", "euler_ancestral", True, required={"eta": 1.0, "s_noise": 1.0},
        hint="SDXL-Turbo: KSamplerSelect 'euler_ancestral', or SamplerEulerAncestral with eta 1.0, "
             "s_noise 1.0"),
    "euler": HostSampler(
        "sample_euler", "euler", False, required={"s_churn": 0.0}, ignored=("s_tmin", "s_tmax", "s_noise"),
        hint="Lightning / Hyper-SD / schnell: deterministic, usable by offline PSO only"),
}


def _supported_text() -> str:
    return "; ".join(f"{name!r} ({spec.hint})" for name, spec in HOST_SAMPLERS.items())


def _lookup(sampler: Any) -> tuple[str, HostSampler]:
    """The :data:`HOST_SAMPLERS` entry of a ComfyUI SAMPLER, or a ValueError saying why not."""
    from comfy.k_diffusion import sampling as k_sampling

    fn = getattr(sampler, "sampler_function", None)
    if fn is None:
        raise ValueError(
            f"PSO reference sampling: the SAMPLER is a {type(sampler).__name__}, not a k-diffusion "
            f"sampler (comfy.samplers.KSAMPLER), so PSO cannot know its step policy. Supported: "
            f"{_supported_text()}."
        )
    for name, spec in HOST_SAMPLERS.items():
        if fn is getattr(k_sampling, spec.function, None):
            return name, spec
    fn_name = getattr(fn, "__name__", repr(fn))
    shown = fn_name.removeprefix("sample_")
    raise ValueError(
        f"PSO reference sampling: sampler {shown!r} (function {fn_name}) is not supported. PSO scores "
        "every step under the Gaussian policy the sampler draws it from, so it needs a one-step sampler "
        "whose step is a Gaussian around the model's current x0 prediction; multi-step solvers (dpmpp_*, "
        "deis, ipndm, res_multistep, uni_pc, ...) mix predictions of earlier steps, and the SDE / "
        f"second-order ones have no such policy. Supported: {_supported_text()}. "
        "Choose one of them in KSamplerSelect."
    )


def policy_for_sampler(sampler: Any, model_sampling: Any) -> str:
    """The pso policy that reproduces a ComfyUI SAMPLER's step on this model.

    Args:
        sampler: a ``comfy.samplers.KSAMPLER`` (KSamplerSelect, ``comfy.samplers.sampler_object``,
            SamplerEulerAncestral, ...).
        model_sampling: the model's ``model.get_model_object("model_sampling")``.

    Returns:
        a :data:`pso.samplers.POLICIES` key, resolved as ComfyUI runs it ("euler_ancestral" on a
        rectified-flow (CONST) model is "euler_ancestral_rf").

    Raises:
        ValueError: an unsupported sampler, or options that change its policy (eta / s_noise of
            euler_ancestral other than 1, s_churn of euler other than 0, a custom noise sampler).
    """
    return _resolve(sampler, model_sampling)[2]


def _resolve(sampler: Any, model_sampling: Any) -> tuple[str, HostSampler, str]:
    """(ComfyUI sampler name, its :class:`HostSampler`, resolved policy); see :func:`policy_for_sampler`."""
    name, spec = _lookup(sampler)
    options = dict(getattr(sampler, "extra_options", None) or {})
    for key, value in options.items():
        if key in spec.required:
            if float(value) != spec.required[key]:
                wanted = ", ".join(f"{k}={v}" for k, v in spec.required.items())
                raise ValueError(
                    f"PSO reference sampling: sampler {name!r} with {key}={value} is not supported: PSO "
                    f"needs {wanted}, the step its policy {spec.policy!r} reproduces (another {key} "
                    "changes the step's mean or noise, so the recorded steps would not follow the policy "
                    f"PSO scores them with). Set {wanted} on the sampler node ({spec.hint})."
                )
        elif key not in spec.ignored:
            raise ValueError(
                f"PSO reference sampling: sampler {name!r} has the option {key!r}={value!r}, which PSO "
                f"cannot reproduce (it records the sampler's own noise draws); accepted options for "
                f"{name!r}: {sorted(spec.required) + list(spec.ignored) or 'none'}."
            )
    return name, spec, samplers.get_policy(spec.policy, model_sampling).name


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------
def _keep(t: torch.Tensor) -> torch.Tensor:
    """A private copy of a host tensor that autograd can use later (not an inference tensor)."""
    with torch.inference_mode(False), torch.no_grad():
        return t.detach().clone()


class _Recorder:
    """Collects x (before each step), x0, noise draws and the final latent of one sampling run."""

    def __init__(self, num_steps: int, forward: Callable[..., Any] | None) -> None:
        self.x: list[torch.Tensor | None] = [None] * num_steps
        self.x0: list[torch.Tensor | None] = [None] * num_steps
        self.noise: dict[int, torch.Tensor] = {}
        self.final: torch.Tensor | None = None
        self.step = -1
        self.forward = forward

    def callback(self, i: int, x0: torch.Tensor, x: torch.Tensor, total: int) -> None:
        """KSAMPLER's callback: x (B, C, H, W) before step i and the guided x0 (B, C, H, W)."""
        self.step = int(i)
        self.x[self.step] = _keep(x)
        self.x0[self.step] = _keep(x0)
        if self.forward is not None:
            self.forward(i, x0, x, total)

    def noise_sampler(self, x: torch.Tensor, seed: int | None) -> Callable[[Any, Any], torch.Tensor]:
        """The host's own ``default_noise_sampler(x, seed)``, recording each draw (B, C, H, W)."""
        host_draw = host_noise_sampler(x, seed)

        def draw(sigma: Any, sigma_next: Any) -> torch.Tensor:
            z = host_draw(sigma, sigma_next)
            if self.step in self.noise:
                raise RuntimeError(
                    f"PSO reference sampling: the host's sampler drew noise twice in step {self.step}; "
                    "this ComfyUI version's sampler is not the one-draw-per-step sampler PSO reproduces."
                )
            self.noise[self.step] = _keep(z)
            return z

        return draw

    def wrap(self, fn: Callable[..., torch.Tensor], takes_noise_sampler: bool) -> Callable[..., torch.Tensor]:
        """The user's sampler function with the recording noise sampler, keeping its return value.

        The noise sampler is built here, not in ``extra_options``, because ``default_noise_sampler``
        takes the shape, dtype and device of the sampler's starting latent x and its generator's
        device from x: they are known only once the host calls the function.
        """

        def recording_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
            if takes_noise_sampler:
                seed = (extra_args or {}).get("seed", None)
                options["noise_sampler"] = self.noise_sampler(x, seed)
            out = fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **options)
            self.final = _keep(out)
            return out

        recording_sampler.__name__ = getattr(fn, "__name__", "recording_sampler")
        return recording_sampler


# --------------------------------------------------------------------------------------------
# Sampling through the host
# --------------------------------------------------------------------------------------------
def _guider(model: Any, positive: Any, negative: Any, cfg: float) -> Any:
    """CFGGuider with ``cfg``, or BasicGuider (positive only) when ``negative`` is None."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Guider_Basic

    if negative is None:
        if not math.isclose(cfg, 1.0):
            raise ValueError(
                f"PSO reference sampling: cfg={cfg} needs a negative conditioning; connect one, or use "
                "cfg 1.0 (guidance off), as distilled models are usually run."
            )
        guider = Guider_Basic(model)
        guider.set_conds(positive)
        return guider
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def sample_trajectories(
    model: Any,
    positive: Any,
    negative: Any,
    cfg: float,
    sampler: Any,
    sigmas: torch.Tensor,
    latent: dict,
    seed: int,
    callback: Callable[[int, torch.Tensor, torch.Tensor, int], Any] | None = None,
) -> tuple[samplers.Trajectory, dict]:
    """Sample as SamplerCustomAdvanced(RandomNoise(seed), guider, sampler, sigmas, latent) does, and
    record the trajectories.

    Args:
        model: the MODEL (``comfy.model_patcher.ModelPatcher``), SD1.5 / SDXL / flow; SDXL's ``y``
            is built by the host from the conditioning's pooled_output and sizes.
        positive, negative: CONDITIONING lists; ``negative=None`` samples with BasicGuider semantics
            (cfg must then be 1.0; at cfg 1.0 ComfyUI skips the negative anyway).
        cfg: guidance scale (distilled models: 1.0).
        sampler: the user's SAMPLER (see :func:`policy_for_sampler` for the supported ones).
        sigmas: (N+1,) the SIGMAS to sample with.
        latent: LATENT dict, ``samples`` (B, C, H, W) (and optionally ``batch_index``); an empty
            latent is txt2img. B > 1 gives B trajectories (one per batch item).
        seed: the RandomNoise seed; also seeds the sampler's per-step noise, as in ComfyUI.
        callback: optional ``callback(i, x0, x, total)`` forwarded from the host (progress, previews).

    Returns:
        (trajectory, samples_out): the Trajectory in the model's inner latent space on the sampling
        device (latents (B, N+1, C, H, W), ``latents[:, -1]`` the sampler's final latent before
        ``process_latent_out``), and the LATENT that SamplerCustomAdvanced's first output would be.
    """
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

    model_sampling = model.get_model_object("model_sampling")
    name, spec, policy = _resolve(sampler, model_sampling)
    if "noise_mask" in latent:
        raise ValueError(
            "PSO reference sampling: the LATENT carries a noise_mask (SetLatentNoiseMask / inpainting); "
            "masked steps are not the model's own policy, so PSO cannot train on them. Sample from a "
            "latent without a mask."
        )
    if latent["samples"].is_nested:
        raise ValueError("PSO reference sampling: nested (multi-shape) latents are not supported.")
    check_sigmas(sigmas, what="PSO reference sampling: SIGMAS")

    # SamplerCustomAdvanced.execute, with the recording sampler and callback.
    latent = latent.copy()
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    latent["samples"] = latent_image
    noise = Noise_RandomNoise(seed)
    rec = _Recorder(sigmas.numel() - 1, callback)
    recording = comfy.samplers.KSAMPLER(
        rec.wrap(sampler.sampler_function, spec.takes_noise_sampler),
        extra_options=dict(sampler.extra_options),  # never mutate: ksampler() shares one default dict
        inpaint_options=dict(sampler.inpaint_options),
    )
    guider = _guider(model, positive, negative, cfg)
    samples = guider.sample(
        noise.generate_noise(latent), latent_image, recording, sigmas, denoise_mask=None,
        callback=rec.callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=noise.seed,
    )
    samples = samples.to(comfy.model_management.intermediate_device())
    out = latent.copy()
    out["samples"] = samples
    traj = samplers.recorded_trajectory(rec.x, rec.x0, rec.noise, rec.final, sigmas, model_sampling, policy)
    logger.debug("recorded %d trajectories of %d steps with sampler %r (policy %r)",
                 traj.batch_size, traj.num_steps, name, traj.policy)
    return traj, out
