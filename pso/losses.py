"""The PSO family of losses (Miao et al., arXiv 2410.03190, Section 2) as pure functions.

Every function takes per-sample quantities the caller has already computed and returns a
:class:`LossOutput`. Nothing here runs a model.

Conventions shared by every loss
--------------------------------
- Inputs are tensors of shape ``(B, T)``: ``B`` pairs (target, reference) and ``T`` training
  transitions per pair. The paper sums over the stochastic transitions ``n = 2..N``; the caller may
  pass all ``N - 1`` of them or one sampled transition (``T = 1``, an estimate of the sum up to the
  factor ``N - 1``, which ``beta`` absorbs).
- **Per-element means.** Every squared error (``model_err_*``, ``frozen_err_*``) is the mean over the
  latent's elements of the squared error of one sample at one transition, and every log-ratio
  (``logratio_*``) is the per-element mean of ``log p_theta - log p_pre`` of one sampled
  transition. The betas in :data:`LOSSES` assume means: a sum over an SDXL latent (4 x 128 x 128)
  would be 65,536 times larger and saturate every sigmoid.
- **Pairs are already paired.** Target and reference of a pair share their timesteps (column ``n``
  of every tensor is the same transition for both), and share their forward-noising noise wherever
  both sides are forward-noised (Eq. 6, DreamBooth, Diffusion-DPO). Sampled trajectories (Eq. 5's
  reference, Eq. 7's two sides) carry their own sampling noise. These functions cannot check this.
- ``model`` is the network being trained (LoRA on); ``frozen`` is the pre-trained model
  (``p_pre``, in practice the same network with the LoRA disabled). Frozen quantities should carry
  no gradient; nothing here detaches them for the caller.
- Errors "target" / "ref" are the tau / rho sides of the paper: tau is pushed up in likelihood,
  rho down, relative to the frozen model.

The logit and the reduction
---------------------------
Each loss forms per-transition logits ``z`` of shape ``(B, T)`` (beta included). The reduction
(:data:`REDUCTIONS`) decides how they meet the log-sigmoid:

- ``"sum_inside"`` (default, the paper's Eqs. 5-7): ``loss = -log sigmoid(sum_n z_n)``.
- ``"per_transition"`` (the authors' online code): ``loss = mean_n -log sigmoid(z_n)``.

They are different objectives unless ``T == 1``. Either way :attr:`LossOutput.logits` is the pair's
total logit ``sum_n z_n``, beta times the implicit reward margin.

Metrics (python floats, computed under ``no_grad``)
---------------------------------------------------
- ``loss``: mean of ``LossOutput.loss``.
- ``implicit_accuracy``: fraction of pairs whose total logit is > 0 (the model ranks the target
  above the reference, relative to the frozen model).
- ``margin``: mean total logit / beta, the implicit reward margin without the beta scale.
- ``saturated_fraction``: fraction of log-sigmoid arguments (one per pair for ``sum_inside``, one
  per transition for ``per_transition``) with ``|z| > SATURATION_LOGIT`` (= log 999 ~ 6.91, where
  sigmoid(z) > 0.999 or < 0.001). At ``z > 6.91`` the pair's gradient is < 0.001 of its maximum;
  at ``z < -6.91`` the loss is linear in z. Many saturated pairs mean beta is too large; Adam keeps
  moving on tiny gradients, so watch this number.
- the means of every error / log-ratio the loss received (``model_err_target``, ...).
- loss-specific extras: ``clipped_fraction`` (clipped online form).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

REDUCTIONS: dict[str, str] = {
    "sum_inside": "the paper's Eqs. 5-7: sum the per-transition logits, then one log-sigmoid per pair",
    "per_transition": "the authors' online code: one log-sigmoid per transition, averaged over transitions",
}
DEFAULT_REDUCTION = "sum_inside"

DREAMBOOTH_FORMS: dict[str, str] = {
    "pso": "DPO form with the frozen model: -log sigmoid(-beta w [(m_t - f_t) - s (m_r - f_r)])",
    "pso_db": "hinge form without a frozen model: relu(1 + beta w (m_t - s m_r)) (the authors' default)",
}

#: Probability at which a sigmoid counts as saturated, and the matching |logit| (log 999 ~ 6.907).
SATURATION_PROBABILITY = 0.999
SATURATION_LOGIT = math.log(SATURATION_PROBABILITY / (1.0 - SATURATION_PROBABILITY))

#: Every per-sample input a loss can need: name -> what the caller must pass, shape (B, T).
INPUTS: dict[str, str] = {
    "model_err_target": "per-element mean squared error of the trained model on the forward-noised target",
    "frozen_err_target": "the same error for the frozen pre-trained model (LoRA disabled), no gradient",
    "model_err_ref": "per-element mean squared error of the trained model on the forward-noised reference",
    "frozen_err_ref": "the same error for the frozen pre-trained model (LoRA disabled), no gradient",
    "logratio_target": "per-element mean log p_theta - log p_pre of the target's sampled transition",
    "logratio_ref": "per-element mean log p_theta - log p_pre of the reference's sampled transition",
    "sigma": "noise level of the transition (EDM sigma), > 0, shared by target and reference",
}

#: How a side of a pair is produced: both-"forward" pairs share noise and timesteps.
PATHS: dict[str, str] = {
    "forward": "forward-noised from a clean latent (errors against the noising target)",
    "sampled": "a trajectory sampled from the current model with a Gaussian step policy (log-ratios)",
}


@dataclass(frozen=True)
class LossOutput:
    """What every loss returns.

    Shapes: loss (B,) per pair (the trainer takes the mean); logits (B,) the total logit
    ``sum_n z_n`` of each pair, or ``None`` for losses without one (SFT).
    """

    loss: torch.Tensor
    logits: torch.Tensor | None
    metrics: dict[str, float]


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def valid_beta(beta: object) -> bool:
    """The one rule for beta, wherever it enters (the loss functions, ``pso.methods.MethodConfig``, the
    nodes' settings, their queue-time check): a finite number > 0."""
    return isinstance(beta, (int, float)) and not isinstance(beta, bool) and math.isfinite(beta) and beta > 0


def check_beta(beta: float, name: str = "beta") -> None:
    """Refuse a beta that breaks :func:`valid_beta`, naming the value and the values to use."""
    if not valid_beta(beta):
        raise ValueError(
            f"{name} must be a finite number > 0, got {beta!r}. It is the DPO regularisation weight: "
            f"the paper uses 50 (offline), 5 (online, concept), Diffusion-DPO 5000. Set a positive {name}."
        )


def _check_choice(value: str, registry: Mapping[str, str], what: str) -> None:
    if value not in registry:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(sorted(registry))}.")


def _pair_tensors(**tensors: torch.Tensor) -> list[torch.Tensor]:
    """Check that every input is a (B, T) tensor of one shape; return them in float32 or wider."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if any(len(s) != 2 for s in shapes.values()) or any(s != first for s in shapes.values()):
        listed = ", ".join(f"{name}={s}" for name, s in shapes.items())
        raise ValueError(
            f"loss inputs must all have one shape (B, T) (B pairs, T transitions); got {listed}. "
            "Use x.unsqueeze(1) for a single transition per pair."
        )
    return [t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors.values()]


# --------------------------------------------------------------------------------------------------
# Reductions and metrics (shared by every loss)
# --------------------------------------------------------------------------------------------------


def _logsigmoid_reduce(z: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-log sigmoid of per-transition logits, reduced as in REDUCTIONS.

    Shapes: z (B, T). Returns loss (B,) and the log-sigmoid arguments ((B,) or (B, T)).
    """
    args = z.sum(dim=1) if reduction == "sum_inside" else z
    per_arg = -F.logsigmoid(args)
    return (per_arg if reduction == "sum_inside" else per_arg.mean(dim=1)), args


def _hinge_reduce(z: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """relu(1 - z) of per-transition logits, reduced as in REDUCTIONS.

    Shapes: z (B, T). Returns loss (B,) and the hinge arguments ((B,) or (B, T)).
    """
    args = z.sum(dim=1) if reduction == "sum_inside" else z
    per_arg = torch.relu(1.0 - args)
    return (per_arg if reduction == "sum_inside" else per_arg.mean(dim=1)), args


@torch.no_grad()
def _metrics(
    loss: torch.Tensor, logits: torch.Tensor, args: torch.Tensor, beta: float, **means: torch.Tensor
) -> dict[str, float]:
    """Shapes: loss (B,), logits (B,), args (B,) or (B, T), every mean input (B, T)."""
    out = {
        "loss": float(loss.mean()),
        "implicit_accuracy": float((logits > 0).float().mean()),
        "margin": float(logits.mean()) / beta,
        "saturated_fraction": float((args.abs() > SATURATION_LOGIT).float().mean()),
    }
    out.update({name: float(t.mean()) for name, t in means.items()})
    return out


def _finish(z: torch.Tensor, reduction: str, beta: float, hinge: bool = False, **means) -> LossOutput:
    """Reduce per-transition logits z (B, T) to a LossOutput with metrics."""
    _check_choice(reduction, REDUCTIONS, "reduction")
    loss, args = (_hinge_reduce if hinge else _logsigmoid_reduce)(z, reduction)
    logits = z.sum(dim=1)
    return LossOutput(loss, logits, _metrics(loss, logits, args, beta, **means))


# --------------------------------------------------------------------------------------------------
# The losses
# --------------------------------------------------------------------------------------------------


def pso_offline_loss(
    model_err_target: torch.Tensor,
    frozen_err_target: torch.Tensor,
    model_err_ref: torch.Tensor,
    frozen_err_ref: torch.Tensor,
    beta: float,
    reduction: str = DEFAULT_REDUCTION,
) -> LossOutput:
    """Offline PSO, Eq. 6: both trajectories forward-noised (a Diffusion-DPO variant).

    ``z_n = -beta * [(m_t - f_t) - (m_r - f_r)]`` and ``loss = -log sigmoid(sum_n z_n)`` (sum_inside).
    The errors are per-element mean squared errors against the forward-noising target (eps in the
    paper) at a timestep shared by target and reference, with shared noise.

    Shapes: model_err_target, frozen_err_target, model_err_ref, frozen_err_ref (B, T);
    returns loss (B,), logits (B,).
    """
    check_beta(beta)
    m_t, f_t, m_r, f_r = _pair_tensors(
        model_err_target=model_err_target, frozen_err_target=frozen_err_target,
        model_err_ref=model_err_ref, frozen_err_ref=frozen_err_ref,
    )
    z = -beta * ((m_t - f_t) - (m_r - f_r))
    return _finish(z, reduction, beta, model_err_target=m_t, frozen_err_target=f_t,
                   model_err_ref=m_r, frozen_err_ref=f_r)


def pso_full_loss(
    model_err_target: torch.Tensor,
    frozen_err_target: torch.Tensor,
    logratio_ref: torch.Tensor,
    beta: float,
    reduction: str = DEFAULT_REDUCTION,
) -> LossOutput:
    """Full PSO, Eq. 5: target forward-noised, reference sampled from the current model.

    Sign, from Eq. 9 (= Eq. 3): the logit is ``beta * sum_n (lr_t,n - lr_r,n)`` with
    ``lr = log p_theta - log p_pre`` of one transition. Eq. 11 (weight omega = 1, as the paper
    uses) replaces the target's log-ratio by ``-(m_t - f_t)``; Eq. 12 gives the reference's
    ``lr_r = -(1 / (2 sigma^2)) (||x - mu_theta||^2 - ||x - mu_pre||^2)``, which is exactly minus
    Eq. 5's second bracket. Hence Eq. 5's bracket is ``(m_t - f_t) + lr_r`` and

        ``z_n = -beta * [(m_t - f_t) + logratio_ref]``,  ``loss = -log sigmoid(sum_n z_n)``.

    ``logratio_ref`` is the per-element mean of that Gaussian log-ratio of the sampled reference
    transition (the caller computes it from the step policy, with the sampled next latent detached).
    Descent lowers ``m_t`` and lowers ``logratio_ref`` (both gradients of the loss are positive).

    Note (on-policy references): when the reference is sampled from the current model, the score
    ``grad log p_theta(x)`` has zero mean under ``x ~ p_theta``. At the start (theta = theta_pre,
    so every ``lr_r`` is 0 and the sigmoid weight does not depend on the reference) the reference
    term's expected gradient is exactly zero, and later it is non-zero only through the correlation
    of the sigmoid weight with the score. Eq. 5 taken literally therefore behaves like a
    sigmoid-weighted diffusion loss on the target plus noise; Eq. 6 (forward-noised references)
    does not have this property.

    Shapes: model_err_target, frozen_err_target, logratio_ref (B, T); returns loss (B,), logits (B,).
    """
    check_beta(beta)
    m_t, f_t, lr_r = _pair_tensors(
        model_err_target=model_err_target, frozen_err_target=frozen_err_target, logratio_ref=logratio_ref
    )
    z = -beta * ((m_t - f_t) + lr_r)
    return _finish(z, reduction, beta, model_err_target=m_t, frozen_err_target=f_t, logratio_ref=lr_r)


def pso_online_loss(
    logratio_target: torch.Tensor,
    logratio_ref: torch.Tensor,
    beta: float,
    reduction: str = DEFAULT_REDUCTION,
) -> LossOutput:
    """Online PSO, Eq. 7: both trajectories sampled from the current model, ranked by a reward.

    ``z_n = beta * (lr_t,n - lr_r,n)`` with ``lr = -(1 / (2 sigma_n^2)) (||x - mu_theta||^2 -
    ||x - mu_pre||^2)`` (per-element mean) of each side's sampled transition; each transition
    carries its own ``sigma_n`` (Eq. 7 prints one factor outside the sum). ``loss = -log
    sigmoid(sum_n z_n)`` (sum_inside). Descent raises ``lr_t`` and lowers ``lr_r``.

    Shapes: logratio_target, logratio_ref (B, T); returns loss (B,), logits (B,).
    """
    check_beta(beta)
    lr_t, lr_r = _pair_tensors(logratio_target=logratio_target, logratio_ref=logratio_ref)
    z = beta * (lr_t - lr_r)
    return _finish(z, reduction, beta, logratio_target=lr_t, logratio_ref=lr_r)


def pso_online_clipped_loss(
    logratio_target: torch.Tensor,
    logratio_ref: torch.Tensor,
    beta: float,
    clip: float = 0.1,
    reduction: str = "per_transition",
) -> LossOutput:
    """Online PSO as the authors' code runs it (D3PO-style ratio clipping; Eq. 7 in spirit).

    Per transition, the ratio ``r = exp(lr)`` is clamped to ``[1 - clip, 1 + clip]`` and
    ``z_n = beta * (log r_t,n - log r_r,n)``; default reduction ``per_transition``
    (``loss = mean_n -log sigmoid(z_n)``) as in that code. The clamp is taken in log space,
    ``clamp(lr, log(1 - clip), log(1 + clip))``, which is the same function and gradient without
    overflowing ``exp``. This is not PPO's min: a ratio outside the range simply contributes no
    gradient (a trust region), and ``|z_n| <= beta * log((1 + clip) / (1 - clip))``.

    Shapes: logratio_target, logratio_ref (B, T); returns loss (B,), logits (B,).
    """
    check_beta(beta)
    if not (isinstance(clip, (int, float)) and 0.0 < clip < 1.0):
        raise ValueError(
            f"clip must be in (0, 1), got {clip!r}: ratios are clamped to [1 - clip, 1 + clip] "
            "(the authors use 0.1)."
        )
    lr_t, lr_r = _pair_tensors(logratio_target=logratio_target, logratio_ref=logratio_ref)
    lo, hi = math.log1p(-clip), math.log1p(clip)
    z = beta * (lr_t.clamp(lo, hi) - lr_r.clamp(lo, hi))
    out = _finish(z, reduction, beta, logratio_target=lr_t, logratio_ref=lr_r)
    with torch.no_grad():
        outside = torch.cat([(lr_t < lo) | (lr_t > hi), (lr_r < lo) | (lr_r > hi)])
        out.metrics["clipped_fraction"] = float(outside.float().mean())
    return out


def pso_dreambooth_loss(
    model_err_target: torch.Tensor,
    frozen_err_target: torch.Tensor | None,
    model_err_ref: torch.Tensor,
    frozen_err_ref: torch.Tensor | None,
    sigma: torch.Tensor,
    beta: float,
    ref_scale: float = 0.1,
    form: str = "pso",
    reduction: str = DEFAULT_REDUCTION,
    ref_sft_weight: float = 0.0,
) -> LossOutput:
    """DreamBooth-style PSO (concept customisation, Section 3.3) as in the authors' code.

    The errors are per-element mean squared errors of the predicted CLEAN latent (x0) against the
    clean target / reference latent, both forward-noised with shared noise and a shared sigma. Each
    is weighted EDM-style by ``w = sigma^-2``; the reference term is scaled by ``s = ref_scale``.

    - ``form="pso"``: ``z_n = -beta * w * [(m_t - f_t) - s (m_r - f_r)]``,
      ``loss = -log sigmoid(sum_n z_n)`` (sum_inside).
    - ``form="pso_db"`` (the authors' default; no frozen model, ``frozen_err_*`` may be None):
      ``z_n = -beta * w * (m_t - s m_r)``, hinge ``loss = relu(1 - sum_n z_n)`` (sum_inside). It
      stops pushing once the weighted target error is ``1 / beta`` below ``s`` times the reference's.
    - ``ref_sft_weight``: adds ``ref_sft_weight * mean_n(w * m_r)`` to each pair's loss (prior
      preservation on the references). The authors use 0.5 with ``pso_db``.

    Both forms are read from the authors' ``personalization/train_pso_sdxl_turbo_dreambooth.py``
    (one timestep per pair there, T = 1, where both reductions agree).

    Shapes: model_err_target, frozen_err_target, model_err_ref, frozen_err_ref (B, T); sigma
    broadcastable to (B, T); returns loss (B,), logits (B,).
    """
    check_beta(beta)
    _check_choice(form, DREAMBOOTH_FORMS, "DreamBooth form")
    if not (isinstance(ref_scale, (int, float)) and ref_scale >= 0):
        raise ValueError(f"ref_scale must be >= 0, got {ref_scale!r} (the authors use 0.1).")
    if not (isinstance(ref_sft_weight, (int, float)) and ref_sft_weight >= 0):
        raise ValueError(f"ref_sft_weight must be >= 0, got {ref_sft_weight!r} (the authors use 0.5 or 0).")
    if form == "pso" and (frozen_err_target is None or frozen_err_ref is None):
        raise ValueError(
            "form 'pso' needs frozen_err_target and frozen_err_ref; use form 'pso_db' without a frozen model."
        )
    if form == "pso":
        m_t, f_t, m_r, f_r = _pair_tensors(
            model_err_target=model_err_target, frozen_err_target=frozen_err_target,
            model_err_ref=model_err_ref, frozen_err_ref=frozen_err_ref,
        )
    else:
        m_t, m_r = _pair_tensors(model_err_target=model_err_target, model_err_ref=model_err_ref)
    sigma = torch.as_tensor(sigma, dtype=m_t.dtype, device=m_t.device)
    if not bool((sigma > 0).all()):
        raise ValueError(f"sigma must be > 0 everywhere, got min {float(sigma.min())}.")
    try:
        w = sigma.pow(-2).expand_as(m_t)
    except RuntimeError as err:
        raise ValueError(
            f"sigma of shape {tuple(sigma.shape)} does not broadcast to the errors' {tuple(m_t.shape)}."
        ) from err
    means = {"model_err_target": m_t, "model_err_ref": m_r}
    if form == "pso":
        z = -beta * w * ((m_t - f_t) - ref_scale * (m_r - f_r))
        means.update(frozen_err_target=f_t, frozen_err_ref=f_r)
    else:
        z = -beta * w * (m_t - ref_scale * m_r)
    out = _finish(z, reduction, beta, hinge=(form == "pso_db"), **means)
    if ref_sft_weight == 0:
        return out
    loss = out.loss + ref_sft_weight * (w * m_r).mean(dim=1)
    return LossOutput(loss, out.logits, {**out.metrics, "loss": float(loss.detach().mean())})


def _dreambooth_hinge_loss(
    model_err_target: torch.Tensor, model_err_ref: torch.Tensor, sigma: torch.Tensor, beta: float, **options
) -> LossOutput:
    """``pso_dreambooth_loss(form="pso_db")`` without the frozen errors, for :data:`LOSSES`."""
    return pso_dreambooth_loss(
        model_err_target, None, model_err_ref, None, sigma, beta, form="pso_db", **options
    )


def diffusion_dpo_loss(
    model_err_w: torch.Tensor,
    ref_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta_dpo: float,
    reduction: str = DEFAULT_REDUCTION,
) -> LossOutput:
    """Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908), the multi-step baseline.

    ``z_n = -0.5 * beta_dpo * [(m_w - r_w) - (m_l - r_l)]`` with per-element mean squared errors
    against the forward-noising target (winner w, loser l, shared noise and timestep; ``r`` the
    frozen reference model), ``loss = -log sigmoid(sum_n z_n)``. The factor -0.5 is that of the
    authors' code and diffusers' ``train_diffusion_dpo_sdxl.py`` (beta_dpo 5000); diffusers' SD1.5
    ``train_diffusion_dpo.py`` drops the 0.5, so its beta_dpo is worth twice as much. The
    ``T * omega(lambda_t)`` factor of the paper is folded into beta_dpo. Apart from that 0.5 this is
    Eq. 6 with (target, reference) = (winner, loser).

    Shapes: model_err_w, ref_err_w, model_err_l, ref_err_l (B, T); returns loss (B,), logits (B,).
    """
    check_beta(beta_dpo, "beta_dpo")
    m_w, r_w, m_l, r_l = _pair_tensors(
        model_err_w=model_err_w, ref_err_w=ref_err_w, model_err_l=model_err_l, ref_err_l=ref_err_l
    )
    z = -0.5 * beta_dpo * ((m_w - r_w) - (m_l - r_l))
    return _finish(z, reduction, beta_dpo, model_err_target=m_w, frozen_err_target=r_w,
                   model_err_ref=m_l, frozen_err_ref=r_l)


def sft_loss(model_err_target: torch.Tensor) -> LossOutput:
    """Plain diffusion loss on the target (supervised fine-tuning), the baseline PSO improves on.

    ``loss = mean_n m_t,n``. Section 2.1: minimising it directly blurs few-step samples.

    Shapes: model_err_target (B, T); returns loss (B,), logits None.
    """
    (m_t,) = _pair_tensors(model_err_target=model_err_target)
    loss = m_t.mean(dim=1)
    with torch.no_grad():
        metrics = {"loss": float(loss.mean()), "model_err_target": float(m_t.mean())}
    return LossOutput(loss, None, metrics)


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


#: How a loss's pairs come to be: given beforehand (the PSO Train node, headless datasets) or sampled each
#: round from the current model and ranked by a reward (the PSO Online Train node, headless ``prompts``).
MODES: dict[str, str] = {
    "offline": "pairs given beforehand: targets with references sampled by the model or rejected images",
    "online": "pairs sampled each round from the current model and ranked by a reward (Algorithm 2)",
}

#: Where a forward-noised loss measures its squared errors (``LossSpec.error_space``, the default of
#: ``pso.methods.MethodConfig.error_space``).
ERROR_SPACES: dict[str, str] = {
    "eps": "squared error of the implied noise (Eqs. 5-6); at sigma, an x0 error counts 1/sigma^2 as much",
    "x0": "squared error of the predicted clean latent; every level's x0 counts the same (keeps the "
          "highest-noise prediction, i.e. 1-step samples, under the frozen model's pull)",
}

#: Which noise levels a forward-noised loss trains at (``LossSpec.levels``, the default of
#: ``pso.methods.MethodConfig.levels``).
LEVELS: dict[str, str] = {
    "few_step": "the input levels of the N-step schedule's stochastic transitions (the paper's n = 2..N)",
    "few_step_final": "every input level of the N-step schedule, the deterministic last step's too "
                      "(forward-noised losses only: its error is what the final sample is made of)",
    "continuous": "one level per pair, percent_to_sigma(u) with u ~ U(0, 1) (Diffusion-DPO, plain SFT)",
}

#: Where the references of a pair come from, which decides beta (``LossSpec.beta_by_source``): the nodes'
#: beta tooltips name the two.
BETA_SOURCES: dict[str, str] = {
    "self_sampled": "references the model sampled itself (re-sampled during training; online rounds)",
    "preference_pairs": "preference pairs: rejected images of real people's choices (Pick-a-Pic)",
}


@dataclass(frozen=True)
class LossSpec:
    """One entry of :data:`LOSSES`: everything the code outside this file needs to know about a loss.

    ``fn`` takes the tensors it needs as keyword arguments named as in :data:`INPUTS` (:attr:`inputs`
    reads them from its signature), then ``beta`` (when ``default_beta`` is not None), ``reduction``
    (when ``default_reduction`` is not None) and keyword options.

    - ``mode``: key of :data:`MODES`, which node and which headless data trains it.
    - ``target_path`` / ``reference_path``: keys of :data:`PATHS` (``reference_path`` None: no pair).
    - ``needs_gaussian_policy``: the loss uses log-ratios of sampled transitions, so the sampler must
      have a Gaussian step (not plain Euler); ``needs_frozen_model``: the caller must run the frozen model.
    - ``error_space`` / ``levels``: keys of :data:`ERROR_SPACES` / :data:`LEVELS`, how the forward-noised
      sides are measured and at which noise levels (None: the loss has no forward-noised side).
    - ``default_beta``: the paper's, or the authors' code's for their variants (None: the loss has no
      beta); ``beta_by_source``: the measured beta per :data:`BETA_SOURCES` key where it differs
      (:meth:`beta_for`). ``default_reduction`` None: the loss has no reduction.
    - ``tooltip``: the choice's description on its node (None: ``"{equation}: {description} (default
      beta ...)"``); ``offered``: the node of its ``mode`` lists it (order of :data:`LOSSES` = the
      released order of the choice list; never reorder or rename an offered loss).
    - ``target_anchor``: the PSO Train node adds ``target_sft_weight`` times the targets' diffusion loss
      to it (``pso.methods.add_target_anchor``; measured on bench/digits for this loss only).
    """

    fn: Callable[..., LossOutput]
    mode: str
    target_path: str
    reference_path: str | None
    needs_gaussian_policy: bool
    needs_frozen_model: bool
    error_space: str | None
    levels: str | None
    default_beta: float | None
    default_reduction: str | None
    equation: str
    description: str
    beta_by_source: Mapping[str, float] = field(default_factory=dict)
    tooltip: str | None = None
    offered: bool = True
    target_anchor: bool = False

    def __post_init__(self) -> None:
        _check_choice(self.mode, MODES, "loss mode")
        forward = "forward" in (self.target_path, self.reference_path)
        if forward != (self.error_space is not None) or forward != (self.levels is not None):
            raise ValueError(f"a loss with forward-noised sides names its error_space and levels, one "
                             f"without names neither; got {self.error_space!r}, {self.levels!r}")
        if forward:
            _check_choice(self.error_space, ERROR_SPACES, "error space")
            _check_choice(self.levels, LEVELS, "levels")
        unknown = sorted(set(self.beta_by_source) - set(BETA_SOURCES))
        if unknown:
            raise ValueError(f"unknown beta sources {unknown}; valid: {', '.join(BETA_SOURCES)}.")

    @property
    def inputs(self) -> tuple[str, ...]:
        """The :data:`INPUTS` the function takes, in its signature's order."""
        return tuple(p for p in inspect.signature(self.fn).parameters if p in INPUTS)

    @property
    def shares_noise(self) -> bool:
        """Whether target and reference of a pair must share forward-noising noise."""
        return self.target_path == "forward" and self.reference_path == "forward"

    @property
    def pairwise(self) -> bool:
        """Whether the loss compares a target with a reference (all but SFT)."""
        return self.reference_path is not None

    def beta_or_default(self, beta: float | None) -> float | None:
        """``beta``, or :attr:`default_beta` for None: the one place "None = the loss's default" is
        resolved (:func:`compute_loss`, ``pso.methods.MethodConfig.resolved_beta``)."""
        return self.default_beta if beta is None else beta

    def beta_for(self, source: str) -> float | None:
        """The beta to start from for references from ``source`` (a :data:`BETA_SOURCES` key)."""
        _check_choice(source, BETA_SOURCES, "beta source")
        return self.beta_by_source.get(source, self.default_beta)

    @property
    def choice_tooltip(self) -> str:
        if self.tooltip is not None:
            return self.tooltip
        return f"{self.equation}: {self.description} (default beta {self.default_beta:g})"


def _diffusion_dpo_by_name(model_err_target: torch.Tensor, frozen_err_target: torch.Tensor,
                           model_err_ref: torch.Tensor, frozen_err_ref: torch.Tensor, beta: float,
                           reduction: str = DEFAULT_REDUCTION) -> LossOutput:
    """:func:`diffusion_dpo_loss` with the inputs named as in :data:`INPUTS` (winner = target)."""
    return diffusion_dpo_loss(model_err_target, frozen_err_target, model_err_ref, frozen_err_ref, beta,
                              reduction)


LOSSES: dict[str, LossSpec] = {
    "pso_offline": LossSpec(
        fn=pso_offline_loss, mode="offline", target_path="forward", reference_path="forward",
        needs_gaussian_policy=False, needs_frozen_model=True, error_space="eps", levels="few_step",
        default_beta=50.0, default_reduction=DEFAULT_REDUCTION, equation="Eq. 6",
        description="offline PSO: target and reference both forward-noised (references sampled beforehand)",
        # chosen on bench/digits (bench/README.md): references re-sampled every step want less pull
        beta_by_source={"self_sampled": 10.0, "preference_pairs": 50.0}, target_anchor=True,
        tooltip="offline PSO (Eq. 6): target and reference both forward-noised; with reference refresh, "
                "references are re-sampled from the current model (the default)",
    ),
    "pso_full": LossSpec(
        fn=pso_full_loss, mode="offline", target_path="forward", reference_path="sampled",
        needs_gaussian_policy=True, needs_frozen_model=True, error_space="eps", levels="few_step",
        default_beta=5.0, default_reduction=DEFAULT_REDUCTION, equation="Eq. 5",
        description="full PSO: target forward-noised, reference trajectory sampled from the current model",
        tooltip="full PSO (Eq. 5): reference transitions scored under the model's own sampler policy; needs "
                "a stochastic sampler (lcm / euler_ancestral)",
    ),
    "pso_online": LossSpec(
        fn=pso_online_loss, mode="online", target_path="sampled", reference_path="sampled",
        needs_gaussian_policy=True, needs_frozen_model=True, error_space=None, levels=None,
        default_beta=5.0, default_reduction=DEFAULT_REDUCTION, equation="Eq. 7",
        description="online PSO: two sampled trajectories ranked by a reward model",
        beta_by_source={"self_sampled": 5.0},  # Appendix B.1 (bench/digits' 10 is for Eq. 6's errors)
    ),
    "pso_online_clipped": LossSpec(
        fn=pso_online_clipped_loss, mode="online", target_path="sampled", reference_path="sampled",
        needs_gaussian_policy=True, needs_frozen_model=True, error_space=None, levels=None,
        default_beta=50.0, default_reduction="per_transition", equation="Eq. 7 (authors' code)",
        description="online PSO as the authors run it: ratio clipped to [0.9, 1.1], one log-sigmoid a step",
        beta_by_source={"self_sampled": 50.0},
    ),
    "pso_dreambooth": LossSpec(
        fn=functools.partial(pso_dreambooth_loss, form="pso"), mode="offline", target_path="forward",
        reference_path="forward", needs_gaussian_policy=False, needs_frozen_model=True, error_space="x0",
        levels="few_step", default_beta=5.0, default_reduction=DEFAULT_REDUCTION,
        equation="Section 3.3 (authors' code, form pso)",
        description="concept PSO: x0 errors weighted by sigma^-2, reference term scaled by 0.1, frozen model",
        tooltip="DreamBooth-style PSO: clean-image errors weighted by sigma^-2, reference term x0.1",
    ),
    "pso_dreambooth_hinge": LossSpec(
        fn=_dreambooth_hinge_loss, mode="offline", target_path="forward", reference_path="forward",
        needs_gaussian_policy=False, needs_frozen_model=False, error_space="x0", levels="few_step",
        default_beta=5.0, default_reduction=DEFAULT_REDUCTION,
        equation="Section 3.3 (authors' code, form pso_db)",
        description="concept PSO as the authors default: hinge on x0 errors, no frozen model",
        tooltip="DreamBooth-style hinge form without the frozen model (authors' default)",
    ),
    "diffusion_dpo": LossSpec(
        fn=_diffusion_dpo_by_name, mode="offline", target_path="forward", reference_path="forward",
        needs_gaussian_policy=False, needs_frozen_model=True, error_space="eps", levels="continuous",
        default_beta=5000.0, default_reduction=DEFAULT_REDUCTION,
        equation="Wallace et al. 2023 (arXiv 2311.12908)",
        description="Diffusion-DPO, the multi-step preference baseline (target = winner, reference = loser)",
        offered=False,  # a multi-step baseline for bench/ and headless runs, not offered by PSO Train
    ),
    "sft": LossSpec(
        fn=sft_loss, mode="offline", target_path="forward", reference_path=None,
        needs_gaussian_policy=False, needs_frozen_model=False, error_space="eps", levels="continuous",
        default_beta=None, default_reduction=None, equation="Section 2.1",
        description="plain diffusion loss on the target: the blurring baseline",
        tooltip="plain diffusion-loss fine-tuning on the targets only (the blurry baseline, for comparison)",
    ),
}


def node_choices(mode: str) -> dict[str, str]:
    """The losses the node of ``mode`` (a :data:`MODES` key) offers, name -> tooltip, in the released
    order: PSO Train's ``method`` for "offline", PSO Online Train's for "online"."""
    _check_choice(mode, MODES, "loss mode")
    return {name: spec.choice_tooltip for name, spec in LOSSES.items() if spec.mode == mode and spec.offered}


def losses_of(mode: str) -> tuple[str, ...]:
    """Every loss of ``mode`` (a :data:`MODES` key), offered by a node or not (headless runs take all)."""
    _check_choice(mode, MODES, "loss mode")
    return tuple(name for name, spec in LOSSES.items() if spec.mode == mode)


def get_loss(name: str) -> LossSpec:
    """The :class:`LossSpec` registered under ``name``; ValueError listing the valid names."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}.")
    return LOSSES[name]


def compute_loss(
    name: str,
    inputs: Mapping[str, torch.Tensor],
    beta: float | None = None,
    reduction: str | None = None,
    **options,
) -> LossOutput:
    """Run the loss ``name`` on the tensors in ``inputs`` (keys of :data:`INPUTS`, each (B, T)).

    ``beta`` and ``reduction`` default to the spec's; both are ignored by losses that have none
    (SFT). ``options`` go to the function unchanged (``clip``, ``ref_scale``, ``ref_sft_weight``).
    Extra entries of ``inputs`` are ignored, so a trainer can pass everything it computed.
    """
    spec = get_loss(name)
    missing = [k for k in spec.inputs if k not in inputs]
    if missing:
        raise ValueError(
            f"loss {name!r} needs inputs {list(spec.inputs)}; missing {missing} (got {sorted(inputs)})."
        )
    named = {k: inputs[k] for k in spec.inputs}
    if spec.default_beta is not None:
        named["beta"] = spec.beta_or_default(beta)
    if spec.default_reduction is not None:
        named["reduction"] = spec.default_reduction if reduction is None else reduction
    return spec.fn(**named, **options)
