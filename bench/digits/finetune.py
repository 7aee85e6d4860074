"""Fine-tune the 4-step student toward the target style with a LoRA, one method at a time.

Everything that defines a method is the project's code: the losses (``pso.losses``), how a batch of
pairs becomes their inputs with shared noise and levels (``pso.methods``), the adapter
(``pso.lora``), the reference pool (``pso.references``), the sampler (``pso.samplers``) and the loop
(``pso.trainer``). This module only chooses the methods' settings and draws the pairs.

Pairs: a batch holds B pairs (target, reference) of the same class (the "prompt"). For each pair a
reference is drawn from the pool and a target image of that reference's class from the target
training split. Reference freshness is the setting that tells the offline variants apart:

- ``static``: the pool is sampled once from the starting student, before training (Eq. 6 as the
  paper's style-transfer and offline runs use it; the DreamBooth variant samples its class images
  once as well);
- ``refresh``: the pool is re-sampled from the current model every ``refresh_every`` steps
  (``TrainConfig.ref_refresh_every``);
- ``fresh``: the pairs of each step get references re-sampled right before the step once they are
  ``max_age`` or more steps old (``pso.batches.PairBatchSource``, the node's mechanism); with
  ``max_age`` 1 every reference is sampled by the current model for the step that uses it;
- ``on_policy``: B reference trajectories are sampled from the current model before every step
  (Eq. 5 / Algorithm 1), and every pair uses a fresh one;
- ``online``: no target images at all. Before every step K samples of every class ("prompt") are
  drawn from the current model and scored by the task's reward; the best and the worst of each
  class form a pair (``pso.online.OnlineRounds``, Algorithm 2 with one optimizer step a round), so
  the rows measure what online PSO reaches from a reward alone (the task's ``reward``; shapes: the
  stripe score, which does not know the target's phase, colour or shape; digits has none).

The trainer, learning rate, batch size, number of steps and LoRA are the same for every method.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pso.batches import PairBatchSource
from pso.lora import LoRAConfig, LoRANetwork, frozen_denoiser
from pso.methods import MethodConfig, PairBatch, make_step_fn
from pso.online import OnlineConfig, OnlineRounds, sample_prompt
from pso.online_settings import FIRST_STEP_SUGGESTED
from pso.references import ReferencePool
from pso.schedules import DiscreteSchedule, few_step_sigmas
from pso.trainer import TrainConfig, Trainer, TrainResult

from .data import NUM_CLASSES, DigitSplits
from .model import EpsDenoiser, EpsMLP
from .sampling import STUDENT_TIMESTEPS

__all__ = ["METHODS", "FinetuneConfig", "FinetuneRun", "MethodSpec", "finetune"]

REFERENCE_MODES: dict[str, str] = {
    "none": "no references (SFT)",
    "static": "pool sampled once from the starting student",
    "refresh": "pool re-sampled from the current model every refresh_every steps",
    "fresh": "each step's references re-sampled before the step once max_age steps old",
    "on_policy": "fresh reference trajectories from the current model before every step",
    "online": "no targets: K samples per class from the current model, best vs worst by the task's reward "
              "(an SFT method trains on the best alone: best-of-K fine-tuning)",
}


@dataclass(frozen=True)
class MethodSpec:
    """A benchmarked method: a ``pso.methods.MethodConfig`` plus where its references come from."""

    method: MethodConfig
    references: str
    description: str
    final_level: bool = False  # also train the input level of the last (deterministic) step
    reference_steps: tuple[int, ...] = (4,)  # step counts of the references; the first must be 4
    max_age: int = 1  # "fresh" references: re-sampled once this many steps old
    mix_steps: tuple[int, ...] = ()  # "fresh" / "online": half the steps (rounds) sample and train at these
    samples_per_prompt: int = 4  # "online" only: K samples per class and round (best vs worst)
    ema: float = 0.0  # > 0: TrainConfig.ema_decay (the run ends with the trainer's moving average)

    def __post_init__(self) -> None:
        if self.references not in REFERENCE_MODES:
            raise ValueError(f"unknown reference mode {self.references!r}; valid: {sorted(REFERENCE_MODES)}.")


#: The benchmarked methods, in table order. Betas are the registry defaults (the paper's).
METHODS: dict[str, MethodSpec] = {
    "sft": MethodSpec(
        MethodConfig("sft"), "none",
        "plain eps loss on the targets, continuous levels (pso.methods' SFT baseline)"),
    "sft_fewstep": MethodSpec(
        MethodConfig("sft", levels="few_step"), "none",
        "plain eps loss on the targets at PSO's training levels (t = 999, 749, 499)"),
    "pso_offline_static": MethodSpec(
        MethodConfig("pso_offline"), "static",
        "offline PSO, Eq. 6 (beta 50), references sampled once from the starting student"),
    "pso_offline_refresh": MethodSpec(
        MethodConfig("pso_offline"), "refresh",
        "offline PSO, Eq. 6 (beta 50), references re-sampled from the current model every K steps"),
    "pso_offline_refresh_all": MethodSpec(
        MethodConfig("pso_offline"), "refresh",
        "as pso_offline_refresh, also trained at the last step's input level (t = 249)", final_level=True),
    "pso_offline_refresh_124": MethodSpec(
        MethodConfig("pso_offline"), "refresh",
        "as pso_offline_refresh, references sampled with 1, 2 and 4 steps (a third each)",
        reference_steps=(4, 1, 2)),
    "pso_offline_fresh": MethodSpec(
        MethodConfig("pso_offline", beta=10.0), "fresh",
        "offline PSO, Eq. 6, beta 10, every step's references sampled by the current model (node default)"),
    "pso_offline_fresh_b50": MethodSpec(
        MethodConfig("pso_offline"), "fresh",
        "as pso_offline_fresh with the paper's offline beta 50"),
    "pso_offline_fresh_age5": MethodSpec(
        MethodConfig("pso_offline", beta=10.0), "fresh",
        "as pso_offline_fresh, references re-sampled once 5 steps old (cheaper)", max_age=5),
    "pso_offline_fresh_x0": MethodSpec(
        MethodConfig("pso_offline", beta=3.0, error_space="x0"), "fresh",
        "as pso_offline_fresh with x0-space errors (every level's x0 weighted equally), beta 3"),
    "pso_offline_fresh_x0_b1": MethodSpec(
        MethodConfig("pso_offline", beta=1.0, error_space="x0"), "fresh",
        "as pso_offline_fresh_x0 with beta 1"),
    "pso_offline_fresh_mix": MethodSpec(
        MethodConfig("pso_offline", beta=10.0), "fresh",
        "as pso_offline_fresh; half the steps sample references with 1 or 2 steps and train at that "
        "schedule's levels (step-count mixing)", mix_steps=(1, 2)),
    "pso_offline_fresh_final": MethodSpec(
        MethodConfig("pso_offline", beta=10.0, levels="few_step_final"), "fresh",
        "as pso_offline_fresh, also trained at the last step's input level (t = 249)"),
    "pso_offline_fresh_mix_final": MethodSpec(
        MethodConfig("pso_offline", beta=10.0, levels="few_step_final"), "fresh",
        "step-count mixing (1, 2 steps) and every input level of each schedule", mix_steps=(1, 2)),
    "pso_offline_fresh_sft": MethodSpec(
        MethodConfig("pso_offline", beta=10.0, target_sft_weight=1.0), "fresh",
        "pso_offline_fresh plus the plain diffusion loss on the targets (weight 1), no step-count mixing"),
    "pso_offline_fresh_mix_sft": MethodSpec(
        MethodConfig("pso_offline", beta=10.0, target_sft_weight=1.0), "fresh",
        "the PSO Train node's defaults until 2026-12-06: offline PSO (beta 10), fresh references every step, "
        "step-count mixing (1, 2), plus the plain diffusion loss on the targets (weight 1)",
        mix_steps=(1, 2)),
    "pso_offline_fresh_mix_sft_one": MethodSpec(
        MethodConfig("pso_offline", beta=10.0, target_sft_weight=1.0, transitions="one"), "fresh",
        "the node's defaults with one random level per pair instead of every level of the schedule "
        "(a cheaper step)", mix_steps=(1, 2)),
    "pso_full_b1": MethodSpec(
        MethodConfig("pso_full", beta=1.0), "on_policy", "as pso_full with beta 1"),
    "pso_full_b20": MethodSpec(
        MethodConfig("pso_full", beta=20.0), "on_policy", "as pso_full with beta 20"),
    "pso_dreambooth_b1": MethodSpec(
        MethodConfig("pso_dreambooth_hinge", beta=1.0, options={"ref_sft_weight": 0.5}), "static",
        "as pso_dreambooth with beta 1"),
    "pso_dreambooth_b20": MethodSpec(
        MethodConfig("pso_dreambooth_hinge", beta=20.0, options={"ref_sft_weight": 0.5}), "static",
        "as pso_dreambooth with beta 20"),
    "pso_full": MethodSpec(
        MethodConfig("pso_full"), "on_policy",
        "full PSO, Eq. 5 (beta 5), reference trajectories sampled on-policy every step"),
    "pso_dreambooth": MethodSpec(
        MethodConfig("pso_dreambooth_hinge", options={"ref_sft_weight": 0.5}), "static",
        "DreamBooth-style PSO as the authors' default (hinge, x0 errors, ref x0.1, +0.5 ref SFT, beta 5)"),
    "sft_ema": MethodSpec(
        MethodConfig("sft"), "none", "as sft, evaluated with an EMA of the adapter (decay 0.99)", ema=0.99),
    "pso_offline_fresh_mix_sft_ema": MethodSpec(
        MethodConfig("pso_offline", beta=10.0, target_sft_weight=1.0), "fresh",
        "the node's defaults, evaluated with an EMA of the adapter (decay 0.99, ~100 steps)",
        mix_steps=(1, 2), ema=0.99),
    "pso_offline_fresh_sft_ema": MethodSpec(
        MethodConfig("pso_offline", beta=10.0, target_sft_weight=1.0), "fresh",
        "pso_offline_fresh_sft, evaluated with an EMA of the adapter (decay 0.99)", ema=0.99),
    "pso_offline_fresh_mix_sft_ema_final": MethodSpec(
        MethodConfig("pso_offline", beta=10.0, target_sft_weight=1.0, anchor_levels="final"), "fresh",
        "the PSO Train node's defaults: pso_offline_fresh_mix_sft with the moving average of the adapter "
        "(ema_decay 0.99) and the anchor also at the last step's input level (anchor_levels 'final')",
        mix_steps=(1, 2), ema=0.99),
    "pso_offline_fresh_sft_ema_final": MethodSpec(
        MethodConfig("pso_offline", beta=10.0, target_sft_weight=1.0, anchor_levels="final"), "fresh",
        "as pso_offline_fresh_mix_sft_ema_final without step-count mixing", ema=0.99),
    "pso_offline_fresh_mix_sft_ema_cont": MethodSpec(
        MethodConfig("pso_offline", beta=10.0, target_sft_weight=1.0, anchor_levels="continuous"), "fresh",
        "the node's defaults with EMA, the anchor also at one continuous level per pair (as SFT draws them)",
        mix_steps=(1, 2), ema=0.99),
    **{f"pso_dreambooth_node_b{b:g}": MethodSpec(
        MethodConfig("pso_dreambooth", beta=float(b), target_sft_weight=1.0, anchor_levels="final"), "fresh",
        f"the concept template's loss (pso_dreambooth: x0 errors weighted by sigma^-2, reference term x0.1, "
        f"frozen model) with PSO Train's other defaults (references re-sampled every step, step-count "
        f"mixing, target anchor at the final level, ema 0.99), beta {b:g}", mix_steps=(1, 2), ema=0.99)
       for b in (1, 5, 20)},
    "pso_online": MethodSpec(
        MethodConfig("pso_online"), "online",
        "online PSO, Eq. 7 (beta 5, PSO Online Train's default until 2026-12-06): every step, 4 samples "
        "per class from the current model, best vs worst by the task's reward; no target images"),
    "pso_online_k2": MethodSpec(
        MethodConfig("pso_online"), "online", "as pso_online with 2 samples per class (Algorithm 2's pair)",
        samples_per_prompt=2),
    "pso_online_b1": MethodSpec(
        MethodConfig("pso_online", beta=1.0), "online", "as pso_online with beta 1"),
    "pso_online_b20": MethodSpec(
        MethodConfig("pso_online", beta=20.0), "online", "as pso_online with beta 20"),
    "raft": MethodSpec(
        MethodConfig("sft"), "online",
        "best-of-K fine-tuning (RAFT), online PSO's baseline: the same rounds (4 samples per class from the "
        "current model, scored by the reward), the plain diffusion loss on each class's best sample"),
    "pso_online_clipped": MethodSpec(
        MethodConfig("pso_online_clipped"), "online",
        "online PSO as the authors' code runs it (ratio clipped to [0.9, 1.1], beta 50), as pso_online"),
    "pso_online_b20_k2": MethodSpec(
        MethodConfig("pso_online", beta=20.0), "online", "as pso_online_b20 with 2 samples per class",
        samples_per_prompt=2),
    "pso_online_clipped_k2": MethodSpec(
        MethodConfig("pso_online_clipped"), "online",
        "as pso_online_clipped with 2 samples per class (PSO Online Train's samples_per_prompt)",
        samples_per_prompt=2),
    "pso_online_clipped_k2_mix": MethodSpec(
        MethodConfig("pso_online_clipped"), "online",
        "as pso_online_clipped_k2 with step-count mixing: every other round samples and trains 2-step "
        "trajectories (pso.online.round_schedule)", samples_per_prompt=2, mix_steps=(2,)),
    "pso_online_k2_mix": MethodSpec(
        MethodConfig("pso_online"), "online",
        "as pso_online_k2 (Eq. 7, beta 5) with step-count mixing (every other round at 2 steps)",
        samples_per_prompt=2, mix_steps=(2,)),
    **{f"pso_online_clipped_k2_first{w:g}": MethodSpec(
        MethodConfig("pso_online_clipped", first_step_weight=w), "online",
        f"as pso_online_clipped_k2 with the first step held near the frozen model (first_step_weight {w:g}"
        + (", the value PSO Online Train's tooltip suggests)" if w == FIRST_STEP_SUGGESTED else ")"),
        samples_per_prompt=2)
       for w in (0.01, 0.03, 0.1, 1.0)},
}


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings shared by every method (the equal budget)."""

    steps: int = 400
    batch: int = 64
    lr: float = 1e-4
    rank: int = 8
    pool_size: int = 500
    refresh_every: int = 5
    max_grad_norm: float = 1.0
    seed: int = 0
    overrides: dict[str, dict] = field(default_factory=dict)  # method name -> MethodConfig fields

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.pool_size < NUM_CLASSES or self.refresh_every < 1:
            raise ValueError(
                f"need steps >= 1, batch >= 1, pool_size >= {NUM_CLASSES}, refresh_every >= 1; got "
                f"steps={self.steps}, batch={self.batch}, pool_size={self.pool_size}, "
                f"refresh_every={self.refresh_every}."
            )
        unknown = sorted(set(self.overrides) - set(METHODS))
        if unknown:
            raise ValueError(f"overrides for unknown methods {unknown}; valid: {list(METHODS)}.")


def with_final_level(sigmas: torch.Tensor, model_sampling: DiscreteSchedule) -> torch.Tensor:
    """Sigmas whose ``pso.methods.training_levels`` also include the last step's input level.

    ``training_levels(sigmas) = sigmas[:-2]`` leaves out the deterministic final step (the paper's
    n = 2..N). For forward-noised losses (Eq. 6) that level has a well-defined error, so the
    benchmark can train it too: a dummy level ``sigma_min`` is inserted before the final 0. Only the
    levels change; references are still sampled with ``sigmas``. (A workaround: ``pso.methods``
    has no option for it.)

    Shapes: sigmas (N+1,) -> (N+2,).
    """
    tail = torch.stack([model_sampling.sigma_min.to(sigmas), sigmas[-1]])
    return torch.cat([sigmas[:-1], tail])


@dataclasses.dataclass
class FinetuneRun:
    """One fine-tuning run: the network with its LoRA attached, the adapter, the trainer's result,
    how many times the reference pool was (re-)sampled, and the wall time in seconds."""

    net: EpsMLP
    lora: LoRANetwork
    result: TrainResult
    reference_samplings: int
    seconds: float


class _TargetsByClass:
    """Class-matched pairs: draws, for each reference's class label, a random target of that class.

    Shapes: x (M, C, H, W) target images, y (M,) labels in [0, num_classes);
    ``draw(cond (B,), generator) -> (B, C, H, W)``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int):
        self.x = x
        self.members = [torch.nonzero(y == c).flatten() for c in range(num_classes)]
        empty = [c for c, m in enumerate(self.members) if m.numel() == 0]
        if empty:
            raise ValueError(f"the target split has no images of classes {empty}")

    def draw(self, cond: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        counts = torch.tensor([self.members[int(c)].numel() for c in cond])
        pick = (torch.rand(len(cond), generator=generator) * counts).long()
        return self.x[torch.stack([self.members[int(c)][int(k)] for c, k in zip(cond, pick, strict=True)])]


def finetune(
    student: EpsMLP, model_sampling: DiscreteSchedule, splits: DigitSplits, name: str, config: FinetuneConfig,
    on_step: StepHook | None = None, reward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> FinetuneRun:
    """Fine-tune a copy of ``student`` with method ``name`` (a :data:`METHODS` key).

    ``on_step``: evaluated every ``on_step.every`` steps (time-to-quality curves); its own time is not
    counted in the run's ``seconds``. ``reward``: the online methods' score of final samples (higher
    is better; shapes (N, C, H, W) -> (N,)); they refuse to run without one."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {list(METHODS)}.")
    spec = METHODS[name]
    if spec.references == "online" and reward is None:
        raise ValueError(f"method {name!r} is online PSO and needs the task's reward; this task has none "
                         "(run the online methods with --task shapes).")
    method = spec.method
    if name in config.overrides:
        method = dataclasses.replace(method, **config.overrides[name])
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    net = copy.deepcopy(student).requires_grad_(False)
    lora = LoRANetwork.for_module(net, LoRAConfig(rank=config.rank, target="all_linear"), gen)
    lora.attach(net)
    model = EpsDenoiser(net, model_sampling)
    frozen = frozen_denoiser(model, lora)
    sigmas = few_step_sigmas(model_sampling, list(STUDENT_TIMESTEPS[4]))
    train_sigmas = with_final_level(sigmas, model_sampling) if spec.final_level else sigmas
    step_fn = make_step_fn(method, model, frozen, train_sigmas, model_sampling)
    if spec.references == "online":
        rounds = _online_rounds(spec, model_sampling, sigmas, student, config, reward)
        train_cfg = TrainConfig(steps=config.steps, lr=config.lr, max_grad_norm=config.max_grad_norm,
                                seed=config.seed, ref_refresh_every=1, ema_decay=spec.ema)
        source = rounds
        if method.loss == "sft":  # best-of-K fine-tuning (RAFT): the plain loss on each pair's best sample

            def source(step: int, generator: torch.Generator) -> PairBatch:
                pairs = rounds(step, generator)
                # the image one would keep, in the valid range as a saved image is: unclamped samples fed
                # back as targets ran away (values far out of range, FD ~5e6 in 400 steps at lr 3e-4)
                return PairBatch(target=pairs.target_traj.final.clamp(-1.0, 1.0), cond=pairs.cond)

        trainer = Trainer(lora, step_fn, source, train_cfg,
                          refresh_fn=lambda step, generator: rounds.refresh(model, step, generator),
                          callback=_timed_callback(on_step, net, start))
        result = trainer.train()
        lora.eval().requires_grad_(False)
        samplings = config.steps * spec.samples_per_prompt * student.num_classes / config.pool_size
        return FinetuneRun(net, lora, result, samplings, time.perf_counter() - start
                           - (on_step.seconds if on_step else 0.0))
    if spec.references != "none" and config.pool_size < student.num_classes:
        raise ValueError(f"pool_size={config.pool_size} must be >= the task's {student.num_classes} classes.")
    targets = _TargetsByClass(splits.target_train_x, splits.target_train_y, student.num_classes)

    pool: ReferencePool | None = None
    refresh_fn = None
    refresh_every = 0
    source = None
    if spec.references != "none":
        size = config.batch if spec.references == "on_policy" else config.pool_size
        labels = torch.arange(size) % student.num_classes
        # the first step count is the training schedule's (4); the others get a third of the rows each
        extra = [few_step_sigmas(model_sampling, list(STUDENT_TIMESTEPS[n]))
                 for n in spec.reference_steps[1:]]
        shape = splits.target_train_x.shape[1:]
        pool = ReferencePool(torch.zeros((size, *shape)), labels, sigmas, "renoise", model_sampling,
                             chunk_size=size, extra_sigmas=extra)
        if spec.references in ("static", "fresh"):
            with torch.no_grad():
                pool.refresh(model, torch.Generator().manual_seed(config.seed + 1))
        if spec.references == "fresh":
            subs = [few_step_sigmas(model_sampling, list(STUDENT_TIMESTEPS[n])) for n in spec.mix_steps]
            source = PairBatchSource(pool, lambda idx, cond, g: targets.draw(cond, g), config.batch,
                                     max_age=spec.max_age, needs_traj=spec.method.loss == "pso_full",
                                     sub_schedules=subs)
            refresh_every = 1

            def refresh_fn(step: int, generator: torch.Generator) -> None:
                source.prepare(model, step, generator)
        elif spec.references in ("refresh", "on_policy"):
            refresh_every = 1 if spec.references == "on_policy" else config.refresh_every

            def refresh_fn(step: int, generator: torch.Generator) -> None:
                pool.refresh(model, generator)

    def batch_source(step: int, generator: torch.Generator) -> PairBatch:
        if source is not None:
            return source(step, generator)
        if pool is None:
            idx = torch.randint(0, splits.target_train_x.shape[0], (config.batch,), generator=generator)
            return PairBatch(target=splits.target_train_x[idx], cond=splits.target_train_y[idx])
        if spec.references == "on_policy":
            idx = torch.randperm(len(pool), generator=generator)
        else:
            idx = torch.randint(0, len(pool), (config.batch,), generator=generator)
        cond = pool.cond[idx]
        traj = pool.trajectory.select(idx) if spec.references == "on_policy" else None
        return PairBatch(target=targets.draw(cond, generator), reference=pool.reference[idx],
                         reference_traj=traj, cond=cond)

    train_cfg = TrainConfig(steps=config.steps, lr=config.lr, max_grad_norm=config.max_grad_norm,
                            seed=config.seed, ref_refresh_every=refresh_every, ema_decay=spec.ema)
    trainer = Trainer(lora, step_fn, batch_source, train_cfg, refresh_fn=refresh_fn,
                      callback=_timed_callback(on_step, net, start))
    result = trainer.train()  # ends with the moving average in the adapter when spec.ema > 0
    lora.eval().requires_grad_(False)
    if pool is None:
        samplings = 0
    else:  # whole-pool equivalents
        samplings = source.resampled / len(pool) if source is not None else pool.refreshes
    return FinetuneRun(net, lora, result, samplings, time.perf_counter() - start - on_step.seconds if on_step
                       else time.perf_counter() - start)


def _online_rounds(spec: MethodSpec, model_sampling: DiscreteSchedule, sigmas: torch.Tensor, student: EpsMLP,
                   config: FinetuneConfig, reward: Callable[[torch.Tensor], torch.Tensor]) -> OnlineRounds:
    """Online PSO's rounds for the bench: one round per optimizer step, every class a prompt, K samples
    each with the same renoise (LCM) sampler as the references; pairs = min(batch, classes) a step."""
    k = spec.samples_per_prompt
    online_cfg = OnlineConfig(rounds=config.steps, prompts_per_round=student.num_classes,
                              samples_per_prompt=k, steps_per_round=1, batch_size=config.batch)
    blank = torch.zeros((1, *student.image_shape))

    def sample_fn(denoiser, prompt: int, seed: int, count: int, round_sigmas=None):
        cond = torch.full((count,), prompt, dtype=torch.long)
        sched = sigmas if round_sigmas is None else round_sigmas
        return sample_prompt(denoiser, cond, seed, count, blank, sched, model_sampling, "renoise")

    def score_fn(traj, prompt: int, round_index: int, slot: int) -> torch.Tensor:
        return reward(traj.final)

    return OnlineRounds(online_cfg, student.num_classes, config.seed * 1_000_003, sample_fn, score_fn,
                        sub_schedules=[few_step_sigmas(model_sampling, list(STUDENT_TIMESTEPS[n]))
                                       for n in spec.mix_steps])


class StepHook:
    """Called after every ``every``-th optimizer step with ``(step, net, train_seconds)``; the time it
    takes itself is kept out of the run's training time (``seconds``)."""

    def __init__(self, every: int, fn: Callable[[int, EpsMLP, float], None]):
        self.every, self.fn, self.seconds = every, fn, 0.0

    def __call__(self, step: int, net: EpsMLP, elapsed: float) -> None:
        t0 = time.perf_counter()
        was = net.training
        with torch.no_grad():
            self.fn(step, net.eval(), elapsed - self.seconds)
        net.train(was)
        self.seconds += time.perf_counter() - t0


def _timed_callback(hook: StepHook | None, net: EpsMLP, start: float):
    if hook is None:
        return None

    def callback(event) -> None:
        if event.phase == "step" and event.step % hook.every == 0:
            hook(event.step, net, time.perf_counter() - start)

    return callback
