"""Everything the PSO Train node does between unpacking its inputs and returning its outputs."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..pso import lora as pso_lora
from ..pso import methods, trainer
from ..pso.losses import DEFAULT_REDUCTION, LOSSES, REDUCTIONS
from ..pso.references import ReferencePool
from ..pso.samplers import POLICIES, initial_latent, sample_trajectory
from ..pso.schedules import sub_schedule
from . import host_training, monitor
from .host_sampling import host_noise_sampler
from .types import PairSet

logger = logging.getLogger(__name__)

#: Methods the training node offers (losses of pso.losses); online PSO (Eq. 7) has its own node.
TRAIN_METHODS: dict[str, str] = {
    "pso_offline": "offline PSO (Eq. 6): target and reference both forward-noised; with reference "
                   "refresh, references are re-sampled from the current model (the default)",
    "pso_full": "full PSO (Eq. 5): reference transitions scored under the model's own sampler "
                "policy; needs a stochastic sampler (lcm / euler_ancestral)",
    "pso_dreambooth": "DreamBooth-style PSO: clean-image errors weighted by sigma^-2, reference term x0.1",
    "pso_dreambooth_hinge": "DreamBooth-style hinge form without the frozen model (authors' default)",
    "sft": "plain diffusion-loss fine-tuning on the targets only (the blurry baseline, for comparison)",
}
PRECISIONS: dict[str, str] = {"float32": "no", "bf16": "bf16", "fp16": "fp16"}
CHECKPOINT_SUBFOLDER = "pso_checkpoints"


@dataclass(frozen=True)
class TrainSettings:
    method: str = "pso_offline"
    steps: int = 500
    learning_rate: float = 1e-4
    beta: float = 0.0  # 0 -> the method's default from the paper
    lora_rank: int = 16
    lora_target: str = "attention"
    batch_size: int = 1
    grad_accumulation: int = 1
    seed: int = 0
    reference_refresh_every: int = 10
    training_dtype: str = "float32"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0
    preview_every: int = 0
    resume_from: str = ""  # a run folder under output/pso_checkpoints (its latest checkpoint) or ""
    reduction: str = DEFAULT_REDUCTION
    reference_step_counts: tuple[int, ...] = ()  # extra step counts references are re-sampled at

    def __post_init__(self):
        if self.method not in TRAIN_METHODS:
            raise ValueError(f"method {self.method!r} is unknown; choose one of {sorted(TRAIN_METHODS)}")
        checks = [("steps", self.steps >= 1, "at least 1"), ("lora_rank", self.lora_rank >= 1, "at least 1"),
                  ("batch_size", self.batch_size >= 1, "at least 1"),
                  ("grad_accumulation", self.grad_accumulation >= 1, "at least 1"),
                  ("learning_rate", self.learning_rate > 0 and math.isfinite(self.learning_rate), "> 0"),
                  ("beta", self.beta >= 0 and math.isfinite(self.beta), ">= 0 (0 = the method's default)"),
                  ("reference_refresh_every", self.reference_refresh_every >= 0, ">= 0 (0 = never)"),
                  ("checkpoint_every", self.checkpoint_every >= 0, ">= 0 (0 = only when stopping)"),
                  ("preview_every", self.preview_every >= 0, ">= 0 (0 = no previews)")]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"PSO Train: {name}={getattr(self, name)!r} is invalid; it must be "
                                 f"{allowed}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction {self.reduction!r} is unknown; choose one of {sorted(REDUCTIONS)}")
        if any(k < 1 for k in self.reference_step_counts):
            raise ValueError(f"reference_step_counts {list(self.reference_step_counts)} must all be >= 1")
        if self.training_dtype not in PRECISIONS:
            raise ValueError(f"training_dtype {self.training_dtype!r} is unknown; choose one of "
                             f"{sorted(PRECISIONS)}")

    @classmethod
    def parse_step_counts(cls, text: str) -> tuple[int, ...]:
        """"1, 2" -> (1, 2); "" -> (). Errors name the text and the expected form."""
        parts = [p.strip() for p in (text or "").replace(";", ",").split(",") if p.strip()]
        try:
            counts = tuple(sorted({int(p) for p in parts}))
        except ValueError:
            raise ValueError(f"reference_step_counts {text!r} is not a list of step counts; write e.g. "
                             "'1, 2' (or leave it empty)") from None
        return counts

    @property
    def beta_or_default(self) -> float | None:
        return self.beta if self.beta > 0 else LOSSES[self.method].default_beta


def check_method_fits_pairs(settings: TrainSettings, pairs: PairSet) -> None:
    """Eq. 5 needs the Gaussian policy of a stochastic sampler; say which methods apply otherwise.
    Re-sampling references only makes sense for references the model sampled (they carry their
    trajectories): it would silently replace preference images with the model's own samples."""
    if settings.reference_refresh_every and pairs.reference_traj is None:
        raise ValueError(
            f"reference_refresh_every={settings.reference_refresh_every} would replace these pairs' "
            "references with new samples of the model, but they are not the model's samples (e.g. rejected "
            "images of preference pairs): set reference_refresh_every to 0"
        )
    if settings.reference_step_counts:
        extra_reference_schedules(settings, pairs)  # raises with the reason if they cannot be used
    if LOSSES[settings.method].needs_gaussian_policy and not POLICIES[pairs.policy].stochastic:
        usable = [m for m in TRAIN_METHODS if not LOSSES[m].needs_gaussian_policy]
        raise ValueError(
            f"method {settings.method!r} needs a stochastic sampler's Gaussian policy, but the references "
            f"were sampled with {pairs.policy!r}, which is deterministic (as Lightning / Hyper-SD / schnell "
            f"are run). Use one of {usable}, or sample references with lcm or euler_ancestral."
        )


def extra_reference_schedules(settings: TrainSettings, pairs: PairSet) -> list[torch.Tensor]:
    """The sub-schedules (e.g. 2- and 1-step inside DMD2's 4 steps) that references are also re-sampled
    with, so the step counts a user runs besides the references' own have references of their own."""
    n = int(pairs.sigmas.shape[0]) - 1
    counts = [k for k in settings.reference_step_counts if k != n]
    if not counts:
        return []
    spec = LOSSES[settings.method]
    if spec.reference_path == "sampled" or spec.inputs == LOSSES["sft"].inputs:
        raise ValueError(f"reference_step_counts={list(settings.reference_step_counts)} needs forward-noised "
                         f"references (offline or DreamBooth PSO); method {settings.method!r} "
                         "scores the references' own trajectories or has no references: leave it empty")
    if not settings.reference_refresh_every:
        raise ValueError(f"reference_step_counts={list(settings.reference_step_counts)} takes effect when "
                         "references are re-sampled: set reference_refresh_every > 0")
    return [sub_schedule(pairs.sigmas, k) for k in counts]


def checkpoint_predicate(path: str, module: torch.nn.Module) -> bool:
    """The UNet's top-level blocks (input/output blocks, middle block, Flux double/single blocks)."""
    return bool(re.fullmatch(r"(input|output|double|single)_blocks\.\d+|middle_block", path))


class BatchSource:
    """Pair batches drawn from the pair set and the (refreshable) reference pool."""

    def __init__(self, pairs: PairSet, pool: ReferencePool, batch_size: int, device: torch.device,
                 needs_traj: bool):
        self.pairs, self.pool, self.batch_size, self.device = pairs, pool, batch_size, device
        self.needs_traj = needs_traj

    def __call__(self, step: int, generator: torch.Generator) -> methods.PairBatch:
        n = len(self.pairs)
        if self.batch_size <= n:
            idx = torch.randperm(n, generator=generator)[: self.batch_size]
        else:
            idx = torch.randint(0, n, (self.batch_size,), generator=generator)
        traj = self.pool.trajectory.select(idx).to(self.device) if self.needs_traj else None
        return methods.PairBatch(target=self.pairs.target[idx].to(self.device),
                                 reference=self.pool.reference[idx.to(self.pool.reference.device)].to(self.device),
                                 reference_traj=traj, cond=self.pairs.prompt_index[idx])


def resume_dir(output_dir: str, name: str) -> Path:
    """The run folder ``<output>/pso_checkpoints/<name>`` to resume; confined to that folder."""
    root = (Path(output_dir) / CHECKPOINT_SUBFOLDER).resolve()
    if not re.fullmatch(r"[A-Za-z0-9_.-]+(/step_\d+)?", name) or ".." in name:
        raise ValueError(f"resume_from {name!r} must be a run folder name from output/{CHECKPOINT_SUBFOLDER} "
                         "such as 'run_00003' (optionally '/step_000200'); no paths outside it")
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not path.is_dir():
        runs = sorted(p.name for p in root.glob("run_*")) if root.is_dir() else []
        raise ValueError(f"resume_from {name!r}: no such run in {root}; existing runs: {runs[-10:]}")
    return path


def new_checkpoint_dir(output_dir: str) -> Path:
    """A fresh ``<output>/pso_checkpoints/run_NNNNN`` folder (created here, so two runs never share)."""
    root = Path(output_dir) / CHECKPOINT_SUBFOLDER
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"run_(\d{5,})", p.name))]
    counter = max(taken, default=0) + 1
    while True:
        path = root / f"run_{counter:05d}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            counter += 1


def preview_image(denoiser, pairs: PairSet, model_sampling, latent_out, vae, seed: int):
    """A sample of the first prompt with fixed noise, under the current model, as a PIL image."""
    return preview_sample(denoiser, tuple(pairs.target.shape[1:]), pairs.target.device, pairs.sigmas,
                          pairs.policy, model_sampling, latent_out, vae, seed)


def preview_sample(denoiser, shape: tuple[int, ...], device, sigmas: torch.Tensor, policy: str,
                   model_sampling, latent_out, vae, seed: int, prompt_index: int = 0):
    """One sample of prompt ``prompt_index`` (latent shape (C, H, W)) with fixed noise, under the
    current model, as a PIL image."""
    noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    sig = sigmas.to(device)
    x = initial_latent(model_sampling, sig, noise)
    # step noise as the running host's sampler draws it (its seeding differs between versions)
    traj = sample_trajectory(denoiser, x, sig, torch.full((1,), prompt_index, dtype=torch.long),
                             model_sampling, policy, None, noise_sampler=host_noise_sampler(x, seed))
    with torch.no_grad():
        return to_pil(vae.decode(latent_out(traj.final)))


def to_pil(images: torch.Tensor):
    """The first image of a ComfyUI IMAGE batch (B, H, W, C) as a PIL image."""
    from PIL import Image

    pixels = images[0, ..., :3].clamp(0, 1)
    return Image.fromarray((pixels.float().cpu().numpy() * 255).round().astype("uint8"))


def run_training(model, pairs: PairSet, settings: TrainSettings, vae=None):
    """Train; return (MODEL with the LoRA, LORA_MODEL dict, LOSS_MAP, summary JSON string)."""
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    import folder_paths

    check_method_fits_pairs(settings, pairs)
    ms = model.get_model_object("model_sampling")
    device = comfy.model_management.get_torch_device()
    spec = LOSSES[settings.method]
    needs_traj = spec.reference_path == "sampled"
    with torch.inference_mode(False):
        traj = None if pairs.reference_traj is None else pairs.reference_traj.detach()
        pool = ReferencePool(pairs.reference.clone(), pairs.prompt_index.clone(), pairs.sigmas.clone(),
                             pairs.policy, ms, trajectory=traj,
                             extra_sigmas=extra_reference_schedules(settings, pairs))
        if needs_traj and pool.trajectory is None:
            raise ValueError(f"method {settings.method!r} needs reference trajectories; these pairs have "
                             "none (loaded without them): sample references with PSO Sample References")
        out_dir = folder_paths.get_output_directory()
        resume = resume_dir(out_dir, settings.resume_from) if settings.resume_from else None
        ckpt_dir = (resume.parent if resume.name.startswith("step_") else resume) if resume else \
            new_checkpoint_dir(out_dir)
        cfg = trainer.TrainConfig(steps=settings.steps, lr=settings.learning_rate,
                                  grad_accum=settings.grad_accumulation, seed=settings.seed,
                                  mixed_precision=PRECISIONS[settings.training_dtype],
                                  checkpoint_every=settings.checkpoint_every, checkpoint_dir=str(ckpt_dir),
                                  ref_refresh_every=settings.reference_refresh_every)
        pbar = comfy.utils.ProgressBar(settings.steps)
        latent_out = model.model.process_latent_out
        live = monitor.TrainingMonitor.start(settings.steps, settings.method)  # the chart on the node

        def on_event(event: trainer.TrainEvent, denoiser) -> None:
            live.record(event)  # first: a step that Cancel stops after is done and charted
            comfy.model_management.throw_exception_if_processing_interrupted()
            if event.phase != "step":
                return
            preview = None
            if vae is not None and settings.preview_every and (
                    event.step % settings.preview_every == 0 or event.step == settings.steps):
                with torch.no_grad():
                    image = preview_image(denoiser, pairs, ms, latent_out, vae, settings.seed)
                preview = ("JPEG", image, 512)
                live.preview(image, event.step)
            # the monitor's chart shows the preview; the host's own would overflow the node
            pbar.update_absolute(event.step, settings.steps, None if live.active else preview)

        def refresh(denoiser, step, generator):
            with torch.no_grad():
                pool.refresh(denoiser, generator)

        run = host_training.HostRun(
            method=methods.MethodConfig(settings.method, beta=settings.beta_or_default,
                                        reduction=settings.reduction),
            train_config=cfg, sigmas=pairs.sigmas,
            batch_source=BatchSource(pairs, pool, settings.batch_size, device, needs_traj),
            callback=on_event, refresh_fn=refresh if settings.reference_refresh_every else None,
            stateful={"references": pool}, resume_from=None if resume is None else str(resume),
            setup=(lambda clone: pso_lora.enable_gradient_checkpointing(
                clone.get_model_object("diffusion_model"), checkpoint_predicate))
            if settings.gradient_checkpointing else None)
        lora_cfg = pso_lora.LoRAConfig(rank=settings.lora_rank, target=settings.lora_target)
        _, net, result = host_training.train_on_host(model, pairs.conds, tuple(pairs.target.shape[1:]), run,
                                                     lora_cfg, settings.seed)
        lora = host_training.lora_model_dict(net)
        live.finish(result.interrupted)
    trained = host_training.apply_lora(model, lora)  # bypass mode for quantized models
    loss_map = {"loss": list(result.loss_history)}
    for key in ("implicit_accuracy", "margin", "saturated_fraction"):
        if result.metrics_history and key in result.metrics_history[-1]:
            loss_map[key] = [m.get(key, float("nan")) for m in result.metrics_history]
    summary = {"method": settings.method, "beta": settings.beta_or_default, "settings": asdict(settings),
               "final_loss": result.loss_history[-1] if result.loss_history else None,
               "final_metrics": result.metrics_history[-1] if result.metrics_history else {},
               "sampler_policy": pairs.policy, "sampler": POLICIES[pairs.policy].comfy_sampler,
               "sigmas": [round(float(s), 6) for s in pairs.sigmas],
               "checkpoint": str(result.last_checkpoint or ckpt_dir)}
    return trained, lora, loss_map, json.dumps(summary, indent=1, default=str)
