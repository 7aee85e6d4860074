"""Training methods: how one pair batch becomes the inputs of a loss in :mod:`pso.losses`.

A method runs the model being trained (``model``, LoRA on, with gradients) and the frozen
pre-trained model (``frozen``, the same weights with the LoRA off, no gradients) on the two sides of
each pair, and turns their predictions into the per-sample errors or log-ratios that the loss needs:

- forward-noised sides (Eq. 5's target, Eq. 6 both sides, the DreamBooth variant, Diffusion-DPO,
  SFT): a clean latent is noised to a training level with noise that is *shared by the pair*, and
  the squared error of the implied noise (eps space, Eqs. 5-6) or of x0 (DreamBooth) is measured;
- sampled sides (Eq. 5's reference, both sides of Eq. 7): a recorded :class:`~pso.samplers.Trajectory`
  is scored under both models with :func:`~pso.samplers.transition_log_probs`.

Training levels: the paper's sums run over the stochastic transitions n = 2..N of the N-step
sampler, i.e. the input levels ``sigmas[0 .. N-2]`` of a (N+1,) SIGMAS tensor (the last step is
deterministic). ``transitions="all"`` uses all of them (the paper), ``"one"`` one level per pair
drawn uniformly (an estimate of the sum up to the factor N-1, which beta absorbs; N-1 times
cheaper). Both sides of a pair always share their levels. Diffusion-DPO and SFT, the multi-step
baselines, draw a continuous level per pair instead (``percent_to_sigma(u)``, u ~ U(0, 1)), as
Wallace et al. and ComfyUI's native trainer do.

Conditioning (``cond``) is a batch-aligned tensor or ``None`` and is passed to the denoisers
unchanged; the ComfyUI layer passes indices into its conditioning list, the digits benchmark passes
class labels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .losses import ERROR_SPACES, LEVELS, LOSSES, REDUCTIONS, LossOutput, check_beta, compute_loss, get_loss
from .samplers import (
    Denoiser,
    Trajectory,
    cat_trajectories,
    require_gaussian_policy,
    transition_log_probs,
)
from .schedules import add_noise, check_sigmas, noise_from_x0, parameterization

logger = logging.getLogger(__name__)

TRANSITIONS: dict[str, str] = {
    "all": "every stochastic transition of the N-step schedule (the paper's sum over n = 2..N)",
    "one": "one transition per pair, drawn uniformly (an N-1 times cheaper estimate of the sum)",
}


#: Where the target anchor (``MethodConfig.target_sft_weight``) is taken: name -> what.
ANCHOR_LEVELS: dict[str, str] = {
    "pair": "at the pair's training levels only (the pairwise loss's: the last step's input level is never "
            "trained)",
    "final": "also at the last step's input level of the batch's schedule, where the final sample's fine "
             "detail is made",
    "continuous": "also at one level per pair drawn as plain fine-tuning draws it (every noise level)",
}


@dataclass(frozen=True)
class MethodConfig:
    """Which loss, and its settings (``None`` takes the loss's registry default): the one validated
    object that carries a run's loss settings to :func:`compute_method_loss` (the nodes' settings and
    the headless config build one; beta, reduction and the anchor are checked here, once)."""

    loss: str = "pso_offline"
    beta: float | None = None
    reduction: str | None = None
    transitions: str = "all"
    options: dict[str, Any] = field(default_factory=dict)  # e.g. ref_scale, clip, form
    levels: str | None = None  # a LEVELS key; None: the loss's (LossSpec.levels)
    error_space: str | None = None  # an ERROR_SPACES key; None: the loss's (LossSpec.error_space)
    target_sft_weight: float = 0.0  # see add_target_anchor; 0 = the paper's losses as written
    anchor_levels: str = "pair"  # an ANCHOR_LEVELS key: where the anchor is taken
    first_step_weight: float = 0.0  # online losses: see add_first_step_penalty; 0 = as written

    def __post_init__(self):
        get_loss(self.loss)  # raises with the list of valid names
        if self.beta is not None:
            check_beta(self.beta)
        if self.reduction is not None and self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction {self.reduction!r} is unknown; choose one of {sorted(REDUCTIONS)}")
        if self.transitions not in TRANSITIONS:
            raise ValueError(f"transitions must be one of {sorted(TRANSITIONS)}, got {self.transitions!r}")
        if self.levels is not None and self.levels not in LEVELS:
            raise ValueError(f"levels must be one of {sorted(LEVELS)} or None, got {self.levels!r}")
        if self.levels in ("continuous", "few_step_final") and LOSSES[self.loss].reference_path == "sampled":
            raise ValueError(f"loss {self.loss!r} scores sampled transitions at the schedule's levels; "
                             f"levels={self.levels!r} does not apply to it")
        if self.error_space is not None and self.error_space not in ERROR_SPACES:
            raise ValueError(f"error_space must be one of {sorted(ERROR_SPACES)} or None, got "
                             f"{self.error_space!r}")
        if self.error_space is not None and LOSSES[self.loss].target_path != "forward":
            raise ValueError(f"loss {self.loss!r} scores sampled transitions (log-probabilities); "
                             "error_space applies to forward-noised losses only")
        if not (math.isfinite(self.target_sft_weight) and self.target_sft_weight >= 0):
            raise ValueError(f"target_sft_weight must be a finite number >= 0, got "
                             f"{self.target_sft_weight!r}")
        if self.target_sft_weight and (LOSSES[self.loss].target_path != "forward"
                                       or not LOSSES[self.loss].pairwise):
            raise ValueError(f"target_sft_weight={self.target_sft_weight} anchors a pairwise loss's "
                             f"forward-noised target; loss {self.loss!r} has none: leave it at 0")
        if not (math.isfinite(self.first_step_weight) and self.first_step_weight >= 0):
            raise ValueError(f"first_step_weight must be a finite number >= 0, got "
                             f"{self.first_step_weight!r}")
        if self.first_step_weight and LOSSES[self.loss].target_path != "sampled":
            raise ValueError(f"first_step_weight={self.first_step_weight} holds the first step of sampled "
                             f"target and reference trajectories (online PSO); loss {self.loss!r} has "
                             "none: leave it at 0")
        if self.anchor_levels not in ANCHOR_LEVELS:
            raise ValueError(f"anchor_levels must be one of {sorted(ANCHOR_LEVELS)}, got "
                             f"{self.anchor_levels!r}")

    @property
    def resolved_beta(self) -> float | None:
        """The beta the loss runs with: ``beta``, or the loss's default for None (None: SFT has none)."""
        return LOSSES[self.loss].beta_or_default(self.beta)


@dataclass
class PairBatch:
    """One batch of B pairs. Which fields are needed depends on the loss (see :func:`required_fields`).

    Shapes: target, reference (B, C, H, W) clean latents; target_traj / reference_traj are
    trajectories of B samples; cond (B, ...) tensor or None.
    """

    target: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    target_traj: Trajectory | None = None
    reference_traj: Trajectory | None = None
    cond: torch.Tensor | None = None
    sigmas: torch.Tensor | None = None  # (n+1,) a sub-schedule the batch trains on (see batch_levels)

    @property
    def batch_size(self) -> int:
        for v in (self.target, self.reference):
            if v is not None:
                return v.shape[0]
        for t in (self.target_traj, self.reference_traj):
            if t is not None:
                return t.batch_size
        raise ValueError("empty PairBatch: it has neither latents nor trajectories")


def required_fields(loss: str) -> tuple[str, ...]:
    """The :class:`PairBatch` fields a loss needs: clean latents for forward-noised sides,
    trajectories for sampled ones."""
    spec = get_loss(loss)
    side = {"forward": ("target", "reference"), "sampled": ("target_traj", "reference_traj")}
    out = [side[spec.target_path][0]]
    if spec.reference_path is not None:
        out.append(side[spec.reference_path][1])
    return tuple(out)


def training_levels(sigmas: torch.Tensor) -> torch.Tensor:
    """The input noise levels of the stochastic transitions of an N-step schedule (n = 2..N).

    Shapes: sigmas (N+1,) decreasing, ending in 0 -> (N-1,).
    """
    return check_sigmas(sigmas, min_steps=2, what="the training schedule (sigmas)")[:-2]


def batch_levels(sigmas: torch.Tensor) -> torch.Tensor:
    """Training levels of a batch whose references were sampled with a sub-schedule of n steps (the
    step-count mixing of :class:`pso.batches.PairBatchSource`): the paper's stochastic transitions
    (:func:`training_levels`) for n >= 2, and the single level of a 1-step schedule, whose only step
    is the deterministic one (for forward-noised losses its error is well defined: it is what the
    1-step sample is made of).

    Shapes: sigmas (n+1,) -> (max(n-1, 1),).
    """
    if sigmas.ndim == 1 and sigmas.numel() == 2:
        return check_sigmas(sigmas, what="the batch's sub-schedule (sigmas)")[:1]
    return training_levels(sigmas)


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None else torch.cat([a, b], dim=0)


def _repeat(t: torch.Tensor | None, k: int) -> torch.Tensor | None:
    return None if t is None else t.repeat((k,) + (1,) * (t.ndim - 1))


def _randn(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal draws on the generator's own device (callers move them), so one CPU
    generator drives training on any device and CPU runs reproduce bit for bit."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=device)


@dataclass
class PairGenerators:
    """Randomness that does not depend on how a batch is split over processes (data-parallel training).

    ``pairs`` holds one generator per pair of the batch, in batch order: everything drawn per pair
    (forward-noising noise, per-pair levels) comes from the pair's own generator, so a pair gets the
    same noise whether it sits in a batch of 64 on one process or of 32 on each of two. ``shared``
    serves the draws made once per batch (Eq. 5's common level, one sampled transition for the batch);
    every process must seed it identically. A plain ``torch.Generator`` passed instead draws everything
    from one stream (single-process training, :class:`pso.trainer.Trainer`; see :class:`OneStream`).

    The draws of a batch (:func:`draws` gives this object or a :class:`OneStream`, which draw alike):
    ``randn_level_major`` noise for b pairs at t levels, ``level_indices`` one index per pair,
    ``uniform`` one U[0, 1) number per pair.
    """

    shared: torch.Generator
    pairs: list[torch.Generator]

    def _check(self, batch: int) -> None:
        if len(self.pairs) != batch:
            raise ValueError(f"PairGenerators holds {len(self.pairs)} pair generators for a batch of "
                             f"{batch} pairs; give one generator per pair.")

    def randn_level_major(self, t: int, b: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Pair i's t draws from its own generator, rows level-major. Shapes: -> (t*b, *shape)."""
        self._check(b)
        per_pair = torch.stack([_randn((t, *shape), g) for g in self.pairs], dim=1)  # (t, b, ...)
        return per_pair.reshape(t * b, *shape)

    def level_indices(self, count: int, b: int) -> torch.Tensor:
        """One index in [0, count) per pair. Shapes: -> (b, 1)."""
        self._check(b)
        return torch.cat([torch.randint(0, count, (1, 1), generator=g, device=g.device) for g in self.pairs])

    def uniform(self, b: int) -> torch.Tensor:
        """One U[0, 1) number per pair (CPU). Shapes: -> (b,)."""
        self._check(b)
        return torch.cat([torch.rand(1, generator=g) for g in self.pairs])


@dataclass
class OneStream:
    """Every draw of a batch from one generator (None: torch's global one), in one call per kind of
    draw: the single-process form of :class:`PairGenerators`, with the same methods."""

    shared: torch.Generator | None

    def randn_level_major(self, t: int, b: int, shape: tuple[int, ...]) -> torch.Tensor:
        return _randn((t * b, *shape), self.shared)

    def level_indices(self, count: int, b: int) -> torch.Tensor:
        device = self.shared.device if self.shared is not None else torch.device("cpu")
        return torch.randint(0, count, (b, 1), generator=self.shared, device=device)

    def uniform(self, b: int) -> torch.Tensor:
        return torch.rand(b, generator=self.shared)


#: What the randomness arguments of this module accept.
Randomness = torch.Generator | PairGenerators | OneStream | None
Draws = PairGenerators | OneStream


def draws(generator: Randomness) -> Draws:
    """The one place a randomness argument is told apart: a :class:`PairGenerators` or
    :class:`OneStream` as it is, a ``torch.Generator`` (or None) as a :class:`OneStream`."""
    return generator if isinstance(generator, (PairGenerators, OneStream)) else OneStream(generator)


def _per_element_sq_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-element mean squared error. Shapes: (B, ...) -> (B,)."""
    return (a.float() - b.float()).square().reshape(a.shape[0], -1).mean(dim=1)


def pick_levels(levels: torch.Tensor, batch: int, transitions: str, generator: Randomness) -> torch.Tensor:
    """Training levels per pair. Shapes: levels (L,) -> (B, T) with T = L ("all") or 1 ("one")."""
    if transitions == "all":
        return levels.unsqueeze(0).expand(batch, -1)
    idx = draws(generator).level_indices(levels.numel(), batch)
    return levels[idx.to(levels.device)]


def continuous_levels(model_sampling: Any, batch: int, generator: Randomness) -> torch.Tensor:
    """One continuous level per pair, ``percent_to_sigma(u)``, u ~ U(0, 1) (Diffusion-DPO, SFT).

    Shapes: returns (B, 1).
    """
    # rand is in [0, 1); ComfyUI's percent_to_sigma(0) is a huge sentinel (999999999.9), not a level
    u = draws(generator).uniform(batch).clamp_min(1e-6)
    return torch.tensor([[float(model_sampling.percent_to_sigma(float(x)))] for x in u])


def forward_noised_errors(
    denoiser: Denoiser,
    clean: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    cond: torch.Tensor | None,
    model_sampling: Any,
    space: str = "eps",
) -> torch.Tensor:
    """Squared errors of a denoiser on forward-noised latents (the bracketed terms of Eqs. 5-6).

    ``x = add_noise(clean, noise, sigma)``; ``space="eps"`` compares the implied noise
    ``noise_from_x0(x, x0_pred)`` with ``noise`` (Eqs. 5-6 in the variance-exploding frame);
    ``space="x0"`` compares ``x0_pred`` with ``clean`` (DreamBooth variant). Per-element means.

    Shapes: clean, noise (B, ...); sigma (B,); cond (B, ...) or None; returns (B,).
    """
    param = parameterization(model_sampling)
    x = add_noise(clean, noise, sigma, param)
    x0 = denoiser(x, sigma, cond)
    if space == "x0":
        return _per_element_sq_err(x0, clean)
    return _per_element_sq_err(noise_from_x0(x, x0, sigma, param), noise)


def _levels_for(cfg: MethodConfig, batch: PairBatch, sigmas: torch.Tensor, model_sampling: Any,
                rng: Draws) -> torch.Tensor:
    levels_kind = cfg.levels or LOSSES[cfg.loss].levels
    if levels_kind == "continuous":
        return continuous_levels(model_sampling, batch.batch_size, rng)
    sched = sigmas if batch.sigmas is None else batch.sigmas.to(sigmas)
    if levels_kind == "few_step_final":
        levels = check_sigmas(sched, what="the training schedule (sigmas)")[:-1]
    else:
        levels = training_levels(sched) if batch.sigmas is None else batch_levels(sched)
    if LOSSES[cfg.loss].reference_path == "sampled":
        # Eq. 5 scores the reference trajectory one step at a time: one level for the whole batch.
        return pick_levels(levels, 1, cfg.transitions, rng.shared).expand(batch.batch_size, -1)
    return pick_levels(levels, batch.batch_size, cfg.transitions, rng)


def _forward_side_errors(
    model: Denoiser, frozen: Denoiser | None, batch: PairBatch, levels: torch.Tensor,
    model_sampling: Any, rng: Draws, space: str, with_reference: bool,
) -> dict[str, torch.Tensor]:
    """Errors of both models on the forward-noised sides, all T levels in one batched call.

    The pair shares one noise draw per level (Eq. 6 / Diffusion-DPO). Returns (B, T) tensors.
    """
    b, t = levels.shape
    target = batch.target
    noise = rng.randn_level_major(t, b, tuple(target.shape[1:])).to(target)
    sig = levels.t().reshape(-1).to(target.device)  # level-major: rows [level0 of all pairs, ...]
    clean, cond = _repeat(target, t), _repeat(batch.cond, t)
    if with_reference:
        clean, cond = _cat(clean, _repeat(batch.reference, t)), _cat(cond, _repeat(batch.cond, t))
        noise, sig = torch.cat([noise, noise]), torch.cat([sig, sig])

    def split(errs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        errs = errs.reshape(-1, t, b).transpose(1, 2)  # (sides, B, T)
        return errs[0], (errs[1] if with_reference else None)

    out = {}
    if frozen is not None:
        # The no-grad pass first: its working set is freed before the model's pass saves its
        # activations for backward, so the peak is that of the model's pass alone (not their sum).
        with torch.no_grad():
            out["frozen_err_target"], out["frozen_err_ref"] = split(
                forward_noised_errors(frozen, clean, noise, sig, cond, model_sampling, space))
    out["model_err_target"], out["model_err_ref"] = split(
        forward_noised_errors(model, clean, noise, sig, cond, model_sampling, space))
    return {k: v for k, v in out.items() if v is not None}


def _sampled_logratio(model: Denoiser, frozen: Denoiser, traj: Trajectory, cond: torch.Tensor | None,
                      model_sampling: Any, steps: list[int],
                      keep_x0: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """``log pi_theta - log pi_pre`` of recorded transitions (Eqs. 5, 7), and with ``keep_x0`` both
    models' x0 predictions at those steps (model's with gradients). Shapes: returns (B, T) and
    (B, T, ...) twice, or None."""
    with torch.no_grad():  # first, for the same peak-memory reason as in _forward_side_errors
        lp_frozen = transition_log_probs(frozen, traj, cond, model_sampling, steps=steps, grad=False,
                                         return_x0=keep_x0)
    lp_model = transition_log_probs(model, traj, cond, model_sampling, steps=steps, grad=True,
                                    return_x0=keep_x0)
    if not keep_x0:
        return lp_model - lp_frozen, None
    return lp_model[0] - lp_frozen[0], (lp_model[1], lp_frozen[1])


def _sampled_steps(traj: Trajectory, transitions: str, rng: Draws) -> list[int]:
    steps = traj.stochastic_steps()
    if transitions == "one" and steps:
        steps = [steps[int(torch.randint(0, len(steps), (1,), generator=rng.shared))]]
    return steps


def compute_method_loss(
    cfg: MethodConfig,
    batch: PairBatch,
    model: Denoiser,
    frozen: Denoiser | None,
    sigmas: torch.Tensor,
    model_sampling: Any,
    generator: Randomness,
) -> LossOutput:
    """One batch of pairs -> the loss of ``cfg.loss`` (per pair) and its metrics.

    Args:
        model: the denoiser being trained (gradients flow through it).
        frozen: the pre-trained denoiser (adapter disabled); called under ``no_grad``. May be None
            only for losses that need no frozen model (SFT, the DreamBooth hinge form).
        sigmas: (N+1,) the few-step schedule whose transitions are trained.
        generator: the only source of randomness (noise, levels): one ``torch.Generator``, or a
            :class:`PairGenerators` (one per pair plus a shared one) so that the result does not depend
            on how a data-parallel job splits the batch.
    """
    spec = LOSSES[cfg.loss]
    missing = [f for f in required_fields(cfg.loss) if getattr(batch, f) is None]
    if missing:
        raise ValueError(f"loss {cfg.loss!r} needs pair fields {missing}; the batch has none of them")
    if spec.needs_frozen_model and frozen is None:
        raise ValueError(f"loss {cfg.loss!r} compares against the frozen model, but none was given")
    for traj in (batch.target_traj, batch.reference_traj):
        if spec.needs_gaussian_policy and traj is not None:
            require_gaussian_policy(traj.policy)
    rng = draws(generator)
    inputs: dict[str, torch.Tensor] = {}
    first = None  # both models' first-step x0 predictions, where the log-ratio already made them
    if spec.target_path == "forward":
        levels = _levels_for(cfg, batch, sigmas, model_sampling, rng)
        with_ref = spec.reference_path == "forward"
        space = cfg.error_space or spec.error_space
        inputs.update(_forward_side_errors(model, frozen if spec.needs_frozen_model else None, batch,
                                           levels, model_sampling, rng, space, with_ref))
        inputs["sigma"] = levels.to(inputs["model_err_target"].device)
        if spec.reference_path == "sampled":
            steps = _matching_steps(batch.reference_traj, levels)
            inputs["logratio_ref"] = _sampled_logratio(model, frozen, batch.reference_traj, batch.cond,
                                                       model_sampling, steps)[0]
    else:  # both sides sampled (Eq. 7 and its clipped form): one batched call per model for both
        steps = _sampled_steps(batch.target_traj, cfg.transitions, rng)
        both = cat_trajectories([batch.target_traj, batch.reference_traj])
        # with the first-step penalty, keep the x0 predictions the log-ratio makes at the first step
        # (the penalty's inputs exactly) instead of calling both models there again
        keep = bool(cfg.first_step_weight) and 0 in steps
        logratio, x0 = _sampled_logratio(model, frozen, both, _cat(batch.cond, batch.cond), model_sampling,
                                         steps, keep_x0=keep)
        b = batch.target_traj.batch_size
        inputs["logratio_target"], inputs["logratio_ref"] = logratio[:b], logratio[b:]
        first = None if x0 is None else (x0[0][:, steps.index(0)], x0[1][:, steps.index(0)])
    out = compute_loss(cfg.loss, inputs, beta=cfg.beta, reduction=cfg.reduction, **cfg.options)
    if cfg.first_step_weight:
        shift = first_step_shift(model, frozen, batch, predictions=first)
        return add_first_step_penalty(out, shift, cfg.first_step_weight)
    if not cfg.target_sft_weight:
        return out
    anchored = inputs["model_err_target"]
    if cfg.anchor_levels != "pair":
        extra = _anchor_levels(cfg.anchor_levels, batch, sigmas, model_sampling, rng)
        noise = rng.randn_level_major(1, batch.batch_size, tuple(batch.target.shape[1:])).to(batch.target)
        level = extra[:, 0].to(batch.target.device)
        err = forward_noised_errors(model, batch.target, noise, level, batch.cond, model_sampling,
                                    cfg.error_space or spec.error_space)
        anchored = torch.cat([anchored, err[:, None]], dim=1)
    return add_target_anchor(out, anchored, cfg.target_sft_weight)


def _anchor_levels(kind: str, batch: PairBatch, sigmas: torch.Tensor, model_sampling: Any,
                   rng: Draws) -> torch.Tensor:
    """The anchor's extra level per pair (``MethodConfig.anchor_levels``). Shapes: returns (B, 1)."""
    if kind == "continuous":
        return continuous_levels(model_sampling, batch.batch_size, rng)
    sched = check_sigmas(sigmas if batch.sigmas is None else batch.sigmas.to(sigmas),
                         what="the training schedule (sigmas)")
    # a new tensor, not a view: the node's SIGMAS come from inference mode, and a view of an inference
    # tensor cannot be saved for backward
    return torch.full((batch.batch_size, 1), float(sched[-2]), dtype=sched.dtype, device=sched.device)


def add_target_anchor(out: LossOutput, model_err_target: torch.Tensor, weight: float) -> LossOutput:
    """``loss + weight * mean_n m_t``: the plain diffusion loss on the targets, at the pair's levels
    (and the extra level of ``MethodConfig.anchor_levels``), added to a pairwise loss (not in the paper).

    Why: where target and reference inputs look alike (the highest noise levels, where the 1-step sample
    is made) the pairwise logit is linear in the model's prediction, so Eqs. 5-6 push it along
    (target - reference) until the sigmoid saturates, past the targets; the anchor is quadratic and
    pulls toward the targets. ``bench/digits`` measured it (bench/README.md): with step-count mixing it
    took the 1-step FD from ~1000 to ~150 and kept 4-step sharpness at the real images'.

    Shapes: out.loss (B,); model_err_target (B, T); returns loss (B,), logits unchanged.
    """
    loss = out.loss + weight * model_err_target.mean(dim=1)
    with torch.no_grad():
        metrics = {**out.metrics, "loss": float(loss.mean()), "pairwise_loss": out.metrics["loss"]}
    return LossOutput(loss, out.logits, metrics)


def first_step_shift(model: Denoiser, frozen: Denoiser, batch: PairBatch,
                     predictions: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Per pair: the squared shift (per-element mean) of the first step's x0 prediction from the frozen
    model's, on the target's and on the reference's own starting latent, summed over the two sides.

    The first step's x0 prediction at the highest level is what a 1-step sample shows.
    ``predictions``: (model's, frozen's) x0 at both sides' first latents (target rows, then reference
    rows), where the caller has them already (the log-ratio of the first transition makes exactly
    these); otherwise both models are called here. Shapes: the batch's trajectories (B, ...),
    predictions (2B, ...); returns (B,), with gradients through ``model``.
    """
    if predictions is None:
        x = torch.cat([batch.target_traj.latents[:, 0], batch.reference_traj.latents[:, 0]]).detach()
        sigma = batch.target_traj.sigmas[0] * x.new_ones([x.shape[0]])  # both sides share the schedule
        cond = _cat(batch.cond, batch.cond)
        with torch.no_grad():
            held = frozen(x, sigma, cond)
        predictions = (model(x, sigma, cond), held)
    pred, held = predictions
    shift = (pred - held.detach()).pow(2).flatten(1).mean(dim=1)
    b = batch.target_traj.batch_size
    return shift[:b] + shift[b:]


def add_first_step_penalty(out: LossOutput, shift: torch.Tensor, weight: float) -> LossOutput:
    """``loss + weight * shift``: online PSO with the first step held near the frozen model (not in
    the paper; ``MethodConfig.first_step_weight``).

    Why: Eq. 7 and its clipped form score each transition's likelihood ratio; at the first transition
    the next level's noise is so large that the ratio hardly depends on the x0 prediction, so nothing
    in the loss holds that prediction while the lower-noise transitions move the shared weights, and
    the 1-step sample (that prediction) drifts. In the renoising (LCM) policy the first transition's
    KL to the frozen one is this shift over twice the next level's variance; the penalty is that KL
    at a fixed weight. bench/digits measured it (bench/README.md, online rows): on the shapes task at
    weight 0.01 the 4-step reward was as without it and far more 1-step samples kept their caption,
    but on the tiny random UNet of the headless test the same weight stopped the reward from rising
    (where the reward is made by the first step, holding it holds the reward): off by default.

    Shapes: out.loss (B,); shift (B,); returns loss (B,), logits unchanged.
    """
    loss = out.loss + weight * shift
    with torch.no_grad():
        metrics = {**out.metrics, "loss": float(loss.mean()), "pairwise_loss": out.metrics["loss"],
                   "first_step_shift": float(shift.mean())}
    return LossOutput(loss, out.logits, metrics)


def _matching_steps(traj: Trajectory, levels: torch.Tensor) -> list[int]:
    """The trajectory steps whose input level equals the target's training levels (Eq. 5 pairs a
    forward-noised target transition with the reference transition at the same timestep).

    All pairs of a batch must share their levels here (``transitions="all"``, or ``"one"`` with a
    level drawn per batch): a trajectory batch is scored one step at a time.
    """
    first = levels[0]
    if not bool((levels == first).all()):
        raise ValueError(
            "full PSO (Eq. 5) scores the reference trajectory at the target's levels, which must be the "
            "same for every pair of a batch; use transitions='all' or a batch of 1"
        )
    steps = []
    for s in first.tolist():
        hits = [n for n in traj.stochastic_steps() if abs(float(traj.sigmas[n]) - s) <= 1e-6 * max(1.0, s)]
        if not hits:
            raise ValueError(
                f"the reference trajectory has no stochastic step at sigma {s:.6g} (its sigmas are "
                f"{[round(float(v), 6) for v in traj.sigmas]}); sample references with the same SIGMAS "
                "as training"
            )
        steps.append(hits[0])
    return steps


#: What :class:`pso.trainer.Trainer` calls each micro-step: ``step_fn(batch, generator) -> LossOutput``
#: (not a step policy of :mod:`pso.samplers`, :data:`pso.samplers.PolicyStepFn`).
TrainStepFn = Callable[[PairBatch, torch.Generator], LossOutput]


def make_step_fn(cfg: MethodConfig, model: Denoiser, frozen: Denoiser | None, sigmas: torch.Tensor,
                 model_sampling: Any) -> TrainStepFn:
    """Bind a method to its models and schedule: ``step_fn(batch, generator) -> LossOutput``, the
    shape :class:`pso.trainer.Trainer` expects."""

    def step_fn(batch: PairBatch, generator: torch.Generator) -> LossOutput:
        return compute_method_loss(cfg, batch, model, frozen, sigmas, model_sampling, generator)

    return step_fn
