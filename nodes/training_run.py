"""Everything the PSO Train node does between unpacking its inputs and returning its outputs that
touches the host: its settings and run facts are :mod:`pso.train_settings`, its run folder
:mod:`pso.runs`."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict

import torch

from ..pso import families, runs, trainer
from ..pso import lora as pso_lora
from ..pso.batches import PairBatchSource
from ..pso.dataset import LatentColumn
from ..pso.losses import LOSSES
from ..pso.references import ReferencePool
from ..pso.runs import outcome, to_pil
from ..pso.schedules import sub_schedule
from ..pso.train_settings import (
    LOSS_MAP_METRICS,
    TrainSettings,
    check_method_fits_pairs,
    check_resume,
    mixed_step_counts,
    run_record,
)
from . import host_training, monitor
from .host_sampling import host_noise_sampler
from .types import PairSet

logger = logging.getLogger(__name__)


def check_gradient_checkpointing(model, on: bool) -> None:
    """Refuse gradient checkpointing, before anything starts, for a family the table says it fails on."""
    config = type(model.model.model_config).__name__
    if on and not families.checkpointing_works(config):
        raise ValueError(f"gradient_checkpointing is not available for {config} models yet: torch refuses to "
                         "recompute the host's transformer blocks in backward (CheckpointError). Set "
                         "gradient_checkpointing to false (or train with a smaller batch_size / lora_rank)")


def checkpoint_predicate(path: str, module: torch.nn.Module) -> bool:
    """The diffusion model's top-level blocks, as the family table lists them (UNet input/output
    blocks and middle block, Flux double/single blocks, ...: pso.families.is_checkpoint_block)."""
    return families.is_checkpoint_block(path)


def preview_image(denoiser, pairs: PairSet, model_sampling, latent_out, vae, seed: int):
    """A sample of the first prompt with fixed noise, under the current model, as a PIL image."""
    return preview_sample(denoiser, tuple(pairs.target.shape[1:]), pairs.target.device, pairs.sigmas,
                          pairs.policy, model_sampling, latent_out, vae, seed)


def preview_sample(denoiser, shape: tuple[int, ...], device, sigmas: torch.Tensor, policy: str,
                   model_sampling, latent_out, vae, seed: int, prompt_index: int = 0):
    """One sample of prompt ``prompt_index`` (latent shape (C, H, W)) with fixed noise, under the
    current model, as a PIL image: :func:`pso.runs.preview_sample` with the host's step noise (its
    seeding differs between versions) and the VAE's decode."""
    return to_pil(runs.preview_sample(denoiser, shape, device, sigmas, policy, model_sampling,
                                      lambda z: vae.decode(latent_out(z)), seed,
                                      noise_sampler_factory=host_noise_sampler, prompt_index=prompt_index))


def run_training(model, pairs: PairSet, settings: TrainSettings, vae=None):
    """Train; return (MODEL with the LoRA, LORA_MODEL dict, LOSS_MAP, summary JSON string)."""
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    import folder_paths

    check_method_fits_pairs(settings, pairs)
    check_gradient_checkpointing(model, settings.gradient_checkpointing)
    ms = model.get_model_object("model_sampling")
    device = comfy.model_management.get_torch_device()
    spec = LOSSES[settings.method]
    needs_traj = spec.reference_path == "sampled"
    with torch.inference_mode(False), contextlib.ExitStack() as held:
        traj = None if pairs.reference_traj is None else pairs.reference_traj.detach()
        references = pairs.reference.clone()
        if isinstance(references, LatentColumn) and settings.reference_refresh_every:
            references = references.materialize()  # re-sampled references live in memory
        pool = ReferencePool(references, pairs.prompt_index.clone(), pairs.sigmas.clone(),
                             pairs.policy, ms, trajectory=traj)
        step_counts = mixed_step_counts(settings, pairs)
        if needs_traj and pool.trajectory is None:
            raise ValueError(f"method {settings.method!r} needs reference trajectories; these pairs have "
                             "none (loaded without them): sample references with PSO Sample References")
        resume, ckpt_dir, start_step = runs.open_run(
            held, folder_paths.get_output_directory(), settings.resume_from, "PSO Train",
            record=lambda: run_record(settings, pairs),
            check_resume=lambda run_dir, resume: check_resume(run_dir, resume, settings, pairs))
        cfg = settings.train_config(str(ckpt_dir))
        source = PairBatchSource(pool, pairs.target, settings.batch_size, settings.grad_accumulation,
                                 max_age=settings.reference_refresh_every, needs_traj=needs_traj,
                                 device=device,
                                 sub_schedules=[sub_schedule(pairs.sigmas, k) for k in step_counts])
        pbar = comfy.utils.ProgressBar(settings.steps)
        latent_out = model.model.process_latent_out
        live = monitor.TrainingMonitor.start(settings.steps, settings.method)  # the chart on the node

        def on_step(event: trainer.TrainEvent, denoiser) -> None:
            preview = None
            if vae is not None and runs.preview_due(event.step, settings.preview_every, settings.steps):
                with torch.no_grad():
                    image = preview_image(denoiser, pairs, ms, latent_out, vae, settings.seed)
                preview = ("JPEG", image, 512)
                live.preview(image, event.step)
            # the monitor's chart shows the preview; the host's own would overflow the node
            pbar.update_absolute(event.step, settings.steps, None if live.active else preview)

        def refresh(denoiser, step, generator):
            source.prepare(denoiser, step, generator)  # re-samples this step's references that are too old

        run = host_training.HostRun(
            method=settings.method_config(),
            train_config=cfg, sigmas=pairs.sigmas, batch_source=source,
            callback=host_training.node_callback(live, on_step),
            refresh_fn=refresh if settings.reference_refresh_every else None,
            # a pool that is never re-sampled is the pairs' own references: nothing to checkpoint
            stateful={"references": pool} if settings.reference_refresh_every else None,
            resume_from=None if resume is None else str(resume),
            setup=(lambda clone: pso_lora.enable_gradient_checkpointing(
                clone.get_model_object("diffusion_model"), checkpoint_predicate))
            if settings.gradient_checkpointing else None)
        lora, result = host_training.train_lora(model, pairs.conds, tuple(pairs.target.shape[1:]), run,
                                                settings.lora_config(), settings.seed, live)
    if result.stopped_reason:
        logger.warning("PSO Train: %s The outputs hold that state.", result.stopped_reason)
    trained = host_training.apply_lora(model, lora)  # bypass mode for quantized models
    loss_map = runs.metric_map(result, LOSS_MAP_METRICS)
    summary = {"method": settings.method, "beta": settings.beta, "settings": asdict(settings),
               **runs.result_fields(result), **runs.sampling_fields(pairs.policy, pairs.sigmas),
               "checkpoint": str(result.last_checkpoint or ckpt_dir), **outcome(result, start_step),
               "mixed_step_counts": step_counts,
               "target_sft_weight_used": settings.effective_target_sft_weight}
    return trained, lora, loss_map, json.dumps(summary, indent=1, default=str)
