"""Online PSO (Eq. 7, Algorithm 2 of Miao et al., arXiv 2410.03190) as rounds of sample -> score ->
label -> train, without ComfyUI.

Algorithm 2 samples two trajectories ``x^1, x^2 ~ p_theta(. | c)`` from the *current* model, scores
their final images with a reward model ``s_i = R(x_0^i)``, makes the better one the target ``tau``
and the other the reference ``rho``, and updates theta with Eq. 7:

    ``L = -log sigmoid(beta * sum_{n=2..N} [lr_tau,n - lr_rho,n])``,
    ``lr = log p_theta(x_{n-1} | x_n) - log p_pre(x_{n-1} | x_n)``

(``pso.losses.pso_online_loss``; the ratio-clipped form of the authors' code is
``pso_online_clipped_loss``). Appendix B.1 runs it in rounds: sample 128 prompts x 2 images, label
them with the reward, train one epoch on the 128 pairs (batch 32), repeat. This module holds the
parts of that loop that need no host:

- :class:`OnlineConfig`: the round schedule (validated);
- :func:`round_prompt_indices` / :func:`round_seed`: which prompts a round samples and with which
  noise seeds (explicit, so a run repeats exactly under a fixed seed);
- :func:`sample_prompt`: K samples of one prompt with the noise ComfyUI's ``RandomNoise(seed)`` and
  sampler noise give a latent batch of K (bit for bit the host's SamplerCustomAdvanced);
- :func:`label_pairs`: best vs worst of each prompt's K samples, ties within a margin skipped;
- :class:`OnlineRounds`: the trainer's ``batch_source`` and ``refresh_fn``: collects a round before
  its first step, serves its pairs epoch by epoch, keeps the per-round reward history;
- :func:`round_schedule`: step-count mixing, the online counterpart of ``pso.batches``' (odd rounds
  sample at a sub-schedule of the N steps, e.g. 2 inside 4, and train on those trajectories); a
  measured variant of the bench, not offered by the node (it did not protect 1-step samples).

Sampling and scoring are passed in as functions (``sample_fn``, ``score_fn``), so the host layer
decides how images are decoded and which reward scores them (any object with ``score``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import rewards
from .losses import node_choices
from .methods import PairBatch
from .samplers import (
    Denoiser,
    NoiseSamplerFactory,
    Trajectory,
    cat_trajectories,
    initial_latent,
    sample_trajectory,
    seeded_noise_sampler,
)

logger = logging.getLogger(__name__)

#: Losses that train on two sampled trajectories ranked by a reward (the online node's choices, name ->
#: tooltip), read from the loss registry.
ONLINE_METHODS: dict[str, str] = node_choices("online")

#: ComfyUI seeds are unsigned 64-bit integers.
SEED_MODULUS = 2**64


@dataclass(frozen=True)
class OnlineConfig:
    """The round schedule of online PSO.

    rounds: sample-label-train rounds. prompts_per_round: prompts sampled per round (paper 128;
    clamped to the number of prompts, which are cycled through round after round).
    samples_per_prompt: K >= 2 samples per prompt; the best and the worst form the pair.
    steps_per_round: optimizer steps on each round's pairs (paper: one epoch, 128 pairs / batch 32
    = 4). batch_size: pairs per step (at most the round's kept pairs). tie_margin: pairs whose score
    gap is <= this are ties and are skipped (0 skips exact ties only).
    """

    rounds: int = 10
    prompts_per_round: int = 128
    samples_per_prompt: int = 2
    steps_per_round: int = 4
    batch_size: int = 32
    tie_margin: float = 0.0

    def __post_init__(self) -> None:
        checks = [("rounds", 1), ("prompts_per_round", 1), ("samples_per_prompt", 2),
                  ("steps_per_round", 1), ("batch_size", 1)]
        for name, low in checks:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"online PSO: {name}={value!r} must be an integer >= {low}"
                                 + (" (a pair needs two samples of one prompt)" if low == 2 else ""))
        m = self.tie_margin
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0:
            raise ValueError(f"online PSO: tie_margin={m!r} must be a finite number >= 0 (score gaps <= it "
                             "count as ties and are skipped; 0 skips exact ties only)")

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round

    def prompts_in_round(self, num_prompts: int) -> int:
        """Prompts sampled per round: ``min(prompts_per_round, num_prompts)``."""
        return min(self.prompts_per_round, num_prompts)

    # A run's progress, in units of one prompt sampled or one optimizer step: every round samples its
    # prompts, then trains steps_per_round steps; after the last round the trained model is evaluated
    # on the next round's prompts.
    def progress_total(self, num_prompts: int) -> int:
        """Progress units of the whole run (the rounds and the final evaluation)."""
        return self.rounds * self._progress_per_round(num_prompts) + self.prompts_in_round(num_prompts)

    def progress_after_prompt(self, num_prompts: int, round_index: int, slot: int) -> int:
        """Progress once prompt ``slot`` of round ``round_index`` is sampled (round ``rounds``: the
        evaluation)."""
        return min(round_index, self.rounds) * self._progress_per_round(num_prompts) + slot + 1

    def progress_after_step(self, num_prompts: int, step: int) -> int:
        """Progress once optimizer step ``step`` (1-based) is done."""
        r, j = (step - 1) // self.steps_per_round, (step - 1) % self.steps_per_round + 1
        return r * self._progress_per_round(num_prompts) + self.prompts_in_round(num_prompts) + j

    def _progress_per_round(self, num_prompts: int) -> int:
        return self.prompts_in_round(num_prompts) + self.steps_per_round


def round_prompt_indices(num_prompts: int, prompts_per_round: int, round_index: int) -> list[int]:
    """Prompts of a round: the list cycled in order, ``min(prompts_per_round, num_prompts)`` a round.

    Round r takes positions ``r * P .. r * P + P - 1`` of the endless cycle (P the clamped count), so
    every prompt is used equally often and no round repeats a prompt.
    """
    if num_prompts < 1:
        raise ValueError("online PSO needs at least one prompt")
    per = min(prompts_per_round, num_prompts)
    return [(round_index * per + i) % num_prompts for i in range(per)]


def check_sub_schedules(sub_schedules) -> list[torch.Tensor]:
    """The sub-schedules an online run may mix in: each needs >= 2 steps (a 1-step sample has no
    stochastic transition, so Eq. 7 has nothing to compare). Returns them as a list."""
    out = list(sub_schedules)
    for s in out:
        if s.ndim != 1 or s.numel() < 3:
            raise ValueError(f"online step-count mixing: a sub-schedule of {s.numel() - 1} step(s) "
                             f"({[round(float(v), 4) for v in s.flatten()]}) has no stochastic transition "
                             "for Eq. 7 to train (the last step is deterministic); mix in step counts >= 2, "
                             "e.g. 2 for a 4-step model")
    return out


def round_schedule(sub_schedules, round_index: int) -> torch.Tensor | None:
    """The schedule round ``round_index`` samples with (step-count mixing; no randomness, so every
    process of a data-parallel run agrees): None (the run's own N steps) on even rounds, and on odd
    rounds the sub-schedules in turn. With no sub-schedules, always None.

    Why it was tried: trained only on N-step trajectories, online PSO moves the first step's
    prediction (the 1-step sample) wherever the N-step reward gradient takes it; bench/digits
    measured the judge reading the caption in 11-69% of 1-step samples after every online PSO run. A
    round of 2-step trajectories trains that same highest-noise transition on samples whose reward
    is judged after 2 steps. Measured (bench/README.md, online rows, 2026-12-06): 1-step FD 15% lower,
    the judge's 1-step reading unchanged within the seeds' spread, everything else equal, so PSO
    Online Train does not offer it; the bench keeps the rows (``*_mix``).
    """
    if not sub_schedules or round_index % 2 == 0:
        return None
    return sub_schedules[(round_index // 2) % len(sub_schedules)]


def round_seed(seed: int, round_index: int, slot: int, prompts_in_round: int) -> int:
    """Noise seed of the K samples of prompt slot ``slot`` in round ``round_index``:
    ``seed + round_index * prompts_in_round + slot`` (mod 2**64), distinct for every (round, slot).

    Sample k of the slot is row k of a K-image batch sampled with this seed, which is what ComfyUI's
    RandomNoise(seed) + SamplerCustomAdvanced give a latent batch of K.
    """
    return (int(seed) + int(round_index) * int(prompts_in_round) + int(slot)) % SEED_MODULUS


def sample_prompt(denoiser: Denoiser, cond: Any, seed: int, count: int, latent_image: torch.Tensor,
                  sigmas: torch.Tensor, model_sampling: Any, policy: str,
                  noise_sampler_factory: NoiseSamplerFactory = seeded_noise_sampler) -> Trajectory:
    """``count`` samples of one prompt, with ComfyUI's noise for ``seed`` (no gradients).

    As ComfyUI's RandomNoise + KSAMPLER do it: the starting noise is ``torch.randn`` of the whole
    batch from a CPU generator seeded with ``seed`` (``comfy.sample.prepare_noise``); the sampler's
    per-step noise comes from ``noise_sampler_factory(x, seed)`` built on the starting latent x. In
    ComfyUI that factory is the running host's ``default_noise_sampler`` (how it seeds changed in
    v0.8.0); the default is pso's :func:`~pso.samplers.seeded_noise_sampler`.

    Shapes: latent_image (1, C, H, W) or (count, C, H, W) in the model's inner latent space (zeros
    after ``process_latent_in`` for txt2img); returns a Trajectory of ``count`` samples.
    """
    latent = latent_image.expand(count, *latent_image.shape[1:]) if latent_image.shape[0] == 1 \
        else latent_image
    noise = torch.randn(latent.shape, dtype=latent.dtype, generator=torch.Generator().manual_seed(seed))
    noise = noise.to(latent.device)
    sig = sigmas.to(latent.device)
    x = initial_latent(model_sampling, sig, noise, latent)
    return sample_trajectory(denoiser, x, sig, cond, model_sampling, policy, None, grad=False,
                             noise_sampler=noise_sampler_factory(x, seed))


@dataclass(frozen=True)
class PairLabels:
    """Target / reference choice of each prompt's K samples (Algorithm 2, lines 3-5).

    Shapes: winner, loser (P,) long indices into the K samples; gap (P,) float
    ``score[winner] - score[loser]`` (>= 0); kept (P,) bool, ``gap > tie_margin``.
    """

    winner: torch.Tensor
    loser: torch.Tensor
    gap: torch.Tensor
    kept: torch.Tensor

    @property
    def kept_count(self) -> int:
        return int(self.kept.sum())

    @property
    def skipped_ties(self) -> int:
        return int(self.kept.numel() - self.kept.sum())


def label_pairs(scores: torch.Tensor, tie_margin: float = 0.0) -> PairLabels:
    """Best vs worst of each prompt's samples: the target is the highest-scoring sample, the
    reference the lowest (for K = 2 exactly Algorithm 2's comparison). A pair whose gap is
    ``<= tie_margin`` is a tie and is not kept: the reward cannot tell its two samples apart, and
    training on it would push on noise. Equal scores pick the first index (``argmax`` / ``argmin``).

    Shapes: scores (P, K), K >= 2, finite; returns :class:`PairLabels` of P prompts.
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be (P, K) with K >= 2 samples per prompt, got {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"scores must be finite, got {scores.flatten().tolist()[:16]}")
    if not (math.isfinite(tie_margin) and tie_margin >= 0):
        raise ValueError(f"tie_margin must be a finite number >= 0, got {tie_margin!r}")
    scores = scores.detach().float().cpu()
    winner, loser, kept = rewards.label_pairs(scores, tie_margin)  # the one labelling rule
    rows = torch.arange(scores.shape[0])
    return PairLabels(winner=winner, loser=loser, gap=scores[rows, winner] - scores[rows, loser], kept=kept)


def round_statistics(scores: torch.Tensor, labels: PairLabels | None) -> dict[str, float]:
    """Reward statistics of one round's samples. Shapes: scores (P, K)."""
    flat = scores.detach().float().flatten()
    stats = {"reward_mean": float(flat.mean()), "reward_std": float(flat.std(unbiased=False)),
             "reward_best": float(scores.max(dim=1).values.mean()),
             "reward_worst": float(scores.min(dim=1).values.mean()), "samples": float(flat.numel())}
    if labels is not None:
        stats.update(kept_pairs=float(labels.kept_count), skipped_ties=float(labels.skipped_ties),
                     mean_gap=float(labels.gap.mean()))
    return stats


#: ``sample_fn(denoiser, prompt_index, seed, count) -> Trajectory`` of ``count`` samples with the run's
#: schedule; with step-count mixing, a sub-schedule round calls ``sample_fn(..., count, sigmas)``
#: (:func:`round_schedule`).
SampleFn = Callable[..., Trajectory]
#: ``score_fn(trajectory, prompt_index, round_index, slot) -> (count,) scores`` (higher is better).
ScoreFn = Callable[[Trajectory, int, int, int], torch.Tensor]


class OnlineRounds:
    """The rounds of an online-PSO run, as the trainer's ``batch_source`` and ``refresh_fn``.

    Before steps ``0, S, 2S, ...`` (S = steps_per_round; the trainer's ``ref_refresh_every``)
    :meth:`refresh` samples round ``r = step // S`` from the current model, scores and labels it and
    keeps the pairs; each step :meth:`__call__` serves ``batch_size`` of them, walking one random
    permutation (drawn from the trainer's generator) epoch by epoch. ``history`` has one dict of
    :func:`round_statistics` per round (plus any :meth:`evaluate` results, marked ``final``).

    ``sub_schedules``: step-count mixing (:func:`round_schedule`): odd rounds sample with these
    schedules in turn; each round's statistics record its ``steps``.

    ``on_prompt(round_index, slot)`` is called after each prompt is sampled and scored (progress and
    Cancel); ``device`` is where batches go (trajectories are kept on the CPU between steps).

    Data-parallel sampling: with ``shard = (rank, world)`` this process samples the prompt slots
    ``rank, rank + world, ...`` of each round, and ``gather`` (e.g. accelerate's ``gather_object``)
    joins every process's ``[(slot, scores, trajectory), ...]`` into the whole round, so every process
    holds the same pairs (each slot's noise comes from its own seed, wherever it is sampled).

    A checkpoint (:meth:`state_dict`) holds the reward history and, only when it is taken inside a
    round, that round's pairs and batch order, so a resumed run serves exactly the batches the
    uninterrupted one would; at a round boundary the next round is sampled from the restored model.
    """

    def __init__(self, config: OnlineConfig, num_prompts: int, seed: int, sample_fn: SampleFn,
                 score_fn: ScoreFn, device: torch.device | str = "cpu",
                 on_prompt: Callable[[int, int], None] | None = None, shard: tuple[int, int] = (0, 1),
                 gather: Callable[[list], list] | None = None, sub_schedules=()):
        self.config, self.num_prompts, self.seed = config, num_prompts, int(seed)
        self.sub_schedules = check_sub_schedules(sub_schedules)
        self.sample_fn, self.score_fn, self.device, self.on_prompt = sample_fn, score_fn, device, on_prompt
        rank, world = shard
        if not 0 <= rank < world or (world > 1 and gather is None):
            raise ValueError(f"online PSO: shard {shard} must be (rank, world) with 0 <= rank < world, and "
                             "more than one process needs a gather function")
        self.shard, self.gather = (int(rank), int(world)), gather
        self.per_round = config.prompts_in_round(num_prompts)
        self.last_step = -1
        self.round_index = -1
        self.target_traj: Trajectory | None = None
        self.reference_traj: Trajectory | None = None
        self.cond: torch.Tensor | None = None
        self.order: torch.Tensor | None = None
        self.history: list[dict[str, float]] = []

    def _collect(self, denoiser: Denoiser, round_index: int
                 ) -> tuple[torch.Tensor, list[Trajectory], list[int]]:
        """Sample and score every prompt of a round. Returns scores (P, K), trajectories, prompts."""
        k = self.config.samples_per_prompt
        prompts = round_prompt_indices(self.num_prompts, self.config.prompts_per_round, round_index)
        sigmas = round_schedule(self.sub_schedules, round_index) if round_index < self.config.rounds else None
        rank, world = self.shard
        local = []
        for slot, p in enumerate(prompts):
            if slot % world != rank:
                continue
            seed = round_seed(self.seed, round_index, slot, self.per_round)
            traj = (self.sample_fn(denoiser, p, seed, k) if sigmas is None
                    else self.sample_fn(denoiser, p, seed, k, sigmas)).detach().to("cpu")
            s = torch.as_tensor(self.score_fn(traj, p, round_index, slot)).detach().float().cpu()
            if s.shape != (k,):
                raise ValueError(f"the reward returned scores of shape {tuple(s.shape)} for {k} images; "
                                 f"it must "
                                 f"return one score per image, shape ({k},)")
            local.append((slot, s, traj))
            if self.on_prompt is not None:
                self.on_prompt(round_index, slot)
        joined = sorted(self.gather(local) if self.gather is not None else local, key=lambda item: item[0])
        if [item[0] for item in joined] != list(range(len(prompts))):
            raise RuntimeError(f"online PSO round {round_index}: gathered slots {[i[0] for i in joined]}, "
                               f"expected 0..{len(prompts) - 1}")
        return torch.stack([item[1] for item in joined]), [item[2] for item in joined], prompts

    def refresh(self, denoiser: Denoiser, step: int, generator: torch.Generator) -> None:
        """Collect round ``step // steps_per_round`` with ``denoiser`` (the current model)."""
        r = step // self.config.steps_per_round
        scores, trajs, prompts = self._collect(denoiser, r)
        labels = label_pairs(scores, self.config.tie_margin)
        stats = {"round": float(r), "steps": float(trajs[0].sigmas.numel() - 1),
                 **round_statistics(scores, labels)}
        self.history.append(stats)
        logger.info("online PSO round %d: mean reward %.6g (best %.6g), %d pairs kept, %d ties skipped",
                    r, stats["reward_mean"], stats["reward_best"], labels.kept_count, labels.skipped_ties)
        if labels.kept_count == 0:
            raise ValueError(
                f"online PSO round {r}: all {len(prompts)} prompt(s) were ties (score gap <= tie_margin="
                f"{self.config.tie_margin:g}; largest gap {float(labels.gap.max()):.6g}), so there is "
                f"no pair to "
                "train on. Lower tie_margin, or raise samples_per_prompt for more spread.")
        kept = torch.nonzero(labels.kept).flatten().tolist()
        self.target_traj = cat_trajectories([trajs[i].select(int(labels.winner[i])) for i in kept])
        self.reference_traj = cat_trajectories([trajs[i].select(int(labels.loser[i])) for i in kept])
        self.cond = torch.tensor([prompts[i] for i in kept], dtype=torch.long)
        self.order = torch.randperm(len(kept), generator=generator)
        self.round_index = r

    @torch.no_grad()
    def evaluate(self, denoiser: Denoiser, round_index: int, label: str = "final") -> dict[str, float]:
        """Sample and score round ``round_index``'s prompts and seeds without training on them (the
        reward of the model after the last round); appended to ``history`` with ``label = 1``
        ("final"; "baseline" for the same prompts and seeds before training, a paired test)."""
        scores, trajs, _ = self._collect(denoiser, round_index)
        stats = {"round": float(round_index), "steps": float(trajs[0].sigmas.numel() - 1),
                 **round_statistics(scores, None), label: 1.0}
        self.history.append(stats)
        return stats

    def __call__(self, step: int, generator: torch.Generator) -> PairBatch:
        """The pairs of optimizer step ``step`` (shapes: trajectories of b = min(batch_size, kept))."""
        if self.order is None or step // self.config.steps_per_round != self.round_index:
            raise RuntimeError(f"step {step} belongs to round {step // self.config.steps_per_round}, "
                               f"but round "
                               f"{self.round_index} was collected; refresh must run before each round")
        self.last_step = step
        n = self.order.numel()
        b = min(self.config.batch_size, n)
        j = step % self.config.steps_per_round
        idx = self.order[(j * b + torch.arange(b)) % n]
        return PairBatch(target_traj=self.target_traj.select(idx).to(self.device),
                         reference_traj=self.reference_traj.select(idx).to(self.device), cond=self.cond[idx])

    def state_dict(self) -> dict[str, Any]:
        """The reward history and the round position; inside a round also its pairs and batch order
        (weights_only-loadable: tensors, numbers, strings)."""
        state: dict[str, Any] = {"round_index": self.round_index, "last_step": self.last_step,
                                 "history": [dict(h) for h in self.history], "seed": self.seed,
                                 "num_prompts": self.num_prompts}
        round_done = (self.last_step + 1) % self.config.steps_per_round == 0
        if self.order is not None and not round_done:
            state["pairs"] = {"target": self.target_traj.state_dict(),
                              "reference": self.reference_traj.state_dict(),
                              "cond": self.cond.clone(), "order": self.order.clone()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed or int(state["num_prompts"]) != self.num_prompts:
            raise ValueError(f"the checkpoint's online rounds used seed {state['seed']} and "
                             f"{state['num_prompts']} prompts; this run has seed {self.seed} and "
                             f"{self.num_prompts}: resume with the same prompts and seed")
        self.round_index, self.last_step = int(state["round_index"]), int(state["last_step"])
        self.history = [dict(h) for h in state["history"]]
        pairs = state.get("pairs")
        if pairs is None:
            self.target_traj = self.reference_traj = self.cond = self.order = None
            return
        self.target_traj = Trajectory.from_state_dict(pairs["target"])
        self.reference_traj = Trajectory.from_state_dict(pairs["reference"])
        self.cond, self.order = pairs["cond"].clone(), pairs["order"].clone()


def history_table(history: list[dict[str, float]]) -> str:
    """The reward history as a plain-text table, one line per round."""
    mixed = len({h["steps"] for h in history if "steps" in h}) > 1  # step-count mixing: rounds differ
    lines = ["round  reward_mean  reward_best  reward_worst  kept  ties" + ("  steps" if mixed else "")]
    for h in history:
        label = f"{int(h['round'])}" + (" (final)" if h.get("final") else " (before)" if h.get("baseline")
                                         else "")
        kept = "-" if "kept_pairs" not in h else f"{int(h['kept_pairs'])}"
        ties = "-" if "skipped_ties" not in h else f"{int(h['skipped_ties'])}"
        steps = f"  {int(h['steps']):>5}" if mixed and "steps" in h else "      -" if mixed else ""
        lines.append(f"{label:<11}{h['reward_mean']:>11.6g}  {h['reward_best']:>11.6g}  "
                     f"{h['reward_worst']:>12.6g}  {kept:>4}  {ties:>4}{steps}")
    return "\n".join(lines)


def reward_map(history: list[dict[str, float]]) -> dict[str, list[float]]:
    """The rounds' rewards as a LOSS_MAP: ``loss`` is the mean reward (what Plot Loss Graph plots), then
    each statistic per round (0 where a round has none: the final evaluation trains on no pairs)."""
    out = {"loss": [h["reward_mean"] for h in history]}
    for key in ("reward_mean", "reward_best", "reward_worst", "kept_pairs", "skipped_ties"):
        out[key] = [h.get(key, 0.0) for h in history]
    return out


__all__ = ["ONLINE_METHODS", "OnlineConfig", "OnlineRounds", "PairLabels", "history_table", "label_pairs",
           "reward_map", "round_prompt_indices", "round_seed", "round_statistics", "sample_prompt"]
