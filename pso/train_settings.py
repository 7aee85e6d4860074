"""PSO Train's settings and the facts of its runs, host-free: :class:`TrainSettings` (every input
checked once, with the loss settings built by :meth:`TrainSettings.method_config`), whether a method
fits a pair set (:func:`check_method_fits_pairs`, :func:`mixed_step_counts`), and the record a run
writes into its folder and a resume is checked against (:func:`run_record`, :func:`check_resume`).

``pairs`` is anything shaped like the node's PAIR_SET (:class:`Pairs`): target and reference latents,
prompt indices and prompts, the references' SIGMAS, policy and (for sampled references) trajectories.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from . import io as pso_io
from . import lora as pso_lora
from . import methods, trainer
from .dataset import LatentColumn
from .losses import DEFAULT_REDUCTION, LOSSES, node_choices, valid_beta
from .runs import RUN_RECORD
from .samplers import POLICIES
from .schedules import sub_schedule

logger = logging.getLogger(__name__)


class Pairs(Protocol):
    """What these checks read of a pair set (the node's ``PairSet``)."""

    target: Any  # (P, C, H, W) tensor or a streamed pso.dataset.LatentColumn
    reference: Any
    prompt_index: torch.Tensor
    prompts: list[str]
    sigmas: torch.Tensor
    policy: str
    reference_traj: Any

    def __len__(self) -> int: ...


#: Methods the training node offers, name -> tooltip: the offline losses of the registry (pso.losses.LOSSES);
#: online PSO (Eq. 7) has its own node.
TRAIN_METHODS: dict[str, str] = node_choices("offline")
DEFAULT_METHOD = "pso_offline"
#: training_dtype choices (released names) -> pso.trainer.MIXED_PRECISION keys, whose "no" the node calls
#: float32.
PRECISIONS: dict[str, str] = {("float32" if k == "no" else k): k for k in trainer.MIXED_PRECISION}
#: beta by data source (pso.losses.BETA_SOURCES), the default method's: references the model sampled
#: itself (re-sampled every step) and preference pairs (the paper's offline value, Pick-a-Pic).
BETA_SELF_SAMPLED = LOSSES[DEFAULT_METHOD].beta_for("self_sampled")
BETA_PREFERENCE_PAIRS = LOSSES[DEFAULT_METHOD].beta_for("preference_pairs")
BETA_ALLOWED = (f"> 0: {BETA_SELF_SAMPLED:g} for references the model sampled itself (the default), "
                f"{BETA_PREFERENCE_PAIRS:g} for preference pairs; 0 no longer means 'the paper's value'")


#: Where PSO Train takes the target anchor (pso.methods.ANCHOR_LEVELS; 'continuous' is left to the bench,
#: where it diverged): 'final' (default) also anchors the last step's input level.
NODE_ANCHOR_LEVELS: dict[str, str] = {k: methods.ANCHOR_LEVELS[k] for k in ("final", "pair")}
#: The moving average of the LoRA's weights that PSO Train saves by default (pso.trainer's ema_decay),
#: chosen on bench/digits and its shapes task (bench/README.md), and its horizon in steps.
DEFAULT_EMA_DECAY = 0.99
EMA_HORIZON = round(1 / (1 - DEFAULT_EMA_DECAY))


@dataclass(frozen=True)
class TrainSettings:
    method: str = DEFAULT_METHOD
    steps: int = 500
    learning_rate: float = 1e-4
    beta: float = BETA_SELF_SAMPLED  # references the model sampled itself; preference pairs: 50
    lora_rank: int = 16
    lora_target: str = "attention"
    batch_size: int = 1
    grad_accumulation: int = 1
    seed: int = 0
    reference_refresh_every: int = 1  # a pair's reference is re-sampled once this many steps old
    training_dtype: str = "float32"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0
    preview_every: int = 0
    resume_from: str = ""  # a run folder under output/pso_checkpoints (its latest checkpoint) or ""
    reduction: str = DEFAULT_REDUCTION
    # step counts (besides the references' own) that half of the steps sample and train at; None = "auto"
    reference_step_counts: tuple[int, ...] | None = None
    target_sft_weight: float = 1.0  # plain diffusion loss on the targets, added to pairwise losses
    ema_decay: float = DEFAULT_EMA_DECAY  # the saved LoRA is a moving average of the weights; 0 = last step's
    anchor_levels: str = "final"  # a NODE_ANCHOR_LEVELS key: where target_sft_weight's anchor is taken

    def __post_init__(self):
        if self.method not in TRAIN_METHODS:
            raise ValueError(f"method {self.method!r} is unknown; choose one of {sorted(TRAIN_METHODS)}")
        checks = [("steps", self.steps >= 1, "at least 1"), ("lora_rank", self.lora_rank >= 1, "at least 1"),
                  ("batch_size", self.batch_size >= 1, "at least 1"),
                  ("grad_accumulation", self.grad_accumulation >= 1, "at least 1"),
                  ("learning_rate", self.learning_rate > 0 and math.isfinite(self.learning_rate), "> 0"),
                  ("beta", valid_beta(self.beta), BETA_ALLOWED),
                  ("reference_refresh_every", self.reference_refresh_every >= 0, ">= 0 (0 = never)"),
                  ("checkpoint_every", self.checkpoint_every >= 0, ">= 0 (0 = only when stopping)"),
                  ("preview_every", self.preview_every >= 0, ">= 0 (0 = no previews)"),
                  ("target_sft_weight", self.target_sft_weight >= 0 and math.isfinite(self.target_sft_weight),
                   ">= 0 (0 = the paper's losses as written)"),
                  ("ema_decay", 0 <= self.ema_decay < 1, ">= 0 and < 1 (0 = off: the last step's weights; "
                   f"{DEFAULT_EMA_DECAY:g} averages about the last {EMA_HORIZON} steps)")]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"PSO Train: {name}={getattr(self, name)!r} is invalid; it must be "
                                 f"{allowed}")
        if self.reference_step_counts is not None and any(k < 1 for k in self.reference_step_counts):
            raise ValueError(f"reference_step_counts {list(self.reference_step_counts)} must all be >= 1")
        if self.anchor_levels not in NODE_ANCHOR_LEVELS:
            raise ValueError(f"anchor_levels {self.anchor_levels!r} is unknown; choose one of "
                             f"{list(NODE_ANCHOR_LEVELS)}")
        if self.training_dtype not in PRECISIONS:
            raise ValueError(f"training_dtype {self.training_dtype!r} is unknown; choose one of "
                             f"{sorted(PRECISIONS)}")
        self.method_config()  # the loss settings, validated where every trainer's are (reduction, beta)

    def method_config(self) -> methods.MethodConfig:
        """The loss settings of this run, as :func:`pso.methods.compute_method_loss` takes them."""
        return methods.MethodConfig(self.method, beta=self.beta, reduction=self.reduction,
                                    target_sft_weight=self.effective_target_sft_weight,
                                    anchor_levels=self.anchor_levels)

    def train_config(self, checkpoint_dir: str) -> trainer.TrainConfig:
        """The trainer's settings of this run, checkpointing into ``checkpoint_dir``."""
        return trainer.TrainConfig(steps=self.steps, lr=self.learning_rate, grad_accum=self.grad_accumulation,
                                   seed=self.seed, mixed_precision=PRECISIONS[self.training_dtype],
                                   checkpoint_every=self.checkpoint_every, checkpoint_dir=checkpoint_dir,
                                   ref_refresh_every=1 if self.reference_refresh_every else 0,
                                   ema_decay=self.ema_decay)

    def lora_config(self) -> pso_lora.LoRAConfig:
        return pso_lora.LoRAConfig(rank=self.lora_rank, target=self.lora_target)

    @property
    def effective_target_sft_weight(self) -> float:
        """The anchor weight the method uses: offline PSO takes it (where bench/digits measured it); the
        other methods run as their papers wrote them (0, recorded as such in the summary)."""
        return self.target_sft_weight if LOSSES[self.method].target_anchor else 0.0

    @classmethod
    def parse_step_counts(cls, text: str) -> tuple[int, ...] | None:
        """"1, 2" -> (1, 2); "" or "none" -> () (off); "auto" -> None (every step count that divides
        the references' own, resolved by :func:`mixed_step_counts`). Errors name the text and the form."""
        text = (text or "").strip()
        if text.lower() == "auto":
            return None
        if text.lower() == "none":
            return ()
        parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
        try:
            counts = tuple(sorted({int(p) for p in parts}))
        except ValueError:
            raise ValueError(f"reference_step_counts {text!r} is not a list of step counts; write e.g. "
                             "'1, 2', 'auto' or 'none'") from None
        return counts


def check_method_fits_pairs(settings: TrainSettings, pairs: Pairs) -> None:
    """Eq. 5 needs the Gaussian policy of a stochastic sampler; say which methods apply otherwise.
    Re-sampling references only makes sense for references the model sampled (they carry their
    trajectories): it would silently replace preference images with the model's own samples."""
    if settings.reference_refresh_every and pairs.reference_traj is None:
        raise ValueError(
            f"reference_refresh_every={settings.reference_refresh_every} would replace these pairs' "
            "references with new samples of the model, but they are not the model's samples (e.g. rejected "
            "images of preference pairs): set reference_refresh_every to 0"
        )
    mixed_step_counts(settings, pairs)  # raises with the reason if explicit step counts cannot be used
    if LOSSES[settings.method].needs_gaussian_policy and not POLICIES[pairs.policy].stochastic:
        usable = [m for m in TRAIN_METHODS if not LOSSES[m].needs_gaussian_policy]
        raise ValueError(
            f"method {settings.method!r} needs a stochastic sampler's Gaussian policy, but the references "
            f"were sampled with {pairs.policy!r}, which is deterministic (as Lightning / Hyper-SD / schnell "
            f"are run). Use one of {usable}, or sample references with lcm or euler_ancestral."
        )


def mixed_step_counts(settings: TrainSettings, pairs: Pairs) -> list[int]:
    """The step counts besides the references' own N that training mixes in (``reference_step_counts``).

    "auto" (None): every count that divides N (e.g. 1 and 2 for DMD2's 4 steps, 1, 2 and 4 for 8),
    where it applies: a forward-noised method (offline / DreamBooth PSO) with references re-sampled
    every step; otherwise none (and the summary says so). An explicit list is checked and refused
    with the reason where it cannot apply.
    """
    n = int(pairs.sigmas.shape[0]) - 1
    spec = LOSSES[settings.method]
    forward_refs = spec.reference_path == "forward"
    if settings.reference_step_counts is None:
        if not forward_refs or settings.reference_refresh_every != 1:
            return []
        return [k for k in range(1, n) if n % k == 0]
    counts = [k for k in settings.reference_step_counts if k != n]
    if not counts:
        return []
    if not forward_refs:
        raise ValueError(f"reference_step_counts={list(settings.reference_step_counts)} needs forward-noised "
                         f"references (offline or DreamBooth PSO); method {settings.method!r} "
                         "scores the references' own trajectories or has no references: set it to 'none'")
    if settings.reference_refresh_every != 1:
        raise ValueError(f"reference_step_counts={list(settings.reference_step_counts)} samples each step's "
                         "references fresh at the step's count: set reference_refresh_every to 1 (got "
                         f"{settings.reference_refresh_every}), or reference_step_counts to 'none'")
    for k in counts:
        sub_schedule(pairs.sigmas, k)  # raises naming the counts that divide n
    return counts


#: The per-step metrics PSO Train's LOSS_MAP carries besides the loss.
LOSS_MAP_METRICS = ("implicit_accuracy", "margin", "saturated_fraction")
#: Settings a resume may change: everything else must be what the run was started with.
RESUME_MAY_CHANGE = ("steps", "checkpoint_every", "preview_every", "gradient_checkpointing", "resume_from")


def pairs_digest(pairs: Pairs) -> str:
    """SHA-256 of the pairs' tensors and prompts: the same pairs give the same digest, any added,
    removed or changed pair another one (a resume must train on the pairs the run started with)."""
    if isinstance(pairs.target, LatentColumn) and isinstance(pairs.reference, LatentColumn):
        return pairs.target.dataset.digest()  # streamed pairs: the manifest's shard hashes and items
    h = hashlib.sha256()
    for t in (pairs.target, pairs.reference, pairs.prompt_index):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    h.update(json.dumps(list(pairs.prompts)).encode("utf-8"))
    return h.hexdigest()


def run_record(settings: TrainSettings, pairs: Pairs) -> dict:
    fixed = {k: v for k, v in asdict(settings).items() if k not in RESUME_MAY_CHANGE}
    return {"kind": "pso-train-run", "settings": json.loads(json.dumps(fixed)), "pairs": len(pairs),
            "pairs_sha256": pairs_digest(pairs)}


def check_resume(run_dir: Path, resume: Path, settings: TrainSettings, pairs: Pairs) -> int:
    """Refuse a resume that could not continue the run as it was: other settings, other pairs, or no
    step left to train (``steps`` is the new total). Returns the step the resume starts from."""
    name = settings.resume_from
    try:
        start = pso_io.load_checkpoint_meta(resume)["step"]
    except pso_io.CheckpointError as exc:
        raise ValueError(f"resume_from {name!r}: {exc}") from exc
    if start >= settings.steps:
        raise ValueError(
            f"resume_from {name!r} is already at step {start}, and steps={settings.steps} leaves nothing to "
            f"train (steps is the new total, not the steps to add). Set steps above {start} to continue "
            "the run, or clear resume_from to start a new one; nothing was trained or returned.")
    path = run_dir / RUN_RECORD
    if not path.is_file():
        logger.warning("PSO Train: %s has no %s (a run of an older version): its settings and pairs "
                       "cannot be checked against this resume", run_dir, RUN_RECORD)
        return start
    try:
        saved = pso_io.read_json(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"resume_from {name!r}: its record {path} cannot be read ({exc}); clear "
                         "resume_from to start a new run") from exc
    want = run_record(settings, pairs)
    changed = {k: (v, want["settings"].get(k)) for k, v in saved.get("settings", {}).items()
               if want["settings"].get(k) != v}
    if changed:
        shown = ", ".join(f"{k}: run {old!r}, now {new!r}" for k, (old, new) in sorted(changed.items()))
        raise ValueError(
            f"resume_from {name!r} was trained with other settings ({shown}); a resume continues the run "
            f"as it was (only {', '.join(RESUME_MAY_CHANGE[:4])} may change). Set them back, or clear "
            "resume_from to start a new run with these settings.")
    if (saved.get("pairs"), saved.get("pairs_sha256")) != (want["pairs"], want["pairs_sha256"]):
        raise ValueError(
            f"resume_from {name!r} was trained on other pairs ({saved.get('pairs')} pairs, digest "
            f"{str(saved.get('pairs_sha256'))[:12]}...; these are {want['pairs']} pairs, digest "
            f"{want['pairs_sha256'][:12]}...): its reference pool and batches belong to those. Connect the "
            "pairs the run started with, or clear resume_from to start a new run on these.")
    return start
