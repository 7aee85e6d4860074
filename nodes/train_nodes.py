"""The PSO training node."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..pso import lora as pso_lora
from ..pso.losses import REDUCTIONS
from . import training_run
from .training_run import TRAIN_METHODS, TrainSettings
from .types import LORA_MODEL_TYPE, LOSS_MAP_TYPE, PAIRS_TYPE

_D = TrainSettings()


class PSOTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PSOTrain",
            display_name="PSO Train LoRA",
            category="PSO/training",
            description=(
                "Fine-tunes a timestep-distilled model with Pairwise Sample Optimization: trains a "
                "LoRA so the model prefers the targets over its own samples, regularised by the "
                "original model, which keeps few-step samples sharp. Shows progress and previews; "
                "Cancel stops after the current step and leaves a checkpoint in output/pso_checkpoints."
            ),
            inputs=[
                io.Model.Input(
                    "model", tooltip="The distilled model to fine-tune (it is cloned, never changed)."
                ),
                PAIRS_TYPE.Input("pairs", tooltip="Target/reference pairs from PSO Build Pairs."),
                io.Combo.Input(
                    "method",
                    options=list(TRAIN_METHODS),
                    default=_D.method,
                    tooltip="; ".join(f"{k}: {v}" for k, v in TRAIN_METHODS.items()),
                ),
                io.Int.Input("steps", default=_D.steps, min=1, max=1_000_000, tooltip="Optimizer steps."),
                io.Float.Input(
                    "learning_rate",
                    default=_D.learning_rate,
                    min=1e-7,
                    max=1.0,
                    step=1e-6,
                    round=False,
                    tooltip="Peak learning rate of AdamW (paper: 1e-5 with batch 64).",
                ),
                io.Float.Input(
                    "beta",
                    default=_D.beta,
                    min=0.0,
                    max=100_000.0,
                    step=0.5,
                    tooltip="Strength of the pull toward the original model; 0 = the method's "
                    "paper default (offline 50, full/DreamBooth 5). Errors are per-element means.",
                ),
                io.Int.Input("lora_rank", default=_D.lora_rank, min=1, max=256, tooltip="LoRA rank r."),
                io.Int.Input(
                    "batch_size", default=_D.batch_size, min=1, max=256, tooltip="Pairs per micro-batch."
                ),
                io.Int.Input(
                    "grad_accumulation",
                    default=_D.grad_accumulation,
                    min=1,
                    max=1024,
                    tooltip="Micro-batches averaged per optimizer step.",
                ),
                io.Int.Input(
                    "seed",
                    default=_D.seed,
                    min=0,
                    max=2**63 - 1,
                    tooltip="Seed of all training randomness (batches, noise, levels, refreshed references).",
                ),
                io.Int.Input(
                    "reference_refresh_every",
                    default=_D.reference_refresh_every,
                    min=0,
                    max=1_000_000,
                    tooltip="Re-sample the references from the current model every this many steps "
                    "(0 = keep the first ones; stale references made offline PSO over-contrasted).",
                ),
                io.Combo.Input(
                    "training_dtype",
                    options=list(training_run.PRECISIONS),
                    default=_D.training_dtype,
                    tooltip="Autocast precision of the forward pass (fp16 needs CUDA).",
                ),
                io.Boolean.Input(
                    "gradient_checkpointing",
                    default=_D.gradient_checkpointing,
                    tooltip="Recompute UNet blocks in the backward pass: less memory, ~30% slower.",
                ),
                io.Int.Input(
                    "checkpoint_every",
                    default=_D.checkpoint_every,
                    min=0,
                    max=1_000_000,
                    tooltip="Save a resumable checkpoint every this many steps (0 = only at the end "
                    "and on Cancel).",
                ),
                io.Int.Input(
                    "preview_every",
                    default=_D.preview_every,
                    min=0,
                    max=1_000_000,
                    tooltip="Show a sample of the first prompt every this many steps (needs the vae).",
                ),
                io.Combo.Input(
                    "lora_target",
                    options=list(pso_lora.TARGETS),
                    default=_D.lora_target,
                    tooltip="Which layers get a LoRA: "
                    + "; ".join(f"{k}: {v.description}" for k, v in pso_lora.TARGETS.items()),
                ),
                io.Vae.Input("vae", optional=True, tooltip="Optional: decodes the training previews."),
                io.String.Input(
                    "resume_from",
                    default="",
                    optional=True,
                    tooltip="Continue a stopped run: its folder in output/pso_checkpoints (e.g. run_00003). "
                    "Use the same pairs and settings; 'steps' is the new total.",
                ),
                io.Combo.Input(
                    "reduction",
                    options=list(REDUCTIONS),
                    default=_D.reduction,
                    optional=True,
                    tooltip="How a pair's transitions meet the log-sigmoid: "
                    + "; ".join(f"{k}: {v}" for k, v in REDUCTIONS.items())
                    + f". Default {_D.reduction}.",
                ),
                io.String.Input(
                    "reference_step_counts",
                    default="",
                    optional=True,
                    tooltip="Also re-sample references at these step counts inside the sigmas (e.g. '1, 2' "
                    "with DMD2's 4 steps) so those samplers get references too; empty = only the "
                    "references' own count (measured better on the digits benchmark).",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained LoRA applied."),
                LORA_MODEL_TYPE.Output(
                    display_name="lora",
                    tooltip="The trained LoRA (for PSO Save LoRA or the native Save LoRA).",
                ),
                LOSS_MAP_TYPE.Output(
                    display_name="loss", tooltip="Loss per step (and PSO metrics), for Plot Loss Graph."
                ),
                io.String.Output(
                    display_name="summary",
                    tooltip="JSON summary: settings, final loss and metrics, checkpoint folder.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        pairs,
        method,
        steps,
        learning_rate,
        beta,
        lora_rank,
        batch_size,
        grad_accumulation,
        seed,
        reference_refresh_every,
        training_dtype,
        gradient_checkpointing,
        checkpoint_every,
        preview_every,
        lora_target,
        vae=None,
        resume_from="",
        reduction=_D.reduction,
        reference_step_counts="",
    ) -> io.NodeOutput:
        settings = TrainSettings(
            method=method,
            steps=steps,
            learning_rate=learning_rate,
            beta=beta,
            lora_rank=lora_rank,
            lora_target=lora_target,
            batch_size=batch_size,
            grad_accumulation=grad_accumulation,
            seed=seed,
            reference_refresh_every=reference_refresh_every,
            training_dtype=training_dtype,
            gradient_checkpointing=gradient_checkpointing,
            checkpoint_every=checkpoint_every,
            preview_every=preview_every,
            resume_from=(resume_from or "").strip(),
            reduction=reduction,
            reference_step_counts=TrainSettings.parse_step_counts(reference_step_counts),
        )
        trained, lora, loss_map, summary = training_run.run_training(model, pairs, settings, vae)
        return io.NodeOutput(trained, lora, loss_map, summary)
