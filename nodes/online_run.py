"""Everything the PSO Online Train node does between unpacking its inputs and returning its outputs.

Online PSO (Eq. 7, Algorithm 2) runs inside the host exactly as PSO Train does
(:func:`nodes.host_training.train_on_host`): the trainer's refresh hook collects each round from the
*current* model (LoRA on) with the host's own x0 predictions (``HostDenoiser``), the round logic of
:mod:`pso.online` labels the pairs with the user's PSO_REWARD, and the step function scores both
sampled trajectories under the current and the frozen model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass

import torch

from ..pso import io as pso_io
from ..pso import lora as pso_lora
from ..pso import methods, online, runs, trainer
from ..pso.losses import LOSSES, valid_beta
from ..pso.samplers import POLICIES
from ..pso.schedules import check_sigmas
from . import host_sampling, host_training, monitor, pairing, training_run

logger = logging.getLogger(__name__)

#: beta of online PSO: the paper's value for Eq. 7 (Appendix B.1: beta = 5 for online preference
#: tuning). bench/digits' 10 was measured for the offline loss on x0 errors and does not carry over to
#: Eq. 7's log-probability ratios; the authors' clipped code runs at 50.
BETA_ONLINE = LOSSES["pso_online"].beta_for("self_sampled")
BETA_ONLINE_CLIPPED = LOSSES["pso_online_clipped"].beta_for("self_sampled")
BETA_ALLOWED = (f"> 0: {BETA_ONLINE:g} for pso_online (the paper's online value, the default), "
                f"{BETA_ONLINE_CLIPPED:g} for pso_online_clipped (the authors' code); 0 no longer means "
                "'the method's default'")


@dataclass(frozen=True)
class OnlineSettings:
    rounds: int = 10
    prompts_per_round: int = 128
    samples_per_prompt: int = 2
    tie_margin: float = 0.0
    method: str = "pso_online"
    beta: float = BETA_ONLINE  # pso_online_clipped: the authors' code uses 50
    learning_rate: float = 1e-5
    lora_rank: int = 16
    steps_per_round: int = 4
    batch_size: int = 32
    seed: int = 0
    checkpoint_every: int = 0
    preview_every: int = 0
    lora_target: str = "attention"
    resume_from: str = ""  # a run folder under output/pso_checkpoints (its latest checkpoint) or ""

    def __post_init__(self):
        if self.method not in online.ONLINE_METHODS:
            raise ValueError(f"PSO Online Train: method {self.method!r} is unknown; choose one of "
                             f"{sorted(online.ONLINE_METHODS)}")
        checks = [("learning_rate", self.learning_rate > 0 and math.isfinite(self.learning_rate), "> 0"),
                  ("beta", valid_beta(self.beta), BETA_ALLOWED),
                  ("lora_rank", self.lora_rank >= 1, "at least 1"),
                  ("seed", 0 <= self.seed < 2**63, "in [0, 2**63)"),
                  ("checkpoint_every", self.checkpoint_every >= 0, ">= 0 (0 = at the end of every round)"),
                  ("preview_every", self.preview_every >= 0, ">= 0 (0 = no previews)")]
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
        return methods.MethodConfig(self.method, beta=self.beta)

    def online_config(self) -> online.OnlineConfig:
        return online.OnlineConfig(rounds=self.rounds, prompts_per_round=self.prompts_per_round,
                                   samples_per_prompt=self.samples_per_prompt,
                                   steps_per_round=self.steps_per_round, batch_size=self.batch_size,
                                   tie_margin=self.tie_margin)


#: The per-step metrics PSO Online Train's LOSS_MAP carries besides the loss.
LOSS_MAP_METRICS = ("implicit_accuracy", "margin", "saturated_fraction", "clipped_fraction")
#: Settings an online resume may change: everything else must be what the run was started with.
RESUME_MAY_CHANGE = ("rounds", "checkpoint_every", "preview_every", "resume_from")


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
    changed = {k: (v, record["settings"].get(k)) for k, v in saved.get("settings", {}).items()
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
    prompts = pairing.unique_in_order([line.strip() for line in (text or "").splitlines() if line.strip()])
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


def check_sampler(sampler, model_sampling) -> str:
    """The stochastic policy of the user's SAMPLER; Eq. 7 refuses deterministic ones by name."""
    policy = host_sampling.policy_for_sampler(sampler, model_sampling)
    if not POLICIES[policy].stochastic:
        usable = [m for m in training_run.TRAIN_METHODS if not LOSSES[m].needs_gaussian_policy]
        raise ValueError(
            f"PSO Online Train: sampler policy {policy!r} is deterministic (plain euler, as Lightning / "
            f"Hyper-SD "
            "/ schnell are run): it has no Gaussian step policy, so online PSO (Eq. 7), which scores each "
            "sampled step's log-probability, cannot train on it. Choose a stochastic sampler in "
            "KSamplerSelect "
            f"(lcm for DMD2 / LCM, euler_ancestral for Turbo), or train offline with PSO Train using one of "
            f"{usable} (e.g. PSO Preference Pairs + pso_offline).")
    return policy




def _scores(reward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    scores = reward.score(images, prompts)
    scores = torch.as_tensor(scores).detach().float().cpu().reshape(-1)
    if scores.numel() != images.shape[0] or not bool(torch.isfinite(scores).all()):
        raise ValueError(f"PSO Online Train: reward {reward.name!r} returned {scores.tolist()[:8]} for "
                         f"{images.shape[0]} images; it must return one finite score per image")
    return scores


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
        every = settings.checkpoint_every or cfg_online.steps_per_round  # 0: a checkpoint per round
        cfg = trainer.TrainConfig(steps=cfg_online.total_steps, lr=settings.learning_rate, seed=settings.seed,
                                  checkpoint_every=every, checkpoint_dir=str(ckpt_dir),
                                  ref_refresh_every=cfg_online.steps_per_round)
        per_round = cfg_online.prompts_in_round(len(prompts)) + cfg_online.steps_per_round
        total = cfg_online.rounds * per_round + cfg_online.prompts_in_round(len(prompts))
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
            return _scores(reward, images, [prompts[prompt]] * images.shape[0])

        def on_prompt(round_index, slot):
            comfy.model_management.throw_exception_if_processing_interrupted()
            preview = None
            if settings.preview_every and slot == 0 and "image" in shown:
                preview = ("JPEG", runs.to_pil(shown.pop("image")), 512)
                live.preview(preview[1], min(round_index, cfg_online.rounds) * cfg_online.steps_per_round)
            # the monitor's chart shows the preview; the host's own would overflow the node
            pbar.update_absolute(min(round_index, cfg_online.rounds) * per_round + slot + 1, total,
                                 None if live.active else preview)

        rounds = online.OnlineRounds(cfg_online, len(prompts), settings.seed, sample_fn, score_fn, device,
                                     on_prompt)

        def on_event(event: trainer.TrainEvent, denoiser) -> None:
            live.record(event)  # first: a step that Cancel stops after is done and charted
            comfy.model_management.throw_exception_if_processing_interrupted()
            if event.phase != "step":
                return
            s = cfg_online.steps_per_round
            r, j = (event.step - 1) // s, (event.step - 1) % s + 1
            preview = None
            every = settings.preview_every
            if every and (event.step % every == 0 or event.step == cfg.steps):
                image = training_run.preview_sample(denoiser, shape, device, sigmas, policy, ms, latent_out,
                                                    vae, settings.seed)
                preview = ("JPEG", image, 512)
                live.preview(image, event.step)
            sampled = cfg_online.prompts_in_round(len(prompts))
            pbar.update_absolute(r * per_round + sampled + j, total, None if live.active else preview)
            if event.step == cfg.steps:  # the reward of the trained model, on the next round's prompts
                rounds.evaluate(denoiser, cfg_online.rounds)

        def refresh(denoiser, step, generator):
            with torch.no_grad():
                rounds.refresh(denoiser, step, generator)

        run = host_training.HostRun(
            method=settings.method_config(),
            train_config=cfg, sigmas=sigmas, batch_source=rounds, callback=on_event, refresh_fn=refresh,
            stateful={"online": rounds}, resume_from=None if resume is None else str(resume))
        lora_cfg = pso_lora.LoRAConfig(rank=settings.lora_rank, target=settings.lora_target)
        _, net, result = host_training.train_on_host(model, conds, shape, run,
                                                     lora_cfg, settings.seed)
        lora = host_training.lora_model_dict(net)
        live.finish(result.interrupted)
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
