"""PSO Online Train's settings and the facts of its runs, host-free: :class:`OnlineSettings` (every
input checked once; the loss settings by :meth:`OnlineSettings.method_config`, the round schedule by
:meth:`OnlineSettings.online_config`), the prompt list and the reward contract, and the record a run
writes into its folder and a resume is checked against (:func:`run_record`, :func:`check_resume`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import torch

from . import io as pso_io
from . import lora as pso_lora
from . import methods, online, runs, trainer
from .losses import LOSSES, valid_beta

#: beta of Eq. 7 as written: the paper's value (Appendix B.1: beta = 5 for online preference tuning).
#: bench/digits' 10 was measured for the offline loss on x0 errors and does not carry over to Eq. 7's
#: log-probability ratios; the authors' clipped code runs at 50.
BETA_ONLINE = LOSSES["pso_online"].beta_for("self_sampled")
BETA_ONLINE_CLIPPED = LOSSES["pso_online_clipped"].beta_for("self_sampled")
#: PSO Online Train's default method (since 2026-12-06; before: pso_online at beta 5): the authors'
#: clipped form at its beta 50. On bench/digits' shapes task with two rewards (brightness, and the
#: centring, whose best is a plausible drawing), 3 seeds, lrs 1e-4 / 3e-4, 2 and 4 samples per prompt,
#: it kept the captions (0.93-1.00 of samples read as the prompted shape and colour) with the least
#: drift and sharpness nearest the start, where Eq. 7 at beta 5 lost them (0.24-0.85 with 4 samples,
#: 0.58 at 3e-4 with 2) and at equal reward drifted further (bench/README.md, "Online PSO rows").
DEFAULT_ONLINE_METHOD = "pso_online_clipped"
#: first_step_weight (pso.methods.add_first_step_penalty) off by default: on bench/digits' shapes task
#: 0.01 kept the 4-step reward gain and most 1-step samples, but on the tiny random UNet of the headless
#: test it held the reward gain down (test round 1.01-1.06x vs 1.16-1.37x without it, 0.001: 1.05-1.14x;
#: seeds 0-3); how strongly it holds depends on the model, so it is the user's choice (bench/README.md,
#: "Holding the first step").
FIRST_STEP_WEIGHT = 0.0
#: The value the tooltip suggests to try, measured on the shapes task.
FIRST_STEP_SUGGESTED = 0.01
BETA_ALLOWED = (f"> 0: {BETA_ONLINE_CLIPPED:g} for pso_online_clipped (the authors' code, the default), "
                f"{BETA_ONLINE:g} for pso_online (the paper's Eq. 7); 0 no longer means 'the method's "
                "default'")


@dataclass(frozen=True)
class OnlineSettings:
    rounds: int = 10
    prompts_per_round: int = 128
    samples_per_prompt: int = 2
    tie_margin: float = 0.0
    method: str = DEFAULT_ONLINE_METHOD
    beta: float = BETA_ONLINE_CLIPPED  # pso_online (Eq. 7 as written): the paper's 5
    learning_rate: float = 1e-5
    lora_rank: int = 16
    steps_per_round: int = 4
    batch_size: int = 32
    seed: int = 0
    checkpoint_every: int = 0
    preview_every: int = 0
    lora_target: str = "attention"
    resume_from: str = ""  # a run folder under output/pso_checkpoints (its latest checkpoint) or ""
    first_step_weight: float = FIRST_STEP_WEIGHT  # 0 = the paper's loss as written

    def __post_init__(self):
        if self.method not in online.ONLINE_METHODS:
            raise ValueError(f"PSO Online Train: method {self.method!r} is unknown; choose one of "
                             f"{sorted(online.ONLINE_METHODS)}")
        checks = [("learning_rate", self.learning_rate > 0 and math.isfinite(self.learning_rate), "> 0"),
                  ("beta", valid_beta(self.beta), BETA_ALLOWED),
                  ("lora_rank", self.lora_rank >= 1, "at least 1"),
                  ("seed", 0 <= self.seed < 2**63, "in [0, 2**63)"),
                  ("checkpoint_every", self.checkpoint_every >= 0, ">= 0 (0 = at the end of every round)"),
                  ("preview_every", self.preview_every >= 0, ">= 0 (0 = no previews)"),
                  ("first_step_weight", math.isfinite(self.first_step_weight) and self.first_step_weight >= 0,
                   f">= 0 (0, the default: the paper's loss as written; e.g. {FIRST_STEP_SUGGESTED:g} to "
                   "hold the first step)")]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"PSO Online Train: {name}={getattr(self, name)!r} is invalid; it must be "
                                 f"{allowed}")
        if self.lora_target not in pso_lora.TARGETS:
            raise ValueError(f"PSO Online Train: lora_target {self.lora_target!r} is unknown; choose one of "
                             f"{sorted(pso_lora.TARGETS)}")
        self.online_config()  # validates the round schedule
        self.method_config()  # and the loss settings, where every trainer's are

    def method_config(self) -> methods.MethodConfig:
        """The loss settings of this run, as :func:`pso.methods.compute_method_loss` takes them."""
        return methods.MethodConfig(self.method, beta=self.beta, first_step_weight=self.first_step_weight)

    def train_config(self, checkpoint_dir: str) -> trainer.TrainConfig:
        """The trainer's settings of this run, checkpointing into ``checkpoint_dir`` (checkpoint_every 0:
        at the end of every round); the trainer's refresh collects a round every steps_per_round steps."""
        rounds = self.online_config()
        return trainer.TrainConfig(steps=rounds.total_steps, lr=self.learning_rate, seed=self.seed,
                                   checkpoint_every=self.checkpoint_every or rounds.steps_per_round,
                                   checkpoint_dir=checkpoint_dir, ref_refresh_every=rounds.steps_per_round)

    def lora_config(self) -> pso_lora.LoRAConfig:
        return pso_lora.LoRAConfig(rank=self.lora_rank, target=self.lora_target)

    def online_config(self) -> online.OnlineConfig:
        return online.OnlineConfig(rounds=self.rounds, prompts_per_round=self.prompts_per_round,
                                   samples_per_prompt=self.samples_per_prompt,
                                   steps_per_round=self.steps_per_round, batch_size=self.batch_size,
                                   tie_margin=self.tie_margin)


#: The per-step metrics PSO Online Train's LOSS_MAP carries besides the loss.
LOSS_MAP_METRICS = ("implicit_accuracy", "margin", "saturated_fraction", "clipped_fraction", "pairwise_loss",
                    "first_step_shift")
#: Settings an online resume may change: everything else must be what the run was started with.
RESUME_MAY_CHANGE = ("rounds", "checkpoint_every", "preview_every", "resume_from")
#: What a run recorded before a setting existed trained with (its record lacks the key).
BEFORE_FIELD = {"first_step_weight": 0.0}


def run_record(settings: OnlineSettings, prompts: list[str], reward_name: str, policy: str,
               sigmas: torch.Tensor, shape: tuple[int, ...]) -> dict:
    """What an online run trains, written into its folder when it starts and compared on resume."""
    fixed = {k: v for k, v in asdict(settings).items() if k not in RESUME_MAY_CHANGE}
    digest = hashlib.sha256(json.dumps(prompts).encode("utf-8")).hexdigest()
    return {"kind": "pso-online-run", "settings": json.loads(json.dumps(fixed)), "prompts": len(prompts),
            "prompts_sha256": digest, "reward": reward_name, "sampler_policy": policy,
            "sigmas": [round(float(s), 6) for s in sigmas], "latent_shape": list(shape)}


def check_resume(run_dir, resume, settings: OnlineSettings, record: dict) -> int:
    """Refuse a resume that could not continue the online run as it was (the offline node's rules):
    other settings, prompts, reward, sampler, SIGMAS or latent size, or no step left. Returns the
    step the resume starts from."""
    name = settings.resume_from
    total = settings.rounds * settings.steps_per_round
    try:
        start = pso_io.load_checkpoint_meta(resume)["step"]
    except pso_io.CheckpointError as exc:
        raise ValueError(f"PSO Online Train: resume_from {name!r}: {exc}") from exc
    if start >= total:
        raise ValueError(
            f"PSO Online Train: resume_from {name!r} is already at step {start} (round "
            f"{start // settings.steps_per_round}), and rounds={settings.rounds} x steps_per_round="
            f"{settings.steps_per_round} leaves nothing to train (rounds is the new total). Raise rounds, or "
            "clear resume_from to start a new run; nothing was trained or returned.")
    path = run_dir / runs.RUN_RECORD
    try:
        saved = pso_io.read_json(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"PSO Online Train: resume_from {name!r}: its record {path} cannot be read ({exc}); "
                         "clear resume_from to start a new run") from exc
    if saved.get("kind") != "pso-online-run":
        raise ValueError(f"PSO Online Train: resume_from {name!r} is not an online run (its record says "
                         f"{saved.get('kind')!r}); resume it with the node that started it")
    saved_settings = {**BEFORE_FIELD, **saved.get("settings", {})}
    changed = {k: (v, record["settings"].get(k)) for k, v in saved_settings.items()
               if record["settings"].get(k) != v}
    for key in ("prompts_sha256", "reward", "sampler_policy", "sigmas", "latent_shape"):
        if saved.get(key) != record[key]:
            changed[key] = (saved.get(key), record[key])
    if changed:
        shown = ", ".join(f"{k}: run {str(old)[:40]!r}, now {str(new)[:40]!r}"
                          for k, (old, new) in sorted(changed.items()))
        raise ValueError(
            f"PSO Online Train: resume_from {name!r} was trained with other inputs ({shown}); a resume "
            f"continues the run as it was (only {', '.join(RESUME_MAY_CHANGE[:3])} may change). Set them "
            "back, or clear resume_from to start a new run with these.")
    return start


def parse_prompts(text: str) -> list[str]:
    """One prompt per non-empty line (a repeated line is used once)."""
    prompts = list(dict.fromkeys(line.strip() for line in (text or "").splitlines() if line.strip()))
    if not prompts:
        raise ValueError("PSO Online Train: prompts is empty; write one prompt per line (the paper samples "
                         "128 prompts a round from a prompt list such as Pick-a-Pic's)")
    return prompts


def check_reward(reward) -> str:
    """The reward's name, or a ValueError if it does not honour the PSO_REWARD contract."""
    if not callable(getattr(reward, "score", None)) or not isinstance(getattr(reward, "name", None), str):
        raise ValueError(f"PSO Online Train: the reward input is a {type(reward).__name__}, not a PSO_REWARD "
                         "(an object with name and score(images, prompts)); connect a reward node's output")
    return reward.name


def reward_scores(reward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``reward.score(images, prompts)`` as a (B,) float CPU tensor; refused unless one finite score per
    image."""
    scores = reward.score(images, prompts)
    scores = torch.as_tensor(scores).detach().float().cpu().reshape(-1)
    if scores.numel() != images.shape[0] or not bool(torch.isfinite(scores).all()):
        raise ValueError(f"PSO Online Train: reward {reward.name!r} returned {scores.tolist()[:8]} for "
                         f"{images.shape[0]} images; it must return one finite score per image")
    return scores
