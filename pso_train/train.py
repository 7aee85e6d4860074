"""Headless offline training on Hugging Face accelerate: the same losses and the same loop
(:class:`pso.trainer.Trainer`) as the ComfyUI nodes.

One optimizer step trains on ``global_batch`` pairs, ``grad_accum`` micro-steps of
``global_batch / grad_accum`` pairs split over the processes by data lane (:mod:`.data`). Each
process computes :func:`pso.methods.compute_method_loss` on its share with per-pair generators, so
the gradient, averaged by accelerate's DDP, equals a one-process run's with the same global batch.
The adapter is a :class:`pso.lora.LoRANetwork` attached through hooks, as on the ComfyUI side; the
frozen reference is the same UNet with it disabled, under no_grad.

Checkpoints are the Trainer's (the LoRANetwork's tensors, optimizer, scheduler, step, histories)
plus the run's identity (:class:`RunIdentity`: the settings and data that fix every step), written
once by process 0: the data position and all randomness follow from the step, so a run resumes on
any number of processes that divides ``data_lanes``. Checkpoints of the earlier loop (meta kind
``pso-headless``) and of the peft-based trainer resume too (:func:`upgrade_checkpoint`,
:func:`adapter_to_network`). A non-finite loss or gradient raises
:class:`pso.trainer.NonFiniteLossError` with the newest good weights restored, as in the nodes.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pso import io as pso_io
from pso import lora_format
from pso.dataset import DatasetFingerprint, PairDataset, PairDatasetError
from pso.headless import adapter as lora_adapter
from pso.headless.data import (
    LanePlan,
    MicroBatches,
    dataset_shards,
    derived_seed,
    pair_generators,
    to_batch,
)
from pso.lora import LoRANetwork, frozen_denoiser
from pso.losses import LOSSES
from pso.methods import MethodConfig, PairBatch, PairGenerators, compute_method_loss
from pso.schedules import few_step_sigmas
from pso.trainer import TrainConfig, Trainer, TrainEvent

from .config import HeadlessConfig, refuse_existing_checkpoints
from .model import DiffusersDenoiser, LoadedModel, load_model, require

logger = logging.getLogger(__name__)

#: meta kind of the checkpoints the earlier headless loop wrote (its own schema); they still resume.
LEGACY_KIND = "pso-headless"
#: Settings a resumed run must share with the checkpoint, or its data and noise would differ.
RESUME_FIXED = ("global_batch", "grad_accum", "data_lanes", "seed", "loss", "rank", "target")


@dataclass
class TrainSummary:
    steps: int
    loss_history: list[float]
    lora_file: Path | None
    checkpoint: Path | None
    world_size: int
    seconds: float


class Objective(nn.Module):
    """The per-pair loss of one micro-batch as one module call, so DDP sees one forward per backward.

    ``forward(batch, generators, encoded) -> (loss (B,), metrics tensor (K,))``. ``net`` is the LoRA
    attached to ``unet`` (registered here, so DDP all-reduces its gradients); the frozen reference is
    the same UNet with it disabled, under no_grad (:meth:`pso.lora.LoRANetwork.disabled`).
    """

    def __init__(self, unet: nn.Module, net: LoRANetwork, method: MethodConfig, sigmas: torch.Tensor,
                 schedule: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.net = net
        self.method = method
        self.schedule = schedule
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.metric_names: list[str] = []

    def forward(self, batch: PairBatch, generators: PairGenerators, encoded: dict[str, torch.Tensor]):
        model = DiffusersDenoiser(self.unet, self.schedule)
        model.encoded = encoded
        frozen = frozen_denoiser(model, self.net)
        out = compute_method_loss(self.method, batch, model, frozen, self.sigmas, self.schedule, generators)
        if not self.metric_names:
            self.metric_names = sorted(out.metrics)
        metrics = torch.tensor([float(out.metrics.get(k, math.nan)) for k in self.metric_names])
        return out.loss, metrics


def _pixel_size(fp: DatasetFingerprint) -> tuple[int, int]:
    return fp.latent_height * fp.vae_scale_factor, fp.latent_width * fp.vae_scale_factor


def _check_datasets(cfg: HeadlessConfig, datasets: list[PairDataset], loaded: LoadedModel) -> None:
    first = datasets[0].fingerprint
    in_channels = int(loaded.unet.config.in_channels)
    for ds in datasets:
        ds.check_loss(cfg.loss)
        fp = ds.fingerprint
        if fp.latent_channels != in_channels:
            raise PairDatasetError(f"dataset {ds.folder} holds {fp.latent_channels}-channel latents but the "
                                   f"UNet takes {in_channels}: build the pairs with this model.")
        if (fp.latent_channels, fp.latent_height, fp.latent_width) != (
                first.latent_channels, first.latent_height, first.latent_width):
            raise PairDatasetError(f"dataset {ds.folder} is {fp.describe()} but {datasets[0].folder} is "
                                   f"{first.describe()}: one run trains on one latent size.")
        if fp.model_family != loaded.family:
            logger.warning("dataset %s was built for model family %s; the model is %s", ds.folder,
                           fp.model_family, loaded.family)


def _sigmas(cfg: HeadlessConfig, datasets: list[PairDataset], loaded: LoadedModel) -> torch.Tensor:
    if cfg.timesteps is None:
        return torch.tensor(datasets[0].fingerprint.sigmas, dtype=torch.float32)
    return few_step_sigmas(loaded.schedule.cpu(), cfg.timesteps if isinstance(cfg.timesteps, str)
                           else list(cfg.timesteps)).float()


def _settings(cfg: HeadlessConfig, datasets: list[PairDataset], sigmas: torch.Tensor,
              world: int) -> dict[str, Any]:
    fp = datasets[0].fingerprint
    return {"method": cfg.loss, "beta": cfg.beta if cfg.beta is not None else LOSSES[cfg.loss].default_beta,
            "transitions": cfg.transitions, "steps": cfg.steps, "lr": cfg.lr, "rank": cfg.rank,
            "alpha": cfg.alpha if cfg.alpha is not None else cfg.rank, "target": cfg.target,
            "global_batch": cfg.global_batch, "grad_accum": cfg.grad_accum, "seed": cfg.seed,
            "optimizer": cfg.optimizer, "mixed_precision": cfg.mixed_precision, "processes": world,
            "sampler": fp.sampler, "sigmas": [round(float(s), 6) for s in sigmas.tolist()],
            "datasets": [Path(d).name for d in cfg.datasets], "trainer": "pso-train (headless, accelerate)"}


def data_identity(datasets: list[PairDataset]) -> list[str]:
    """Per dataset, a hash of its shards (names, rows, SHA-256) and item count: the same data wherever
    the folders are mounted."""
    out = []
    for ds in datasets:
        text = json.dumps([len(ds), [(s.file, s.rows, s.sha256) for s in ds.shards]])
        out.append(hashlib.sha256(text.encode("utf-8")).hexdigest())
    return out


class RunIdentity:
    """Trainer ``stateful`` entry: the settings and data a checkpoint was made with (they fix which
    pairs and which noise every step uses), checked on resume."""

    KIND = "pso-headless-offline"

    def __init__(self, cfg: HeadlessConfig, datasets: list[PairDataset]) -> None:
        now = cfg.to_dict()
        self.state = {"kind": self.KIND, "config": {k: now[k] for k in (*RESUME_FIXED, "datasets")},
                      "data_identity": data_identity(datasets)}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_resume(state, self.state, "the checkpoint")


def check_resume(saved: dict[str, Any], now: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint whose fixed settings (:data:`RESUME_FIXED`) or data differ from this run's."""
    if saved.get("kind") != RunIdentity.KIND:
        raise pso_io.CheckpointError(f"{where} is not an offline pso-train checkpoint (kind "
                                     f"{saved.get('kind')!r}); resume it with the command that wrote it.")
    old, cur = saved["config"], now["config"]
    changed = {k: (old.get(k), cur[k]) for k in RESUME_FIXED if old.get(k) != cur[k]}
    if saved.get("data_identity") != now["data_identity"]:
        changed["datasets"] = (old.get("datasets"), cur["datasets"])
    if changed:
        raise pso_io.CheckpointError(
            f"cannot resume from {where}: {changed} (checkpoint, config) differ, and they fix which "
            "pairs and which noise every step uses (datasets are compared by content). Keep them as they "
            "were, or start a new run.")


def upgrade_checkpoint(ckpt: pso_io.Checkpoint) -> pso_io.Checkpoint:
    """A checkpoint of the earlier headless loop (meta kind ``pso-headless``: its own schema, written
    before pso-train ran on :class:`pso.trainer.Trainer`) in the Trainer's schema, so it resumes exactly.

    That loop kept the adapter (peft names: :func:`adapter_to_network` converts them once the run's
    LoRA exists), the optimizer and scheduler states, the step and the loss history; its randomness
    came from the step alone, so the Trainer's generator (unused by this loop) starts from any state,
    and the missing per-step metrics are left empty."""
    old = ckpt.state
    state = {"step": int(old["step"]), "optimizer": old["optimizer"], "scheduler": old["scheduler"],
             "scaler": None, "generator": torch.Generator().get_state(),
             "loss_history": list(old["loss_history"]),
             "metrics_history": [{} for _ in old["loss_history"]],
             "extra": {"run": {"kind": RunIdentity.KIND, "config": dict(old["config"]),
                               "data_identity": old.get("data_identity")}}}
    meta = {**ckpt.meta, "upgraded_from": LEGACY_KIND}
    return pso_io.Checkpoint(ckpt.path, ckpt.step, ckpt.adapter, state, meta)


def adapter_to_network(ckpt: pso_io.Checkpoint, net: LoRANetwork, alpha: float) -> pso_io.Checkpoint:
    """``ckpt`` with its adapter as ``net.state_dict()``: checkpoints of the peft-based trainer (before
    issue 18: peft names, or the Trainer's ``param_NNNN``) get their tensors renamed; their optimizer
    state fits as it is (:class:`TrainedAdapter` keeps the optimizer's parameter order). A checkpoint
    of this trainer is returned as it is."""
    if set(ckpt.adapter) == set(net.state_dict()):
        return ckpt
    try:
        adapter = lora_adapter.adapter_from_peft(ckpt.adapter, net, alpha)
    except ValueError as exc:
        raise pso_io.CheckpointError(f"cannot resume from {ckpt.path}: {exc}") from exc
    logger.info("resuming %s: a checkpoint of the peft-based trainer, converted to pso.lora", ckpt.path)
    return pso_io.Checkpoint(ckpt.path, ckpt.step, adapter, ckpt.state, ckpt.meta)


class TrainedAdapter(nn.Module):
    """``net`` as the Trainer's ``params``: its state dict, and its parameters per module in module
    order (down, up), the order the peft-based trainer gave its optimizer. The same order gives the
    same gradient-norm sums (so a seed trains what it trained before, to the last digit) and lets the
    optimizer states of its checkpoints load unchanged."""

    def __init__(self, net: LoRANetwork) -> None:
        super().__init__()
        self.net = net

    def parameters(self, recurse: bool = True):  # type: ignore[override]
        for path in self.net.paths:
            yield self.net.lora_down(path)
            yield self.net.lora_up(path)

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)


def _resume_state(cfg: HeadlessConfig, checkpoint_dir: Path, identity: RunIdentity):
    if cfg.resume_from is None:
        refuse_existing_checkpoints(checkpoint_dir)
        return None
    ckpt = pso_io.load_checkpoint(cfg.resume_from)
    if ckpt.meta.get("kind") == LEGACY_KIND:
        ckpt = upgrade_checkpoint(ckpt)
    elif ckpt.meta.get("kind") != "pso-train" or "run" not in ckpt.state.get("extra", {}):
        raise pso_io.CheckpointError(f"{ckpt.path} is a {ckpt.meta.get('kind')!r} checkpoint, not one of "
                                     "offline pso-train.")
    check_resume(ckpt.state["extra"]["run"], identity.state, str(ckpt.path))  # before loading the model
    return ckpt


class _StepOut:
    def __init__(self, loss: torch.Tensor, metrics: dict[str, float]) -> None:
        self.loss, self.metrics = loss, metrics


def _tracker(accelerator, output_dir: Path) -> bool:
    """Log to TensorBoard through accelerate when tensorboard is installed."""
    if importlib.util.find_spec("tensorboard") is None:
        logger.info("tensorboard is not installed: logging to %s/losses.jsonl only", output_dir)
        return False
    accelerator.init_trackers("pso")
    return True


def train(cfg: HeadlessConfig) -> TrainSummary:
    """Run (or resume) one headless training run on :class:`pso.trainer.Trainer`; every process of an
    ``accelerate launch`` calls it.

    The Trainer runs the loop (gradient accumulation, clipping, warm-up, exact resume, non-finite
    recovery with :class:`pso.trainer.NonFiniteLossError`); this function supplies its hooks:

    - ``batch_source(step, _)``: this process's share of micro-batch ``micro`` of ``step``
      (:class:`.data.MicroBatches`: the data position follows from the step);
    - ``step_fn``: the per-pair losses of that share (:class:`Objective`, one DDP forward), with
      per-pair generators from ``(seed, step, micro, global position)``; the value it returns has the
      local mean's gradient (DDP averages it over processes: the global mean's gradient) and the
      all-reduced global mean's value, so the logged loss is the global batch's on every process.
    """
    accelerate = require("accelerate")
    from accelerate.utils import ProjectConfiguration

    started = time.monotonic()
    output_dir = Path(cfg.output_dir)
    use_tb = importlib.util.find_spec("tensorboard") is not None
    accelerator = accelerate.Accelerator(  # the Trainer runs its own autocast
        mixed_precision="no", log_with="tensorboard" if use_tb else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / "logs")))
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    device = accelerator.device
    per_process = cfg.per_process_batch(world)
    my_lanes = cfg.data_lanes // world
    checkpoint_dir = output_dir / "checkpoints"

    datasets = [PairDataset.open(p, max_cached_shards=my_lanes + 1) for p in cfg.datasets]
    identity = RunIdentity(cfg, datasets)
    ckpt = _resume_state(cfg, checkpoint_dir, identity)
    loaded = load_model(cfg, device, _pixel_size(datasets[0].fingerprint))
    _check_datasets(cfg, datasets, loaded)
    sigmas = _sigmas(cfg, datasets, loaded)
    method = MethodConfig(cfg.loss, beta=cfg.beta, transitions=cfg.transitions,
                          options=dict(cfg.loss_options))
    alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
    net = lora_adapter.add_lora(loaded.unet, cfg.rank, alpha, cfg.target, derived_seed(cfg.seed, "lora"))
    if ckpt is not None:
        ckpt = adapter_to_network(ckpt, net, alpha)
    if cfg.gradient_checkpointing:
        loaded.unet.enable_gradient_checkpointing()  # recompute activations in backward: less memory
    objective = accelerator.prepare(Objective(loaded.unet, net, method, sigmas, loaded.schedule).to(device))
    inner = accelerator.unwrap_model(objective)

    plan = LanePlan(dataset_shards(datasets), cfg.data_lanes, cfg.seed)
    batches = MicroBatches(datasets, plan, cfg.micro_batch, cfg.grad_accum, rank, world)
    where = {"step": -1, "micro": 0}

    def batch_source(step: int, _generator: torch.Generator):
        where["micro"] = where["micro"] + 1 if where["step"] == step else 0
        where["step"] = step
        items, positions = batches.get(step, where["micro"])
        return step, where["micro"], items, positions

    def step_fn(batch, _generator: torch.Generator) -> _StepOut:
        step, micro, items, positions = batch
        encoded = loaded.text.encode(list(items["prompts"]))
        gens = pair_generators(cfg.seed, step, micro, positions)
        # gradients are all-reduced in the last micro-step's backward only (DDP reads this at forward)
        sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else accelerator.no_sync(objective)
        with sync:
            per_pair, metrics = objective(to_batch(items, device), gens, encoded)
        local = per_pair.float().mean()
        total = accelerator.reduce(per_pair.detach().double().sum().to(device).reshape(1), reduction="sum")[0]
        value = (total / (per_process * world)).to(local.dtype)
        means = accelerator.reduce(metrics.to(device), reduction="mean")
        return _StepOut((local - local.detach() + value).reshape(1),
                        dict(zip(inner.metric_names, means.tolist(), strict=True)))

    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        logger.info("training %s on %d process(es): %d pairs per step (%d per process per micro-step, %d "
                    "micro-steps), %d lanes", cfg.loss, world, cfg.global_batch, per_process, cfg.grad_accum,
                    cfg.data_lanes)
    tracking = main and use_tb and _tracker(accelerator, output_dir)

    def on_event(event: TrainEvent) -> None:
        if not main or event.phase != "step":
            return
        if event.step % cfg.log_every == 0 or event.step == event.total_steps:
            record = {"step": event.step, "loss": event.loss, "lr": event.lr,
                      **{k: v for k, v in event.metrics.items() if k not in ("lr", "grad_norm")}}
            with open(output_dir / "losses.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if tracking:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=event.step)
            logger.info("step %d/%d loss %.6f", event.step, event.total_steps, event.loss)

    tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, grad_accum=cfg.grad_accum,
                       ema_decay=cfg.ema_decay, max_grad_norm=cfg.max_grad_norm,
                       warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, optimizer=cfg.optimizer,
                       mixed_precision=cfg.mixed_precision, seed=cfg.seed,
                       checkpoint_every=cfg.checkpoint_every if main else 0,
                       checkpoint_dir=str(checkpoint_dir) if main else None,
                       keep_checkpoints=cfg.keep_checkpoints)
    trainer = Trainer(TrainedAdapter(net), step_fn, batch_source, tcfg, callback=on_event,
                      stateful={"run": identity})
    if ckpt is not None and main:
        logger.info("resuming %s at step %d on %d process(es)", ckpt.path, ckpt.step, world)
    result = trainer.train(resume_from=ckpt)
    accelerator.wait_for_everyone()
    lora_file = None
    if main:
        lora_file = lora_format.save_lora_file(
            net.lora_state_dict(), output_dir, cfg.name, family=loaded.family, prediction=loaded.prediction,
            latent_channels=int(loaded.unet.config.in_channels), ldm_shapes=loaded.ldm_shapes,
            settings=_settings(cfg, datasets, sigmas, world), unet_config=dict(loaded.unet.config))
        logger.info("saved %s", lora_file)
    if tracking:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return TrainSummary(result.final_step, list(result.loss_history), lora_file, result.last_checkpoint,
                        world, time.monotonic() - started)
