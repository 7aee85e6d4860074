"""A training run's folder, record and results: the host-free part of what PSO Train and PSO Online
Train do around the trainer.

Both nodes run the same sequence (:func:`open_run` for the folder, :func:`metric_map`,
:func:`outcome`, :func:`result_fields` and :func:`sampling_fields` for the outputs); only where the
output folder is, how the model samples and the progress display belong to the host (``nodes/``).

- A run lives in ``<output>/pso_checkpoints/run_NNNNN`` (:func:`new_checkpoint_dir`); a resume names
  such a folder or one of its ``step_NNNNNN`` checkpoints (:func:`resume_dir`), never a path outside.
- The folder holds :data:`RUN_RECORD`, what the run trains, written when it starts and compared by
  the node's resume check (each node knows which of its settings a resume may change).
- One training per run folder at a time (:func:`pso.io.folder_lock`), even across servers sharing
  the output folder.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import io as pso_io
from .samplers import POLICIES, initial_latent, sample_trajectory
from .trainer import TrainResult

__all__ = ["CHECKPOINT_SUBFOLDER", "RUN_RECORD", "metric_map", "new_checkpoint_dir", "open_run", "outcome",
           "preview_due", "preview_sample", "result_fields", "resume_dir", "run_folder", "sampling_fields",
           "to_pil"]

CHECKPOINT_SUBFOLDER = "pso_checkpoints"
#: The record of what a run trains, written into its folder when it starts and compared on resume.
RUN_RECORD = "run.json"


def resume_dir(output_dir: str, name: str) -> Path:
    """The run folder ``<output>/pso_checkpoints/<name>`` to resume; confined to that folder."""
    root = (Path(output_dir) / CHECKPOINT_SUBFOLDER).resolve()
    if len(name) > 100 or not re.fullmatch(r"[A-Za-z0-9_.-]+(/step_\d+)?", name) or ".." in name:
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


def run_folder(output_dir: str, resume_from: str) -> tuple[Path | None, Path]:
    """``(resume, run_dir)``: the checkpoint to resume from (None for a new run) and the run's folder,
    the resumed run's own or a fresh one."""
    resume = resume_dir(output_dir, resume_from) if resume_from else None
    if resume is None:
        return None, new_checkpoint_dir(output_dir)
    return resume, (resume.parent if resume.name.startswith("step_") else resume)


def open_run(held: contextlib.ExitStack, output_dir: str, resume_from: str, who: str,
             record: Callable[[], dict], check_resume: Callable[[Path, Path], int]
             ) -> tuple[Path | None, Path, int]:
    """The start of every run: its folder (:func:`run_folder`), locked for the life of ``held``; then
    either ``check_resume(run_dir, resume)`` (which refuses a resume that cannot continue the run and
    returns its step) or, for a new run, ``record()`` written as the folder's :data:`RUN_RECORD`.
    Returns ``(resume, run_dir, start_step)``; ``who`` names the node in a busy folder's error."""
    resume, run_dir = run_folder(output_dir, resume_from)
    try:  # one training per run folder at a time, even across servers sharing the output folder
        held.enter_context(pso_io.folder_lock(run_dir, f"the training run {run_dir.name}"))
    except pso_io.FolderBusyError as exc:
        raise ValueError(f"{who}: {exc} (resume_from {resume_from!r})") from None
    if resume is not None:
        return resume, run_dir, check_resume(run_dir, resume)
    pso_io.atomic_write_json(run_dir / RUN_RECORD, record())
    return None, run_dir, 0


def outcome(result: TrainResult, start_step: int) -> dict:
    """What a run actually trained, for the summary (and so for the saved LoRA's metadata):
    ``steps_trained`` is the adapter's total of optimizer steps (kohya's ``ss_steps``)."""
    out = {"steps_trained": result.final_step, "steps_this_run": result.final_step - start_step}
    if result.stopped_reason:
        out["stopped"] = result.stopped_reason
    if result.checkpoint_errors:
        out["checkpoint_errors"] = list(result.checkpoint_errors)
    return out


def metric_map(result: TrainResult, keys: Sequence[str]) -> dict[str, list[float]]:
    """The LOSS_MAP of a run: ``loss`` per step, and each of ``keys`` the last step reported, per step
    (nan where a step did not report it)."""
    out = {"loss": list(result.loss_history)}
    for key in keys:
        if result.metrics_history and key in result.metrics_history[-1]:
            out[key] = [m.get(key, float("nan")) for m in result.metrics_history]
    return out


def result_fields(result: TrainResult) -> dict:
    """The summary's ``final_loss`` (None when no step ran), ``final_metrics`` and ``averaged`` (the
    LoRA is the moving average of the weights, not the last step's)."""
    return {"final_loss": result.loss_history[-1] if result.loss_history else None,
            "final_metrics": result.metrics_history[-1] if result.metrics_history else {},
            "averaged": result.averaged}


def sampling_fields(policy: str, sigmas: torch.Tensor) -> dict:
    """The summary's ``sampler_policy``, the host ``sampler`` that runs it and the ``sigmas`` (6 places)."""
    return {"sampler_policy": policy, "sampler": POLICIES[policy].comfy_sampler,
            "sigmas": [round(float(s), 6) for s in sigmas]}


def preview_due(step: int, every: int, total: int) -> bool:
    """Whether a run with ``preview_every=every`` (0: never) shows a preview after step ``step`` of
    ``total``: every ``every`` steps and after the last."""
    return bool(every) and (step % every == 0 or step == total)


def preview_sample(denoiser, shape: tuple[int, ...], device, sigmas: torch.Tensor, policy: str,
                   model_sampling, decode: Callable[[torch.Tensor], torch.Tensor], seed: int,
                   noise_sampler_factory: Callable | None = None, prompt_index: int = 0) -> torch.Tensor:
    """One sample of prompt ``prompt_index`` (latent shape (C, H, W)) with fixed noise (``seed``, CPU
    generator) under the current model, decoded by ``decode(latent)``. ``noise_sampler_factory(x, seed)``
    makes the step noise (as the running host's sampler draws it); None: ``sample_trajectory``'s own."""
    noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    sig = sigmas.to(device)
    x = initial_latent(model_sampling, sig, noise)
    noise_sampler = None if noise_sampler_factory is None else noise_sampler_factory(x, seed)
    traj = sample_trajectory(denoiser, x, sig, torch.full((1,), prompt_index, dtype=torch.long),
                             model_sampling, policy, None, noise_sampler=noise_sampler)
    with torch.no_grad():
        return decode(traj.final)


def to_pil(images: torch.Tensor):
    """The first image of a ComfyUI IMAGE batch (B, H, W, C) as a PIL image; the first video of a
    decoded video batch (B, T, H, W, C, as a video VAE decodes Wan latents) as its frames side by side,
    a strip of T frames."""
    from PIL import Image

    pixels = images[0, ..., :3].clamp(0, 1)
    if pixels.ndim == 4:  # (T, H, W, C): frames left to right
        pixels = torch.cat(list(pixels), dim=1)
    return Image.fromarray((pixels.float().cpu().numpy() * 255).round().astype("uint8"))
