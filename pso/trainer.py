"""The generic optimisation loop: method-agnostic, exactly resumable, safe to cancel.

The loss of each PSO method lives elsewhere; the trainer only needs

- ``batch_source(step, generator) -> batch``: one micro-batch (called ``grad_accum`` times a step);
- ``step_fn(batch, generator) -> out`` with ``out.loss`` (B,) per-sample losses that depend on the
  trainable parameters and ``out.metrics`` a ``dict[str, float]`` (e.g. ``pso.losses.LossOutput``);
- optionally ``refresh_fn(step, generator)``, called before the steps ``0, k, 2k, ...`` for
  ``k = ref_refresh_every`` (re-sampling reference trajectories from the current model).

``step`` is always the number of optimizer steps completed so far (0 for the first step). One
``torch.Generator`` seeded from ``TrainConfig.seed`` is handed to all three and is checkpointed,
so a run interrupted at any step and resumed repeats the uninterrupted loss sequence bit for bit
on the CPU. Objects whose state must survive a resume (a reference pool that ``refresh_fn`` fills)
are passed as ``stateful={"name": obj}`` (``obj.state_dict()`` / ``obj.load_state_dict()``,
holding tensors and plain containers).

Stopping: an exception from the callback (how ComfyUI's Cancel arrives) or from any of the
functions saves a checkpoint of the last completed step (when ``checkpoint_dir`` is set) and is
re-raised; :class:`StopTraining` stops the same way but returns a result.

Non-finite values: a NaN/inf loss or gradient raises :class:`NonFiniteLossError` and saves nothing.
Weights are "good" only if a forward pass with them was finite: when the loss of step k+1 is NaN,
the weights after step k produced it, so the trainer keeps, in memory, a copy of the newest weights
whose forward pass was finite (one copy of the trainable tensors, refreshed every step), puts them
back into the parameters before raising, and sets aside (renames) the checkpoints newer than them.
The error carries a :class:`TrainResult` of that state (``error.result``) so a caller can still
hand the good adapter on; it names the cause it can see (non-finite inputs in the batch: bad data;
otherwise the learning rate or beta).

Averaging (``ema_decay > 0``): the trainer keeps an exponential moving average of the adapter's weights,
updated after every optimizer step with :func:`ema_decay_at` (a warm-up, so that a short run is not
pulled back to its starting adapter), checkpointed for an exact resume. When training ends (finished,
stopped, or a non-finite value) the parameters hold the average, and ``TrainResult.averaged`` says so;
checkpoints keep the raw weights (what a resume continues from) and the average beside them.

Disk errors while writing a checkpoint (a full disk, a file-size limit) do not stop training or
lose the adapter in memory: they are logged and listed in ``TrainResult.checkpoint_errors``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from . import io as pso_io
from .lora import LoRANetwork

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Registries and configuration
# --------------------------------------------------------------------------------------------

def _make_adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _make_adamw8bit(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except (ImportError, RuntimeError, OSError) as exc:
        raise ImportError(
            f"optimizer='adamw8bit' needs the bitsandbytes package, which could not be imported ({exc}). "
            "Install it into the Python that runs ComfyUI (python -m pip install bitsandbytes) or choose "
            "optimizer='adamw'.") from exc
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], float, float], torch.optim.Optimizer]] = {
    "adamw": _make_adamw,
    "adamw8bit": _make_adamw8bit,
}

# Autocast dtype of the forward pass (None: full precision).
MIXED_PRECISION: dict[str, torch.dtype | None] = {
    "no": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

PHASES = ("refresh", "step")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"TrainConfig.{name}={value!r} must be an integer >= {low}.")


def _check_float(name: str, value: Any, low: float, strict: bool, hint: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        bound = f"> {low}" if strict else f">= {low}"
        raise ValueError(f"TrainConfig.{name}={value!r} must be a finite number {bound} ({hint}).")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the optimisation loop.

    steps: optimizer steps in total (a resumed run counts the steps already done).
    lr: peak learning rate, reached after ``warmup_steps`` (linear warm-up, then constant).
    grad_accum: micro-batches averaged per optimizer step. max_grad_norm: clip the global gradient
    norm to this (0 = off). optimizer: key of :data:`OPTIMIZERS`. mixed_precision: key of
    :data:`MIXED_PRECISION` (fp16 needs CUDA). seed: of the trainer's generator.
    checkpoint_every: save every this many steps (0 = only on stop and at the end, if
    checkpoint_dir is set). keep_checkpoints: newest checkpoints kept (0 = all).
    ref_refresh_every: call ``refresh_fn`` before every this many steps (0 = never).
    ema_decay: > 0 keeps an exponential moving average of the adapter with this decay (horizon about
    1 / (1 - ema_decay) steps, shorter early in a run: :func:`ema_decay_at`) and ends the run with it
    in the parameters; 0 = off (the last step's weights).
    """

    steps: int = 1000
    lr: float = 1e-5
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 3
    ref_refresh_every: int = 0
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        _check_int("steps", self.steps, 1)
        _check_float("lr", self.lr, 0.0, True, "paper: 1e-5 offline/online, 5e-5 concept")
        _check_int("grad_accum", self.grad_accum, 1)
        _check_float("max_grad_norm", self.max_grad_norm, 0.0, False, "0 turns clipping off")
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_float("weight_decay", self.weight_decay, 0.0, False, "0 turns it off")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer={self.optimizer!r} is unknown; choose one of "
                             f"{sorted(OPTIMIZERS)}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"TrainConfig.mixed_precision={self.mixed_precision!r} is unknown; choose one "
                             f"of {sorted(MIXED_PRECISION)}.")
        _check_int("seed", self.seed, 0)
        if self.seed >= 2**63:
            raise ValueError(f"TrainConfig.seed={self.seed} must be < 2**63.")
        _check_int("checkpoint_every", self.checkpoint_every, 0)
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError(f"TrainConfig.checkpoint_every={self.checkpoint_every} needs a checkpoint_dir; "
                             "set one or use checkpoint_every=0.")
        _check_int("keep_checkpoints", self.keep_checkpoints, 0)
        _check_int("ref_refresh_every", self.ref_refresh_every, 0)
        _check_float("ema_decay", self.ema_decay, 0.0, False,
                     "0 turns averaging off; 0.99 averages about the last 100 steps")
        if self.ema_decay >= 1.0:
            raise ValueError(f"TrainConfig.ema_decay={self.ema_decay!r} must be < 1 (1 would never move the "
                             "average); use e.g. 0.99, or 0 to turn averaging off.")


# --------------------------------------------------------------------------------------------
# Events, results, errors
# --------------------------------------------------------------------------------------------

class StepOutput(Protocol):
    loss: torch.Tensor
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class TrainEvent:
    """Passed to the callback. step: optimizer steps completed; loss: mean loss of that step
    (None before a refresh); lr: the learning rate the step used; phase: one of :data:`PHASES`."""

    step: int
    total_steps: int
    loss: float | None
    metrics: Mapping[str, float]
    lr: float
    phase: str


@dataclass
class TrainResult:
    """loss_history[i] / metrics_history[i]: of optimizer step i + 1 (resumed runs include the
    restored history). interrupted: stopped early by :class:`StopTraining`."""

    loss_history: list[float]
    metrics_history: list[dict[str, float]]
    final_step: int
    interrupted: bool
    last_checkpoint: Path | None = None
    checkpoint_errors: list[str] = field(default_factory=list)
    stopped_reason: str | None = None  # why training ended before config.steps (a non-finite value)
    averaged: bool = False  # the parameters hold the moving average of the weights (ema_decay > 0)


class StopTraining(Exception):
    """Raise from the callback to stop after the current step and get a :class:`TrainResult`."""


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient norm was NaN or infinite at optimizer step :attr:`step` (1-based).

    good_step: the completed steps of the newest weights whose forward pass was finite; the trainer
    put those weights back into the parameters. result: a :class:`TrainResult` of that state.
    bad_inputs: fields of the batch that held non-finite values (the data is at fault, not the
    settings). last_checkpoint: the newest checkpoint kept on disk (none newer than good_step).
    """

    def __init__(self, step: int, total_steps: int, what: str, value: float, last_checkpoint: Path | None,
                 good_step: int = 0, bad_inputs: tuple[str, ...] = (), result: TrainResult | None = None,
                 resumed_at: int | None = None):
        self.step, self.what, self.value, self.last_checkpoint = step, what, value, last_checkpoint
        self.good_step, self.bad_inputs, self.result = good_step, tuple(bad_inputs), result
        if bad_inputs:
            cause = (f"the batch's {', '.join(bad_inputs)} held NaN or infinite values: the training data "
                     "is broken, not the settings. Rebuild the pairs (check the images, the VAE and the "
                     "reference sampling)")
        elif good_step == 0:
            cause = ("the model's forward pass before any update was already non-finite: check the model, "
                     "the pairs and beta (a very large beta overflows the loss)")
        else:
            cause = "the updates grew too large: lower the learning rate (or beta) and train again"
        kept = (f"the weights after step {good_step} (the newest whose forward pass was finite) are kept"
                if good_step else "nothing was trained")
        if resumed_at is not None:
            cause = (f"the run resumed at step {resumed_at}, and those weights already gave it, so the "
                     "checkpoint it resumed from is not a good state: resume from an older step_NNNNNN "
                     "checkpoint with a lower learning rate")
            kept = "nothing was trained in this run"
        where = f"; the newest checkpoint kept on disk is {last_checkpoint}" if last_checkpoint else ""
        super().__init__(
            f"non-finite {what} ({value}) at step {step} of {total_steps}; training stopped: {cause}. "
            f"{kept}{where}.")


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------

def warmup_factor(step: int, warmup_steps: int) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): ``(step + 1) / warmup_steps`` during
    warm-up (so no step runs at lr 0), then 1."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def ema_decay_at(updates: int, decay: float) -> float:
    """The decay of the moving average's update number ``updates + 1``: ``min(decay, (1 + n) / (10 + n))``.

    The warm-up (the form TensorFlow's ExponentialMovingAverage uses with ``num_updates``) keeps the
    average's horizon at about a tenth of the steps done until it reaches ``1 / (1 - decay)``: a run
    of 50 steps averages about its last 6, not its starting adapter."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def nonfinite_inputs(batch: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in ``batch`` (a tensor, a dataclass, a dict, a tuple or
    list, one level of nesting) that hold NaN or infinite values."""
    if isinstance(batch, torch.Tensor):
        bad = batch.is_floating_point() and not bool(torch.isfinite(batch).all())
        return [prefix or "input"] if bad else []
    if is_dataclass(batch) and not isinstance(batch, type):
        items = [(f.name, getattr(batch, f.name)) for f in fields(batch)]
    elif isinstance(batch, Mapping):
        items = list(batch.items())
    elif isinstance(batch, list | tuple):
        items = [(str(i), v) for i, v in enumerate(batch)]
    else:
        return []
    found = []
    for name, value in items:
        path = f"{prefix}.{name}" if prefix else str(name)
        nested = is_dataclass(value) or isinstance(value, Mapping | list | tuple)
        if isinstance(value, torch.Tensor) or (nested and prefix.count(".") < 1):
            found += nonfinite_inputs(value, path)
    return found


def _mean_loss(loss: Any) -> torch.Tensor:
    """Validate ``out.loss`` (B,) and return its float32 mean ()."""
    if not isinstance(loss, torch.Tensor) or loss.ndim != 1 or loss.numel() == 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"step_fn must return .loss as a (B,) tensor of per-sample losses; got {shape}.")
    if not loss.requires_grad:
        raise ValueError("step_fn's loss does not require grad: the trainable parameters are not in its "
                         "graph (is the adapter attached and enabled, and is grad mode on?).")
    return loss.float().mean()


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------

class Trainer:
    """Optimise ``params`` (a module such as a :class:`~pso.lora.LoRANetwork`, or an iterable of
    parameters) with ``step_fn`` on batches from ``batch_source``; see the module docstring."""

    def __init__(self, params: nn.Module | Iterable[nn.Parameter],
                 step_fn: Callable[[Any, torch.Generator], StepOutput],
                 batch_source: Callable[[int, torch.Generator], Any],
                 config: TrainConfig,
                 callback: Callable[[TrainEvent], None] | None = None,
                 refresh_fn: Callable[[int, torch.Generator], None] | None = None,
                 stateful: Mapping[str, Any] | None = None):
        self.config = config
        self.module = params if isinstance(params, nn.Module) else None
        candidates = list(params.parameters() if self.module is not None else params)
        self.params = [p for p in candidates if p.requires_grad]
        if not self.params:
            raise ValueError(f"nothing to train: none of the {len(candidates)} parameters requires grad.")
        self.device = self.params[0].device
        self.step_fn, self.batch_source = step_fn, batch_source
        self.callback, self.refresh_fn = callback, refresh_fn
        self.stateful = dict(stateful or {})
        for name, obj in self.stateful.items():
            if not all(callable(getattr(obj, m, None)) for m in ("state_dict", "load_state_dict")):
                raise TypeError(f"stateful[{name!r}] ({type(obj).__name__}) needs state_dict() and "
                                "load_state_dict() methods.")
        self._check_precision()
        self.generator = torch.Generator().manual_seed(config.seed)
        net = self.module
        if isinstance(net, LoRANetwork) and net.dropout > 0 and net.dropout_generator is None:
            net.dropout_generator = self.generator  # one generator drives all trainer randomness
        self.optimizer = OPTIMIZERS[config.optimizer](self.params, config.lr, config.weight_decay)
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: warmup_factor(s, warmup))
        self.scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None
        self.step = 0
        self.loss_history: list[float] = []
        self.metrics_history: list[dict[str, float]] = []
        self._gen_committed = self.generator.get_state()
        self._saved_step: int | None = None
        self._last_checkpoint: Path | None = None
        self._force_refresh = False
        # newest weights whose forward pass was finite: (completed steps, tensors, average); see _train_step
        self._good: tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor] | None] | None = None
        self.checkpoint_errors: list[str] = []
        # the moving average of the adapter (ema_decay > 0): float32 copies keyed as _adapter_tensors()
        self.ema: dict[str, torch.Tensor] | None = self._fresh_ema() if config.ema_decay else None

    # ---- setup -----------------------------------------------------------------------------
    def _check_precision(self) -> None:
        mp, dev = self.config.mixed_precision, self.device.type
        if mp == "fp16" and dev != "cuda":
            raise ValueError(f"mixed_precision='fp16' needs a CUDA device (it uses a GradScaler), but the "
                             f"trainable parameters are on {dev}; choose mixed_precision='bf16' or 'no'.")
        if mp == "bf16" and dev == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("mixed_precision='bf16' is not supported by this GPU; choose 'fp16' or 'no'.")
        if mp != "no" and not torch.amp.is_autocast_available(dev):
            raise ValueError(f"mixed_precision={mp!r}: autocast is not available on {dev}; choose 'no'.")

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = MIXED_PRECISION[self.config.mixed_precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    # ---- checkpoint state ------------------------------------------------------------------
    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        if self.module is not None:
            return dict(self.module.state_dict())
        return {f"param_{i:04d}": p for i, p in enumerate(self.params)}

    def _load_adapter(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if self.module is not None:
            try:
                self.module.load_state_dict(dict(tensors))
            except RuntimeError as exc:
                raise pso_io.CheckpointError(
                    f"the checkpoint's adapter does not fit this one: {exc}") from exc
            return
        expected = {f"param_{i:04d}": p for i, p in enumerate(self.params)}
        if set(expected) != set(tensors) or any(tensors[k].shape != p.shape for k, p in expected.items()):
            raise pso_io.CheckpointError(
                f"the checkpoint holds {len(tensors)} parameter tensors that do not match the "
                f"{len(expected)} trainable parameters given to the Trainer.")
        with torch.no_grad():
            for k, p in expected.items():
                p.copy_(tensors[k])

    def _fresh_ema(self) -> dict[str, torch.Tensor]:
        """An average that starts at the adapter's current weights."""
        return {k: t.detach().to(torch.float32 if t.is_floating_point() else t.dtype, copy=True)
                for k, t in self._adapter_tensors().items()}

    def _update_ema(self, updates: int) -> None:
        """Fold the current weights into the average (update ``updates + 1``, :func:`ema_decay_at`)."""
        assert self.ema is not None
        decay = ema_decay_at(updates, self.config.ema_decay)
        with torch.no_grad():
            for k, t in self._adapter_tensors().items():
                avg = self.ema[k]
                if avg.is_floating_point():
                    avg.mul_(decay).add_(t.detach().to(avg.dtype), alpha=1.0 - decay)

    def _clone_ema(self) -> dict[str, torch.Tensor] | None:
        return None if self.ema is None else {k: t.clone() for k, t in self.ema.items()}

    def _put_average(self) -> bool:
        """Put the moving average into the parameters (the run's result); False when averaging is off."""
        if self.ema is None:
            return False
        current = self._adapter_tensors()
        self._load_adapter({k: v.to(current[k].dtype) for k, v in self.ema.items()})
        return True

    def state_dict(self, generator_state: torch.Tensor | None = None) -> dict[str, Any]:
        """Everything but the adapter tensors that an exact resume needs (weights_only-loadable)."""
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "generator": (self._gen_committed if generator_state is None else generator_state).clone(),
            "loss_history": list(self.loss_history),
            "metrics_history": [dict(m) for m in self.metrics_history],
            "extra": {name: obj.state_dict() for name, obj in self.stateful.items()},
            "config": asdict(self.config),
            "ema": self._clone_ema(),
        }

    def save_checkpoint(self) -> Path:
        """Save the state after the last completed step to ``checkpoint_dir``; returns its folder."""
        cfg = self.config
        if not cfg.checkpoint_dir:
            raise ValueError("TrainConfig.checkpoint_dir is not set; nowhere to save a checkpoint.")
        last = self.loss_history[-1] if self.loss_history else None
        meta = {"kind": "pso-train", "total_steps": cfg.steps, "loss": last, "config": asdict(cfg)}
        path = pso_io.save_checkpoint(cfg.checkpoint_dir, self.step, self._adapter_tensors(),
                                      self.state_dict(), meta, keep=cfg.keep_checkpoints)
        self._saved_step, self._last_checkpoint = self.step, path
        return path

    def load_checkpoint(self, checkpoint: pso_io.Checkpoint | str | os.PathLike) -> None:
        """Restore adapter, optimizer, scheduler, scaler, generator, step, histories and stateful
        objects from a checkpoint (a :class:`~pso.io.Checkpoint`, its folder, or a folder of them)."""
        ckpt = checkpoint if isinstance(checkpoint, pso_io.Checkpoint) else pso_io.load_checkpoint(checkpoint)
        state = ckpt.state
        self._load_adapter(ckpt.adapter)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        self._gen_committed = self.generator.get_state()
        self.step = int(state["step"])
        self.loss_history = [float(v) for v in state["loss_history"]]
        self.metrics_history = [dict(m) for m in state["metrics_history"]]
        extra = state.get("extra", {})
        missing = sorted(set(self.stateful) - set(extra))
        if missing:
            raise pso_io.CheckpointError(f"checkpoint {ckpt.path} has no state for {missing}; it was written "
                                         "by a run without them and cannot be resumed exactly.")
        for name, obj in self.stateful.items():
            obj.load_state_dict(extra[name])
        self._load_ema(state.get("ema"), ckpt.path)
        if unused := sorted(set(extra) - set(self.stateful)):
            logger.warning("checkpoint %s holds state for %s, which this run does not use", ckpt.path, unused)
        changed = {k: (v, getattr(self.config, k)) for k, v in state.get("config", {}).items()
                   if hasattr(self.config, k) and getattr(self.config, k) != v}
        if changed:
            logger.info("resuming with changed settings (checkpoint, now): %s", changed)
        every = self.config.ref_refresh_every
        if self.refresh_fn is not None and every and self.step % every and not self.stateful:
            logger.warning("resuming at step %d between reference refreshes with no stateful reference pool: "
                           "references are re-sampled now, so the run will not repeat the uninterrupted "
                           "one exactly (pass stateful={...} to checkpoint them).", self.step)
            self._force_refresh = True
        same_dir = bool(self.config.checkpoint_dir) and \
            ckpt.path.parent.resolve() == Path(self.config.checkpoint_dir).resolve()
        self._saved_step = self.step if same_dir else None
        self._last_checkpoint = ckpt.path
        logger.info("resumed from %s at step %d", ckpt.path, self.step)

    def _load_ema(self, saved: Mapping[str, torch.Tensor] | None, path: Path) -> None:
        """The average of a resumed run: the checkpoint's, or (a checkpoint of a run without averaging)
        a new one starting at the resumed weights, which the log says."""
        if not self.config.ema_decay:
            if saved is not None:
                logger.info("checkpoint %s holds a moving average of the weights; this run does not average "
                            "(ema_decay 0) and continues from the raw weights", path)
            self.ema = None
            return
        if saved is None:
            logger.warning("checkpoint %s was written without a moving average; the average starts at the "
                           "resumed weights (step %d)", path, self.step)
            self.ema = self._fresh_ema()
            return
        fresh = self._fresh_ema()
        if set(saved) != set(fresh) or any(saved[k].shape != fresh[k].shape for k in fresh):
            raise pso_io.CheckpointError(f"checkpoint {path}: its moving average does not fit this adapter.")
        self.ema = {k: saved[k].to(fresh[k].dtype, copy=True) for k in fresh}

    def _set_aside_stale_checkpoints(self) -> None:
        """Checkpoints in checkpoint_dir newer than the current step belong to another run (or an
        abandoned branch of this one): refuse a fresh start over them, set them aside on resume."""
        cfg = self.config
        if not cfg.checkpoint_dir:
            return
        newer = [(s, p) for s, p in pso_io.list_checkpoints(cfg.checkpoint_dir) if s > self.step]
        if not newer:
            return
        if self.step == 0:
            raise pso_io.CheckpointError(
                f"checkpoint_dir {cfg.checkpoint_dir} already holds checkpoints of another run "
                f"({[p.name for _, p in newer][:5]}); resume from it or choose an empty folder.")
        for _, p in newer:
            aside = p.with_name(f".abandoned_{p.name}_{os.getpid()}")
            os.replace(p, aside)
            logger.warning("resuming at step %d: set the newer checkpoint %s aside as %s",
                           self.step, p, aside)

    # ---- the loop --------------------------------------------------------------------------
    def _emit(self, phase: str, loss: float | None, metrics: Mapping[str, float], lr: float) -> None:
        if self.callback is not None:
            self.callback(TrainEvent(self.step, self.config.steps, loss, dict(metrics), lr, phase))

    def _train_step(self) -> None:
        """One optimizer step; commits (params, histories, step, generator snapshot) only at the end."""
        cfg, s = self.config, self.step
        lr = float(self.optimizer.param_groups[0]["lr"])
        if self.refresh_fn is not None and cfg.ref_refresh_every and (s % cfg.ref_refresh_every == 0
                                                                       or self._force_refresh):
            self._emit("refresh", None, {}, lr)
            self.refresh_fn(s, self.generator)
            self._force_refresh = False
        self.optimizer.zero_grad(set_to_none=True)
        losses: list[float] = []
        sums: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            batch = self.batch_source(s, self.generator)
            with self._autocast():
                out = self.step_fn(batch, self.generator)
            loss = _mean_loss(out.loss)
            value = loss.item()
            if not math.isfinite(value):
                raise self._nonfinite("loss", value, nonfinite_inputs(batch))
            losses.append(value)
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            scaled = loss / cfg.grad_accum
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        # every forward pass of this step was finite: these weights (after s steps) are good
        weights = {k: t.detach().clone() for k, t in self._adapter_tensors().items()}
        self._good = (s, weights, self._clone_ema())
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(grad_norm):
            if self.scaler is None:
                raise self._nonfinite("gradient norm", grad_norm, [])
            logger.info("fp16 gradients overflowed at step %d; the GradScaler skips it", s + 1)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self._update_ema(s)
        # commit
        metrics = {k: v / cfg.grad_accum for k, v in sums.items()}
        metrics.update(grad_norm=grad_norm, lr=lr)
        self.loss_history.append(sum(losses) / len(losses))
        self.metrics_history.append(metrics)
        self.step = s + 1
        self._gen_committed = self.generator.get_state()
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            self._checkpoint_or_report()
        self._emit("step", self.loss_history[-1], metrics, lr)

    def _checkpoint_or_report(self) -> None:
        """Save a checkpoint; a disk error (full disk, file-size limit, permissions) is logged and
        recorded instead of stopping the run: the adapter in memory is the result, the checkpoint a
        convenience."""
        try:
            self.save_checkpoint()
        except OSError as exc:
            message = f"checkpoint after step {self.step} not written to {self.config.checkpoint_dir}: {exc}"
            logger.warning("%s; training goes on and its adapter is still returned", message)
            self.checkpoint_errors.append(message)

    def _newest_on_disk(self) -> Path | None:
        if not self.config.checkpoint_dir:
            return None
        return pso_io.latest_checkpoint(self.config.checkpoint_dir)

    def _nonfinite(self, what: str, value: float, bad_inputs: list[str]) -> NonFiniteLossError:
        """Put the newest good weights back, set newer checkpoints aside, and build the error."""
        s = self.step
        if bad_inputs:
            good_step = s  # the weights are not to blame: they stay as they are
        elif self._good is not None:
            good_step, tensors, average = self._good
            self._load_adapter(tensors)
            if average is not None:
                self.ema = average
        elif s > 0:  # resumed at step s, and the checkpoint's own weights gave the non-finite value
            return NonFiniteLossError(
                s + 1, self.config.steps, what, value, self._newest_on_disk(), 0, (),
                None, resumed_at=s)
        else:
            good_step = 0
        if good_step < s:
            self.loss_history = self.loss_history[:good_step]
            self.metrics_history = self.metrics_history[:good_step]
            self._set_aside_newer_than(good_step, "nonfinite")
        averaged = self._put_average()
        result = TrainResult(list(self.loss_history), [dict(m) for m in self.metrics_history], good_step,
                             True, self._newest_on_disk(), list(self.checkpoint_errors), averaged=averaged)
        error = NonFiniteLossError(s + 1, self.config.steps, what, value, result.last_checkpoint, good_step,
                                   tuple(bad_inputs), result)
        result.stopped_reason = str(error)
        self.step = good_step
        return error

    def _set_aside_newer_than(self, step: int, why: str) -> None:
        if not self.config.checkpoint_dir:
            return
        for s, p in pso_io.list_checkpoints(self.config.checkpoint_dir):
            if s > step:
                aside = p.with_name(f".{why}_{p.name}_{os.getpid()}")
                os.replace(p, aside)
                logger.warning("checkpoint %s holds weights whose forward pass was not finite; set aside "
                               "as %s", p, aside)

    def _save_after_stop(self) -> None:
        if not self.config.checkpoint_dir or self.step == 0 or self._saved_step == self.step:
            return
        try:
            path = self.save_checkpoint()
            logger.info("training stopped after step %d; saved %s", self.step, path)
        except OSError as exc:
            self.checkpoint_errors.append(f"checkpoint after step {self.step} not written: {exc}")
            logger.warning("could not save a checkpoint after training stopped at step %d: %s", self.step,
                           exc)
        except Exception:
            logger.exception("could not save a checkpoint after training stopped at step %d", self.step)

    def train(self, resume_from: pso_io.Checkpoint | str | os.PathLike | None = None) -> TrainResult:
        """Run until ``config.steps`` steps are completed (resuming first if asked).

        Raises NonFiniteLossError (nothing saved), or re-raises the exception that stopped the run
        after saving the last completed step; returns with ``interrupted=True`` on StopTraining.
        """
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        self._set_aside_stale_checkpoints()
        self._gen_committed = self.generator.get_state()
        flush = self.device.type == "cpu"
        if flush:
            # Saturated sigmoids drive Adam's states subnormal, and CPU arithmetic on subnormals made
            # training ~8x slower in our experiments. Set back to torch's default (off) at the end.
            torch.set_flush_denormal(True)
        interrupted = False
        try:
            while self.step < self.config.steps:
                self._train_step()
            if self.config.checkpoint_dir and self._saved_step != self.step:
                self._checkpoint_or_report()
        except NonFiniteLossError:
            raise
        except StopTraining:
            interrupted = True
            self._save_after_stop()
        except BaseException:
            self._save_after_stop()
            raise
        finally:
            self.generator.set_state(self._gen_committed)
            self.optimizer.zero_grad(set_to_none=True)
            if flush:
                torch.set_flush_denormal(False)
        averaged = self._put_average()  # after the last checkpoint, which keeps the raw weights
        return TrainResult(list(self.loss_history), [dict(m) for m in self.metrics_history], self.step,
                           interrupted, self._last_checkpoint, list(self.checkpoint_errors),
                           averaged=averaged)


__all__ = [
    "MIXED_PRECISION", "OPTIMIZERS", "PHASES", "NonFiniteLossError", "StepOutput", "StopTraining",
    "TrainConfig", "TrainEvent", "TrainResult", "Trainer", "ema_decay_at", "warmup_factor",
]
