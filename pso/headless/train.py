"""The headless training loop on Hugging Face accelerate: the same losses as the ComfyUI nodes.

One optimizer step trains on ``global_batch`` pairs, ``grad_accum`` micro-steps of
``global_batch / grad_accum`` pairs split over the processes by data lane (:mod:`.data`). Each
process computes :func:`pso.methods.compute_method_loss` on its share with per-pair generators, so
the gradient, averaged by accelerate's DDP, equals a one-process run's with the same global batch.
The frozen reference is the same UNet with the peft adapter disabled, under no_grad.

Checkpoints hold the adapter, the optimizer and scheduler state, the step and the loss history,
written once by process 0: the data position and all randomness follow from the step, so a run
resumes on any number of processes that divides ``data_lanes``.
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

from .. import io as pso_io
from ..dataset import DatasetFingerprint, PairDataset, PairDatasetError
from ..losses import LOSSES
from ..methods import MethodConfig, PairBatch, PairGenerators, compute_method_loss
from ..schedules import few_step_sigmas
from ..trainer import OPTIMIZERS, warmup_factor
from . import lora_io
from .config import HeadlessConfig, refuse_existing_checkpoints
from .data import (
    LanePlan,
    MicroBatches,
    MicroBatchStream,
    dataset_shards,
    derived_seed,
    pair_generators,
    to_batch,
)
from .model import DiffusersDenoiser, LoadedModel, load_model, require

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "pso-headless"
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

    ``forward(batch, generators, encoded) -> (loss (B,), metrics tensor (K,))``.
    """

    def __init__(self, unet: nn.Module, method: MethodConfig, sigmas: torch.Tensor,
                 schedule: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.method = method
        self.schedule = schedule
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.metric_names: list[str] = []

    def forward(self, batch: PairBatch, generators: PairGenerators, encoded: dict[str, torch.Tensor]):
        model = DiffusersDenoiser(self.unet, self.schedule)
        model.encoded = encoded

        def frozen(x, sigma, cond):
            self.unet.disable_adapters()
            try:
                with torch.no_grad():
                    return model(x, sigma, cond)
            finally:
                self.unet.enable_adapters()

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


def _check_resume(ckpt, cfg: HeadlessConfig, datasets: list[PairDataset]) -> None:
    saved = ckpt.state["config"]
    now = cfg.to_dict()
    changed = {k: (saved.get(k), now[k]) for k in RESUME_FIXED if saved.get(k) != now[k]}
    if ckpt.state.get("data_identity") != data_identity(datasets):
        changed["datasets"] = (saved.get("datasets"), now["datasets"])
    if changed:
        raise pso_io.CheckpointError(
            f"cannot resume from {ckpt.path}: {changed} (checkpoint, config) differ, and they fix which "
            "pairs and which noise every step uses (datasets are compared by content). Keep them as they "
            "were, or start a new run.")


def _resume_state(cfg: HeadlessConfig, checkpoint_dir: Path):
    if cfg.resume_from is None:
        refuse_existing_checkpoints(checkpoint_dir)
        return None
    ckpt = pso_io.load_checkpoint(cfg.resume_from)
    if ckpt.meta.get("kind") != CHECKPOINT_KIND:
        raise pso_io.CheckpointError(f"{ckpt.path} is a {ckpt.meta.get('kind')!r} checkpoint, not one of "
                                     f"pso-train ({CHECKPOINT_KIND!r}).")
    return ckpt


def _tracker(accelerator, output_dir: Path) -> bool:
    """Log to TensorBoard through accelerate when tensorboard is installed."""
    if importlib.util.find_spec("tensorboard") is None:
        logger.info("tensorboard is not installed: logging to %s/losses.jsonl only", output_dir)
        return False
    accelerator.init_trackers("pso")
    return True


def train(cfg: HeadlessConfig) -> TrainSummary:
    """Run (or resume) one headless training run; every process of an ``accelerate launch`` calls it."""
    accelerate = require("accelerate")
    from accelerate.utils import ProjectConfiguration

    started = time.monotonic()
    output_dir = Path(cfg.output_dir)
    use_tb = importlib.util.find_spec("tensorboard") is not None
    accelerator = accelerate.Accelerator(
        mixed_precision=cfg.mixed_precision, log_with="tensorboard" if use_tb else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / "logs")))
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = cfg.per_process_batch(world)
    my_lanes = cfg.data_lanes // world
    checkpoint_dir = output_dir / "checkpoints"
    ckpt = _resume_state(cfg, checkpoint_dir)

    datasets = [PairDataset.open(p, max_cached_shards=my_lanes + 1) for p in cfg.datasets]
    if ckpt is not None:
        _check_resume(ckpt, cfg, datasets)
    loaded = load_model(cfg, accelerator.device, _pixel_size(datasets[0].fingerprint))
    _check_datasets(cfg, datasets, loaded)
    sigmas = _sigmas(cfg, datasets, loaded)
    method = MethodConfig(cfg.loss, beta=cfg.beta, transitions=cfg.transitions,
                          options=dict(cfg.loss_options))
    params = lora_io.add_lora(loaded.unet, cfg.rank, cfg.alpha, cfg.target, derived_seed(cfg.seed, "lora"))
    if cfg.gradient_checkpointing:
        loaded.unet.enable_gradient_checkpointing()  # recompute activations in backward: less memory
    objective = Objective(loaded.unet, method, sigmas, loaded.schedule).to(accelerator.device)
    optimizer = OPTIMIZERS[cfg.optimizer](params, cfg.lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_factor(s, cfg.warmup_steps))
    history: list[float] = []
    start = 0
    if ckpt is not None:
        lora_io.load_adapter_state(loaded.unet, ckpt.adapter)
        optimizer.load_state_dict(ckpt.state["optimizer"])
        scheduler.load_state_dict(ckpt.state["scheduler"])
        history = [float(v) for v in ckpt.state["loss_history"]]
        start = int(ckpt.state["step"])
        if accelerator.is_main_process:
            logger.info("resuming %s at step %d on %d process(es)", ckpt.path, start, world)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    inner = accelerator.unwrap_model(objective)

    plan = LanePlan(dataset_shards(datasets), cfg.data_lanes, cfg.seed)
    batches = MicroBatches(datasets, plan, cfg.micro_batch, cfg.grad_accum, rank, world)
    stream = torch.utils.data.DataLoader(MicroBatchStream(batches, start, cfg.steps), batch_size=None)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        logger.info("training %s on %d process(es): %d pairs per step (%d per process per micro-step, %d "
                    "micro-steps), %d lanes", cfg.loss, world, cfg.global_batch, per_process, cfg.grad_accum,
                    cfg.data_lanes)
    tracking = accelerator.is_main_process and use_tb and _tracker(accelerator, output_dir)
    settings = _settings(cfg, datasets, sigmas, world)
    last_ckpt: Path | None = None

    def save_checkpoint(step: int) -> Path | None:
        path = None
        if accelerator.is_main_process:
            state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "loss_history": list(history), "config": cfg.to_dict(), "world_size": world,
                     "data_identity": data_identity(datasets)}
            path = pso_io.save_checkpoint(checkpoint_dir, step, lora_io.adapter_state(inner.unet), state,
                                          {"kind": CHECKPOINT_KIND, "total_steps": cfg.steps,
                                           "loss": history[-1] if history else None},
                                          keep=cfg.keep_checkpoints)
        accelerator.wait_for_everyone()
        return path

    loss_sum = torch.zeros((), dtype=torch.float64)
    metric_sum: torch.Tensor | None = None
    for step, micro, items, positions in stream:
        if micro == 0:
            optimizer.zero_grad(set_to_none=True)
            loss_sum.zero_()
            metric_sum = None
        batch = to_batch(items, accelerator.device)
        encoded = loaded.text.encode(list(items["prompts"]))
        gens = pair_generators(cfg.seed, step, micro, positions)
        last = micro == cfg.grad_accum - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(objective)
        with sync:
            with accelerator.autocast():
                per_pair, metrics = objective(batch, gens, encoded)
            loss = per_pair.float().mean() / cfg.grad_accum
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {step + 1}; lower lr or "
                                         "beta. The last checkpoint on disk is the last good state.")
            accelerator.backward(loss)
        loss_sum += per_pair.detach().double().sum().cpu()
        metric_sum = metrics if metric_sum is None else metric_sum + metrics
        if not last:
            continue
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        total = accelerator.reduce(loss_sum.to(accelerator.device), reduction="sum")
        history.append(float(total) / cfg.global_batch)
        done = step + 1
        means = accelerator.reduce(metric_sum.to(accelerator.device) / cfg.grad_accum, reduction="mean")
        if accelerator.is_main_process and (done % cfg.log_every == 0 or done == cfg.steps):
            record = {"step": done, "loss": history[-1], "lr": scheduler.get_last_lr()[0],
                      **{k: float(v) for k, v in zip(inner.metric_names, means.tolist(), strict=True)}}
            with open(output_dir / "losses.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if tracking:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=done)
            logger.info("step %d/%d loss %.6f", done, cfg.steps, history[-1])
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            last_ckpt = save_checkpoint(done) or last_ckpt

    done = max(start, cfg.steps)
    last_ckpt = save_checkpoint(done) or last_ckpt
    lora_file = None
    if accelerator.is_main_process:
        lora_file = lora_io.save_lora_file(
            lora_io.adapter_state(inner.unet), float(cfg.alpha if cfg.alpha is not None else cfg.rank),
            output_dir, cfg.name, family=loaded.family, prediction=loaded.prediction,
            latent_channels=int(loaded.unet.config.in_channels), ldm_shapes=loaded.ldm_shapes,
            settings=settings, unet_config=dict(loaded.unet.config))
        logger.info("saved %s", lora_file)
    if tracking:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return TrainSummary(done, history, lora_file, last_ckpt, world, time.monotonic() - started)
