"""Online PSO headless (Eq. 7, Algorithm 2; Appendix B.1's rounds) on :class:`pso.trainer.Trainer`.

The core loop is the trainer the ComfyUI nodes use (exact resume, non-finite recovery, checkpoints);
this module supplies its three hooks for a diffusers UNet under accelerate:

- ``refresh_fn`` (before steps 0, S, 2S, ...): :class:`pso.online.OnlineRounds` samples round
  ``r = step // S`` from the *current* model, each process the prompt slots ``rank, rank + W, ...``
  (slot i with its own noise seed ``seed + r * P + i``, so it is the same sample on any process),
  decodes them with the VAE, scores them with a :mod:`pso.rewards` kind, and all processes gather the
  whole round; best vs worst of each prompt become the pairs (ties within ``tie_margin`` skipped).
- ``batch_source``: the round's pairs, ``global_batch`` a step, in one order drawn from the trainer's
  generator (identical on every process).
- ``step_fn``: process r takes positions ``r, r + W, ...`` of the global batch; its loss is scaled by
  ``W / b`` so that DDP's gradient average is the gradient of the global mean over the b pairs, and
  the value the trainer logs is the all-reduced global mean. Per-pair randomness comes from
  ``(seed, step, position)``, so W processes train what one process trains.

Checkpoints are written by process 0 and hold, besides the trainer's state, the round position, the
reward history and (only when taken inside a round) the round's pairs; every process resumes from
the same folder. Logs: ``losses.jsonl`` per step and ``rewards.jsonl`` per round (plus the final
evaluation of the trained model on the next round's prompts and seeds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from pso import io as pso_io
from pso import lora_format
from pso.eval_protocol import read_prompts
from pso.headless import adapter as lora_adapter
from pso.headless.data import derived_seed, pair_generators
from pso.methods import MethodConfig, PairBatch
from pso.online import OnlineConfig, OnlineRounds, history_table, sample_prompt
from pso.rewards import REWARD_KINDS, load_reward
from pso.schedules import few_step_sigmas
from pso.trainer import TrainConfig, Trainer, TrainEvent

from .config import HeadlessConfig, refuse_existing_checkpoints
from .evaluate import decode, load_vae
from .model import DiffusersDenoiser, load_model, require
from .train import Objective, TrainedAdapter, TrainSummary, adapter_to_network

logger = logging.getLogger(__name__)

#: Settings a resumed online run must share with its checkpoint: they fix the prompts, noise, pairs
#: and batches of every round.
ONLINE_FIXED = ("global_batch", "seed", "loss", "rank", "alpha", "target", "prompts_per_round",
                "samples_per_prompt", "steps_per_round", "tie_margin", "sampler", "timesteps", "resolution",
                "reward", "prompt_limit")


class _StepOut:
    def __init__(self, loss: torch.Tensor, metrics: dict[str, float]) -> None:
        self.loss, self.metrics = loss, metrics


class RunIdentity:
    """Trainer ``stateful`` entry: the settings and prompt list a checkpoint was made with."""

    def __init__(self, cfg: HeadlessConfig, prompts: list[str]) -> None:
        self.state = {"config": {k: cfg.to_dict()[k] for k in ONLINE_FIXED},
                      "prompts_sha256": hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest(),
                      "kind": "pso-headless-online"}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_resume(state, self.state, "")


def check_resume(saved: dict[str, Any], now: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint whose fixed settings or prompt list differ from this run's."""
    if saved.get("kind") != "pso-headless-online":
        raise pso_io.CheckpointError(f"{where or 'the checkpoint'} is not an online pso-train checkpoint")
    old = saved["config"]
    changed = {k: (old.get(k), v) for k, v in now["config"].items() if old.get(k) != v}
    if saved.get("prompts_sha256") != now["prompts_sha256"]:
        changed["prompts"] = ("another list", "this list")
    if changed:
        raise pso_io.CheckpointError(
            f"cannot resume from {where or 'the checkpoint'}: {changed} (checkpoint, config) differ, and "
            "they fix every round's prompts, noise, pairs and batches. Keep them as they were, or start a "
            "new run.")


def _resume(cfg: HeadlessConfig, checkpoint_dir: Path, identity: RunIdentity) -> pso_io.Checkpoint | None:
    if cfg.resume_from is None:
        refuse_existing_checkpoints(checkpoint_dir)
        return None
    ckpt = pso_io.load_checkpoint(cfg.resume_from)
    run = ckpt.state.get("extra", {}).get("run")
    if run is None:
        raise pso_io.CheckpointError(f"{ckpt.path} is not an online pso-train checkpoint (no run identity)")
    check_resume(run, identity.state, str(ckpt.path))
    return ckpt


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def train_online(cfg: HeadlessConfig) -> TrainSummary:
    """Run (or resume) an online-PSO run; every process of an ``accelerate launch`` calls it."""
    accelerate = require("accelerate")
    from accelerate.utils import gather_object

    started = time.monotonic()
    accelerator = accelerate.Accelerator(mixed_precision="no")  # the Trainer runs its own autocast
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    device = accelerator.device
    output_dir = Path(cfg.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    prompts = read_prompts(cfg.prompts, cfg.prompt_limit)
    identity = RunIdentity(cfg, prompts)
    ckpt = _resume(cfg, checkpoint_dir, identity)

    size = (cfg.resolution, cfg.resolution)
    loaded = load_model(cfg, device, size)
    vae = load_vae(cfg, None, device)
    tok = cfg.reward_tokenizer
    reward = load_reward(cfg.reward, cfg.reward_model, cfg.reward_head, device=device,
                         tokenizer=tok if cfg.reward == "image_reward" else None,
                         tokenizer_fallback=None if cfg.reward == "image_reward" else tok)
    ms = loaded.schedule
    sigmas = few_step_sigmas(ms.cpu(), cfg.timesteps if isinstance(cfg.timesteps, str)
                             else list(cfg.timesteps)).float()
    ms.to(device)
    alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
    net = lora_adapter.add_lora(loaded.unet, cfg.rank, alpha, cfg.target, derived_seed(cfg.seed, "lora"))
    if ckpt is not None:
        ckpt = adapter_to_network(ckpt, net, alpha)
    if cfg.gradient_checkpointing:
        loaded.unet.enable_gradient_checkpointing()
    method = MethodConfig(cfg.loss, beta=cfg.beta, transitions=cfg.transitions,
                          options=dict(cfg.loss_options), first_step_weight=cfg.first_step_weight)
    objective = accelerator.prepare(Objective(loaded.unet, net, method, sigmas.to(device), ms).to(device))
    inner = accelerator.unwrap_model(objective)
    denoiser = DiffusersDenoiser(loaded.unet, ms)
    latent = torch.zeros((1, int(loaded.unet.config.in_channels), size[0] // 8, size[1] // 8), device=device)

    def sample_fn(den, prompt: int, seed: int, count: int):
        den.encoded = loaded.text.encode([prompts[prompt]])
        return sample_prompt(den, torch.zeros(count, dtype=torch.long, device=device), seed, count, latent,
                             sigmas, ms, cfg.sampler)

    def score_fn(traj, prompt: int, round_index: int, slot: int) -> torch.Tensor:
        images = decode(vae, traj.final.to(device))
        return reward.score(images, [prompts[prompt]] * images.shape[0])

    rounds_total = math.ceil(cfg.steps / cfg.steps_per_round)
    online_cfg = OnlineConfig(rounds=rounds_total, prompts_per_round=cfg.prompts_per_round,
                              samples_per_prompt=cfg.samples_per_prompt, steps_per_round=cfg.steps_per_round,
                              batch_size=cfg.global_batch, tie_margin=float(cfg.tie_margin))
    rounds = OnlineRounds(online_cfg, len(prompts), cfg.seed, sample_fn, score_fn, "cpu", shard=(rank, world),
                          gather=gather_object if world > 1 else None)

    def refresh(step: int, generator: torch.Generator) -> None:
        with torch.no_grad():
            rounds.refresh(denoiser, step, generator)
        if main:
            output_dir.mkdir(parents=True, exist_ok=True)
            _append_jsonl(output_dir / "rewards.jsonl", rounds.history[-1])

    def step_fn(batch: PairBatch, generator: torch.Generator) -> _StepOut:
        b = int(batch.cond.numel())
        if b < world:
            raise ValueError(f"round {rounds.round_index} kept {b} pair(s), fewer than the {world} "
                             "processes; raise prompts_per_round or samples_per_prompt, or lower tie_margin")
        mine = list(range(rank, b, world))
        local = PairBatch(target_traj=batch.target_traj.select(mine).to(device),
                          reference_traj=batch.reference_traj.select(mine).to(device),
                          cond=torch.arange(len(mine), device=device))
        encoded = loaded.text.encode([prompts[int(batch.cond[i])] for i in mine])
        gens = pair_generators(cfg.seed, rounds.last_step, 0, mine)
        per_pair, metrics = objective(local, gens, encoded)
        local_sum = per_pair.float().sum()
        total = accelerator.reduce(local_sum.detach().reshape(1), reduction="sum")[0]
        scaled = local_sum * (world / b)          # DDP averages over processes: the global mean's gradient
        loss = scaled - scaled.detach() + total / b
        means = accelerator.reduce(metrics.to(device), reduction="mean")
        return _StepOut(loss.reshape(1), dict(zip(inner.metric_names, means.tolist(), strict=True)))

    def on_event(event: TrainEvent) -> None:
        if not main or event.phase != "step":
            return
        if event.step % cfg.log_every == 0 or event.step == event.total_steps:
            record = {"step": event.step, "loss": event.loss,
                      "round": (event.step - 1) // cfg.steps_per_round,
                      **{k: v for k, v in event.metrics.items() if isinstance(v, (int, float))}}
            _append_jsonl(output_dir / "losses.jsonl", record)
            logger.info("step %d/%d loss %.6f", event.step, event.total_steps, event.loss)

    tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, ema_decay=cfg.ema_decay, max_grad_norm=cfg.max_grad_norm,
                       warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, optimizer=cfg.optimizer,
                       mixed_precision=cfg.mixed_precision,
                       seed=cfg.seed, checkpoint_every=cfg.checkpoint_every if main else 0,
                       checkpoint_dir=str(checkpoint_dir) if main else None,
                       keep_checkpoints=cfg.keep_checkpoints, ref_refresh_every=cfg.steps_per_round)
    trainer = Trainer(TrainedAdapter(net), step_fn, rounds, tcfg, callback=on_event, refresh_fn=refresh,
                      stateful={"online": rounds, "run": identity})
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        logger.info("online %s on %d process(es): %d prompts, %d a round x %d samples, %d pairs a step, %d "
                    "steps", cfg.loss, world, len(prompts), rounds.per_round, cfg.samples_per_prompt,
                    cfg.global_batch, cfg.steps)
    if ckpt is None:  # the test round's prompts and seeds before training: a paired before / after
        rounds.evaluate(denoiser, rounds_total, label="baseline")
        if main:
            _append_jsonl(output_dir / "rewards.jsonl", rounds.history[-1])
    result = trainer.train(resume_from=ckpt)
    final = rounds.evaluate(denoiser, rounds_total)
    accelerator.wait_for_everyone()
    lora_file = None
    if main:
        _append_jsonl(output_dir / "rewards.jsonl", final)
        logger.info("reward history (%s):\n%s", REWARD_KINDS[cfg.reward].description.split(":")[0],
                    history_table(rounds.history))
        settings = {"method": cfg.loss, "beta": method.resolved_beta, "steps": cfg.steps, "lr": cfg.lr,
                    "rank": cfg.rank,
                    "alpha": alpha, "target": cfg.target, "global_batch": cfg.global_batch, "seed": cfg.seed,
                    "reward": cfg.reward, "prompts": len(prompts), "prompts_per_round": cfg.prompts_per_round,
                    "samples_per_prompt": cfg.samples_per_prompt, "steps_per_round": cfg.steps_per_round,
                    "sampler": cfg.sampler, "sigmas": [round(float(s), 6) for s in sigmas.tolist()],
                    "processes": world, "reward_history": rounds.history,
                    "trainer": "pso-train online (headless, accelerate)"}
        lora_file = lora_format.save_lora_file(
            net.lora_state_dict(), output_dir, cfg.name, family=loaded.family,
            prediction=loaded.prediction, latent_channels=int(loaded.unet.config.in_channels),
            ldm_shapes=loaded.ldm_shapes, settings=settings)
        logger.info("saved %s", lora_file)
    accelerator.wait_for_everyone()
    return TrainSummary(result.final_step, list(result.loss_history), lora_file, result.last_checkpoint,
                        world, time.monotonic() - started)
