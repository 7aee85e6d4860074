"""Everything the PSO Online Train node does between unpacking its inputs and returning its outputs
that touches the host (its settings and run facts are :mod:`pso.online_settings`, its run folder
:mod:`pso.runs`).

Online PSO (Eq. 7, Algorithm 2) runs inside the host exactly as PSO Train does
(:func:`nodes.host_training.train_on_host`): the trainer's refresh hook collects each round from the
*current* model (LoRA on) with the host's own x0 predictions (``HostDenoiser``), the round logic of
:mod:`pso.online` labels the pairs with the user's PSO_REWARD, and the step function scores both
sampled trajectories under the current and the frozen model.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict

import torch

from ..pso import online, runs, trainer
from ..pso.losses import LOSSES
from ..pso.online_settings import (
    LOSS_MAP_METRICS,
    OnlineSettings,
    check_resume,
    check_reward,
    parse_prompts,
    reward_scores,
    run_record,
)
from ..pso.samplers import POLICIES
from ..pso.schedules import check_sigmas
from ..pso.train_settings import TRAIN_METHODS
from . import host_sampling, host_training, monitor, pairing, training_run

logger = logging.getLogger(__name__)


def check_sampler(sampler, model_sampling) -> str:
    """The stochastic policy of the user's SAMPLER; Eq. 7 refuses deterministic ones by name."""
    policy = host_sampling.policy_for_sampler(sampler, model_sampling)
    if not POLICIES[policy].stochastic:
        usable = [m for m in TRAIN_METHODS if not LOSSES[m].needs_gaussian_policy]
        raise ValueError(
            f"PSO Online Train: sampler policy {policy!r} is deterministic (plain euler, as Lightning / "
            f"Hyper-SD "
            "/ schnell are run): it has no Gaussian step policy, so online PSO (Eq. 7), which scores each "
            "sampled step's log-probability, cannot train on it. Choose a stochastic sampler in "
            "KSamplerSelect "
            f"(lcm for DMD2 / LCM, euler_ancestral for Turbo), or train offline with PSO Train using one of "
            f"{usable} (e.g. PSO Preference Pairs + pso_offline).")
    return policy


def run_online_training(model, clip, prompts_text: str, vae, reward, sampler, sigmas: torch.Tensor,
                        latent: dict, settings: OnlineSettings):
    """Train; return (MODEL with the LoRA, LORA_MODEL, LOSS_MAP, reward LOSS_MAP, summary JSON)."""
    import comfy.model_management
    import comfy.sample
    import comfy.sd
    import comfy.utils
    import folder_paths

    prompts = parse_prompts(prompts_text)
    reward_name = check_reward(reward)
    ms = model.get_model_object("model_sampling")
    policy = check_sampler(sampler, ms)
    check_sigmas(sigmas, min_steps=2, what="PSO Online Train: SIGMAS")
    cfg_online = settings.online_config()
    conds = [pairing.encode_prompt(clip, p) for p in prompts]
    device = comfy.model_management.get_torch_device()
    with torch.inference_mode(False), contextlib.ExitStack() as held:
        sigmas = sigmas.detach().float().cpu().clone()
        start = comfy.sample.fix_empty_latent_channels(model, latent["samples"][:1]).float().clone()
        start = model.model.process_latent_in(start)  # inner latent space, as the sampler starts from it
        shape = tuple(start.shape[1:])
        record = run_record(settings, prompts, reward_name, policy, sigmas, shape)
        resume, ckpt_dir, start_step = runs.open_run(
            held, folder_paths.get_output_directory(), settings.resume_from, "PSO Online Train",
            record=lambda: record,
            check_resume=lambda run_dir, resume: check_resume(run_dir, resume, settings, record))
        cfg = settings.train_config(str(ckpt_dir))
        total = cfg_online.progress_total(len(prompts))
        pbar = comfy.utils.ProgressBar(total)
        latent_out = model.model.process_latent_out
        shown: dict = {}
        live = monitor.TrainingMonitor.start(cfg.steps, settings.method)  # the chart on the node

        def sample_fn(denoiser, prompt, seed, count):
            return online.sample_prompt(denoiser, torch.full((count,), prompt, dtype=torch.long), seed,
                                        count, start.to(device), sigmas, ms, policy,
                                        noise_sampler_factory=host_sampling.host_noise_sampler)

        def score_fn(traj, prompt, round_index, slot):
            with torch.no_grad():
                images = vae.decode(latent_out(traj.final.to(device)))[..., :3]
            if slot == 0:
                shown["image"] = images
            return reward_scores(reward, images, [prompts[prompt]] * images.shape[0])

        def on_prompt(round_index, slot):
            comfy.model_management.throw_exception_if_processing_interrupted()
            preview = None
            if settings.preview_every and slot == 0 and "image" in shown:
                preview = ("JPEG", runs.to_pil(shown.pop("image")), 512)
                live.preview(preview[1], min(round_index, cfg_online.rounds) * cfg_online.steps_per_round)
            # the monitor's chart shows the preview; the host's own would overflow the node
            pbar.update_absolute(cfg_online.progress_after_prompt(len(prompts), round_index, slot), total,
                                 None if live.active else preview)

        rounds = online.OnlineRounds(cfg_online, len(prompts), settings.seed, sample_fn, score_fn, device,
                                     on_prompt)

        def on_step(event: trainer.TrainEvent, denoiser) -> None:
            preview = None
            if runs.preview_due(event.step, settings.preview_every, cfg.steps):
                image = training_run.preview_sample(denoiser, shape, device, sigmas, policy, ms, latent_out,
                                                    vae, settings.seed)
                preview = ("JPEG", image, 512)
                live.preview(image, event.step)
            pbar.update_absolute(cfg_online.progress_after_step(len(prompts), event.step), total,
                                 None if live.active else preview)
            if event.step == cfg.steps:  # the reward of the trained model, on the next round's prompts
                rounds.evaluate(denoiser, cfg_online.rounds)

        def refresh(denoiser, step, generator):
            with torch.no_grad():
                rounds.refresh(denoiser, step, generator)

        run = host_training.HostRun(
            method=settings.method_config(),
            train_config=cfg, sigmas=sigmas, batch_source=rounds,
            callback=host_training.node_callback(live, on_step), refresh_fn=refresh,
            stateful={"online": rounds}, resume_from=None if resume is None else str(resume))
        lora, result = host_training.train_lora(model, conds, shape, run, settings.lora_config(),
                                                settings.seed, live)
    trained = host_training.apply_lora(model, lora)  # bypass mode for quantized models
    loss_map = runs.metric_map(result, LOSS_MAP_METRICS)
    history = rounds.history
    summary = {"method": settings.method, "beta": settings.beta, "reward": reward_name,
               "settings": asdict(settings), "prompts": len(prompts), **runs.result_fields(result),
               "reward_history": history, "reward_table": online.history_table(history),
               **runs.sampling_fields(policy, sigmas),
               "checkpoint": str(result.last_checkpoint or ckpt_dir), "run": ckpt_dir.name,
               **runs.outcome(result, start_step)}
    return trained, lora, loss_map, online.reward_map(history), json.dumps(summary, indent=1, default=str)
