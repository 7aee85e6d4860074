"""The headless trainer's configuration: one TOML (or JSON) file read into a frozen dataclass.

Sections only group keys for people; every key is unique, so ``[train] lr = 1e-5`` and a top-level
``lr = 1e-5`` mean the same. Unknown keys are errors that list the known ones. Paths are taken
relative to the config file's folder.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pso import families
from pso import io as pso_io
from pso.lora import TARGETS
from pso.losses import LOSSES, losses_of
from pso.methods import TRANSITIONS
from pso.online_settings import FIRST_STEP_WEIGHT
from pso.schedules import FEW_STEP_TIMESTEPS
from pso.trainer import MIXED_PRECISION, OPTIMIZERS

#: Section -> keys, for the error message and the README's reference (the dataclass is the truth).
SECTIONS: dict[str, tuple[str, ...]] = {
    "model": ("model", "model_config", "prediction", "family"),
    "method": ("loss", "beta", "transitions", "timesteps", "loss_options"),
    "lora": ("rank", "alpha", "target"),
    "train": ("steps", "global_batch", "grad_accum", "lr", "optimizer", "weight_decay", "warmup_steps",
              "max_grad_norm", "mixed_precision", "seed", "data_lanes", "gradient_checkpointing",
              "ema_decay"),
    "data": ("datasets",),
    "output": ("output_dir", "name", "checkpoint_every", "keep_checkpoints", "resume_from", "log_every"),
    "online": ("prompts", "prompt_limit", "reward", "reward_model", "reward_head", "reward_tokenizer",
               "prompts_per_round", "samples_per_prompt", "steps_per_round", "tie_margin", "sampler",
               "resolution", "first_step_weight"),
}
#: Parameterisations a config may name; "auto" reads the scheduler config's prediction_type.
PREDICTIONS = ("auto", "eps", "v")
#: Model families the headless trainer knows how to condition (ComfyUI's config class names).
HEADLESS_FAMILIES = {
    "auto": "read from the UNet config (SDXL if it takes pooled text and size ids, SD20 for 1024-wide "
            "text, else SD15)",
    **families.headless_families(),  # the rows of the one family table the headless trainer trains
}
#: Losses that train from sampled trajectories labelled by a reward (Eq. 7).
ONLINE_LOSSES = losses_of("online")


class ConfigError(ValueError):
    """A headless config file or value is wrong; the message names the key, the value and the fix."""


def _positive_int(name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}.")


def _positive_float(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}.")


@dataclass(frozen=True)
class HeadlessConfig:
    """Everything one headless training run needs.

    model: a single-file checkpoint (``.safetensors``, as ComfyUI users have it) or a diffusers folder
    (``model_index.json`` inside). model_config: for a single file, a local diffusers folder holding
    the configs and tokenizers of that model family (no weights needed); never fetched from the Hub.
    prediction / family: see :data:`PREDICTIONS`, :data:`HEADLESS_FAMILIES`.

    loss: a :data:`pso.losses.LOSSES` key; beta: None takes the loss's default. timesteps: None uses
    the SIGMAS in the first dataset's fingerprint (what its references were sampled with), else a
    :data:`pso.schedules.FEW_STEP_TIMESTEPS` name or a list of integer timesteps.

    global_batch: pairs per optimizer step over all processes; grad_accum: micro-steps per optimizer
    step; data_lanes: how many independent shard streams the data is read in; the number of processes
    must divide it (a run can resume on any divisor of it), and global_batch / grad_accum must be a
    multiple of it.

    Online PSO (Eq. 7, ``prompts`` set, ``datasets`` empty): each round samples ``prompts_per_round``
    prompts x ``samples_per_prompt`` images at ``resolution`` with the step policy ``sampler`` and the
    ``timesteps`` schedule from the current model, scores them with the ``reward`` kind loaded from
    ``reward_model`` (+ ``reward_head`` for aesthetic, ``reward_tokenizer``: ImageReward's BERT folder
    or a CLIP tokenizer for a PickScore folder without one), keeps best-vs-worst pairs whose gap
    exceeds ``tie_margin``, and trains ``steps_per_round`` steps of ``global_batch`` pairs on them,
    with the first step held near the frozen model at ``first_step_weight`` (PSO Online Train's
    default 0 = Eq. 7 as written; ``pso.methods.add_first_step_penalty``).
    """

    model: str
    datasets: tuple[str, ...]
    output_dir: str
    model_config: str | None = None
    prediction: str = "auto"
    family: str = "auto"
    loss: str = "pso_offline"
    beta: float | None = None
    transitions: str = "all"
    timesteps: str | tuple[int, ...] | None = None
    loss_options: dict[str, Any] = field(default_factory=dict)
    rank: int = 16
    alpha: float | None = None
    target: str = "attention"
    steps: int = 1000
    global_batch: int = 64
    grad_accum: int = 1
    lr: float = 1e-5
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    data_lanes: int = 8
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0
    name: str = "pso_lora"
    checkpoint_every: int = 0
    keep_checkpoints: int = 0
    resume_from: str | None = None
    log_every: int = 1
    prompts: str | None = None
    prompt_limit: int = 0
    reward: str = "pickscore"
    reward_model: str | None = None
    reward_head: str | None = None
    reward_tokenizer: str | None = None
    prompts_per_round: int = 128
    samples_per_prompt: int = 2
    steps_per_round: int = 4
    tie_margin: float = 0.0
    sampler: str = "renoise"
    resolution: int = 1024
    first_step_weight: float = FIRST_STEP_WEIGHT

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"model must be the path of a .safetensors checkpoint or a diffusers folder, "
                              f"got {self.model!r}.")
        ds = self.datasets
        if isinstance(ds, str):
            ds = (ds,)
        online = self.prompts is not None
        if online and ds:
            raise ConfigError(f"online PSO (prompts = {self.prompts!r}) samples its own pairs; leave "
                              f"datasets out (got {list(ds)!r}).")
        if not online and (not ds or not all(isinstance(d, str) and d for d in ds)):
            raise ConfigError(f"datasets must be a list of pair dataset folders, got {self.datasets!r}.")
        object.__setattr__(self, "datasets", tuple(ds))
        if online:
            self._check_online()
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"prediction={self.prediction!r} is unknown; choose one of "
                              f"{list(PREDICTIONS)}.")
        if self.family in families.FAMILIES and self.family not in HEADLESS_FAMILIES:
            raise ConfigError(f"family={self.family!r} is trained in ComfyUI (the PSO Train node), not by "
                              "the headless trainer, which conditions diffusers UNet2DConditionModel "
                              f"families only: {sorted(families.headless_families())}.")
        if self.family not in HEADLESS_FAMILIES:
            raise ConfigError(f"family={self.family!r} is unknown; choose one of "
                              f"{sorted(HEADLESS_FAMILIES)}.")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r} is unknown; choose one of {sorted(LOSSES)}.")
        if self.beta is not None:
            _positive_float("beta", self.beta)
        if self.transitions not in TRANSITIONS:
            raise ConfigError(f"transitions={self.transitions!r} is unknown; choose one of "
                              f"{sorted(TRANSITIONS)}.")
        ts = self.timesteps
        if isinstance(ts, list):
            ts = tuple(ts)
            object.__setattr__(self, "timesteps", ts)
        if isinstance(ts, str) and ts not in FEW_STEP_TIMESTEPS:
            raise ConfigError(f"timesteps={ts!r} is unknown; choose one of {sorted(FEW_STEP_TIMESTEPS)}, a "
                              "list of integer timesteps, or leave it out to use the dataset's SIGMAS.")
        if isinstance(ts, tuple) and not (ts and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                     for t in ts)):
            raise ConfigError(f"timesteps must be a list of integer timesteps >= 0, got {list(ts)!r}.")
        if not isinstance(self.loss_options, dict):
            raise ConfigError(f"loss_options must be a table of loss settings, got {self.loss_options!r}.")
        _positive_int("rank", self.rank)
        if self.alpha is not None:
            _positive_float("alpha", self.alpha)
        if self.target not in TARGETS:
            raise ConfigError(f"target={self.target!r} is unknown; choose one of {sorted(TARGETS)}.")
        for name in ("steps", "global_batch", "grad_accum", "data_lanes", "log_every"):
            _positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "checkpoint_every", "keep_checkpoints", "seed"):
            _positive_int(name, getattr(self, name), low=0)
        _positive_float("lr", self.lr)
        _positive_float("weight_decay", self.weight_decay, allow_zero=True)
        _positive_float("max_grad_norm", self.max_grad_norm, allow_zero=True)
        _positive_float("ema_decay", self.ema_decay, allow_zero=True)
        if self.ema_decay >= 1:
            raise ConfigError(f"ema_decay={self.ema_decay!r} must be < 1 (e.g. 0.99 averages about the last "
                              "100 steps); 0 turns the moving average off.")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r} is unknown; choose one of {sorted(OPTIMIZERS)}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision={self.mixed_precision!r} is unknown; choose one of "
                              f"{sorted(MIXED_PRECISION)}.")
        micro = self.global_batch // self.grad_accum
        example = self.grad_accum * self.data_lanes * max(1, micro // self.data_lanes)
        if not online and (self.global_batch % self.grad_accum or micro % self.data_lanes):
            raise ConfigError(
                f"global_batch={self.global_batch} must be grad_accum={self.grad_accum} times a multiple of "
                f"data_lanes={self.data_lanes} (each micro-step takes the same number of pairs from every "
                f"lane); e.g. global_batch={example}.")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(f"gradient_checkpointing must be true or false, got "
                              f"{self.gradient_checkpointing!r}.")
        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in "/\\:\0"):
            raise ConfigError(f"name={self.name!r} must be a plain file name stem (no folders).")

    def _check_online(self) -> None:
        from pso.rewards import REWARD_KINDS, canonical_kind
        from pso.samplers import POLICIES

        if self.loss not in ONLINE_LOSSES:
            raise ConfigError(f"online PSO (prompts set) trains {list(ONLINE_LOSSES)}, got "
                              f"loss={self.loss!r}.")
        if not isinstance(self.prompts, str) or not self.prompts:
            raise ConfigError(f"prompts must be a prompt file (.txt, .tsv, .parquet), got {self.prompts!r}.")
        if not self.reward_model:
            raise ConfigError("online PSO needs reward_model: the reward's local file or folder (see the "
                              f"README's reward table; kinds {sorted(REWARD_KINDS)}).")
        try:
            object.__setattr__(self, "reward", canonical_kind(self.reward))
        except ValueError as exc:
            raise ConfigError(f"reward={self.reward!r}: {exc}") from exc
        if self.sampler not in POLICIES or not POLICIES[self.sampler].stochastic:
            usable = sorted(k for k, v in POLICIES.items() if v.stochastic)
            raise ConfigError(f"sampler={self.sampler!r}: online PSO needs a stochastic step policy "
                              f"({usable}; renoise is ComfyUI's lcm).")
        if self.timesteps is None:
            raise ConfigError(f"online PSO has no dataset to read the schedule from: set timesteps (one of "
                              f"{sorted(FEW_STEP_TIMESTEPS)} or a list of integer timesteps).")
        if self.grad_accum != 1:
            raise ConfigError(f"grad_accum={self.grad_accum}: online PSO trains each step on global_batch "
                              "pairs of the current round; set grad_accum = 1.")
        for name, low in (("prompt_limit", 0), ("prompts_per_round", 1), ("samples_per_prompt", 2),
                          ("steps_per_round", 1), ("resolution", 8)):
            _positive_int(name, getattr(self, name), low)
        _positive_float("tie_margin", self.tie_margin, allow_zero=True)
        _positive_float("first_step_weight", self.first_step_weight, allow_zero=True)
        if self.resolution % 8:
            raise ConfigError(f"resolution={self.resolution} must be a multiple of 8 (the VAE's factor).")

    @property
    def online(self) -> bool:
        """Whether this is an online-PSO run (sampling its own pairs from ``prompts``)."""
        return self.prompts is not None

    @property
    def micro_batch(self) -> int:
        """Pairs per micro-step over all processes."""
        return self.global_batch // self.grad_accum

    def per_process_batch(self, world_size: int) -> int:
        """Pairs per micro-step on each of ``world_size`` processes; refuses a world size that does not
        divide :attr:`data_lanes`."""
        if self.data_lanes % world_size:
            divisors = [d for d in range(1, self.data_lanes + 1) if not self.data_lanes % d]
            raise ConfigError(
                f"{world_size} processes cannot share data_lanes={self.data_lanes} lanes evenly; launch a "
                f"number of processes that divides it ({divisors}), "
                "or start a new run with another data_lanes (a run resumes only with its own).")
        return self.micro_batch // world_size

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["datasets"] = list(self.datasets)
        if isinstance(self.timesteps, tuple):
            out["timesteps"] = list(self.timesteps)
        return out


_PATH_KEYS = ("model", "model_config", "output_dir", "resume_from", "prompts", "reward_model", "reward_head",
              "reward_tokenizer")


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for k, v in value.items():
                if k in flat:
                    raise ConfigError(f"key {k!r} is given twice.")
                flat[k] = v
        elif key in flat:
            raise ConfigError(f"key {key!r} is given twice.")
        else:
            flat[key] = value
    return flat


def config_from_dict(data: dict[str, Any], base_dir: str | os.PathLike | None = None) -> HeadlessConfig:
    """A :class:`HeadlessConfig` from a (possibly sectioned) dict; relative paths are taken from
    ``base_dir``."""
    flat = _flatten(data)
    known = {f.name for f in fields(HeadlessConfig)}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known keys by section: "
                          f"{ {s: list(k) for s, k in SECTIONS.items()} }.")
    if base_dir is not None:
        for key in _PATH_KEYS:
            if isinstance(flat.get(key), str) and flat[key] and not os.path.isabs(flat[key]):
                flat[key] = str(Path(base_dir, flat[key]))
        ds = flat.get("datasets")
        if isinstance(ds, str):
            ds = [ds]
        if isinstance(ds, list):
            flat["datasets"] = [str(Path(base_dir, d)) if isinstance(d, str) and not os.path.isabs(d) else d
                                for d in ds]
    if flat.get("prompts") is not None:
        flat.setdefault("datasets", [])
    missing = [k for k in ("model", "datasets", "output_dir") if k not in flat]
    if missing:
        raise ConfigError(f"the config lacks {missing}: give the base model, the pair dataset folder(s) (or "
                          "prompts for online PSO) and the output folder.")
    return HeadlessConfig(**flat)


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> HeadlessConfig:
    """Read a ``.toml`` or ``.json`` config file (plus ``overrides``, e.g. from the command line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    elif path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    else:
        raise ConfigError(f"config file {path} must end in .toml or .json.")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a table of settings, got {type(data).__name__}.")
    flat = _flatten(data)
    flat.update(overrides or {})
    return config_from_dict(flat, base_dir=path.parent)


def refuse_existing_checkpoints(checkpoint_dir: Path) -> None:
    """A new run (no ``resume_from``) must not write into a folder that holds another run's
    checkpoints: raise ``pso.io.CheckpointError`` naming them and the two ways on."""
    existing = pso_io.list_checkpoints(checkpoint_dir)
    if existing:
        raise pso_io.CheckpointError(
            f"{checkpoint_dir} already holds checkpoints ({[p.name for _, p in existing][-3:]}); set "
            f"resume_from = '{checkpoint_dir}' to continue that run, or choose another output_dir.")
