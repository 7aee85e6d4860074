"""The PSO training node."""

from __future__ import annotations

import json

from comfy_api.v0_0_2 import io

from ..pso import lora as pso_lora
from ..pso.losses import REDUCTIONS, valid_beta
from ..pso.train_settings import (
    BETA_ALLOWED,
    BETA_PREFERENCE_PAIRS,
    BETA_SELF_SAMPLED,
    EMA_HORIZON,
    NODE_ANCHOR_LEVELS,
    PRECISIONS,
    TRAIN_METHODS,
    TrainSettings,
)
from . import host_training, training_run
from .types import LORA_MODEL_TYPE, LOSS_MAP_TYPE, PAIRS_TYPE

_D = TrainSettings()
BETA_MAX = 100_000.0


def summary_line(summary: str) -> str:
    """The training summary (JSON) as one line a person reads under the chart."""
    data = json.loads(summary)
    metrics = data.get("final_metrics") or {}
    parts = [f"{data.get('method')}: {data.get('steps_trained')} steps"]
    if data.get("final_loss") is not None:
        parts.append(f"final loss {data['final_loss']:.4g}")
    if metrics.get("implicit_accuracy") is not None:
        parts.append(f"accuracy {metrics['implicit_accuracy']:.2f}")
    if data.get("averaged"):
        parts.append(f"LoRA = average (ema {data.get('settings', {}).get('ema_decay', '?')})")
    if data.get("stopped"):
        parts.append(f"STOPPED: {data['stopped']}")
    if data.get("checkpoint_errors"):
        parts.append(f"{len(data['checkpoint_errors'])} checkpoint(s) not written")
    return " · ".join(parts)


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
                    tooltip="Peak learning rate of AdamW (paper: 1e-5 with batch 64 at SDXL scale; the "
                    "default is for LoRA on a few-step model with a small batch).",
                ),
                io.Float.Input(
                    "beta",
                    default=_D.beta,
                    min=0.0,
                    max=BETA_MAX,
                    step=0.5,
                    tooltip=f"Strength of the pull toward the original model (errors are per-element means). "
                    f"{BETA_SELF_SAMPLED:g} (default) for references your model sampled itself "
                    f"(PSO Sample References, re-sampled during training); "
                    f"{BETA_PREFERENCE_PAIRS:g} for preference pairs (Pick-a-Pic, PSO Pick "
                    "Pairs), the paper's offline value. Chosen on the digits benchmark (bench/README.md). "
                    "Must be > 0.",
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
                    tooltip="Re-sample a pair's reference from the current model once it is this many steps "
                    "old, right before the step that uses it (1 = the default: every step trains against the "
                    "model's own current samples, one extra few-step sampling of the batch per step). 0 = "
                    "never (required for preference pairs, whose references are not model samples). Stale "
                    "references made offline PSO over-contrasted and lose to plain fine-tuning "
                    "(bench/README.md).",
                ),
                io.Combo.Input(
                    "training_dtype",
                    options=list(PRECISIONS),
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
                    default="auto",
                    optional=True,
                    tooltip="Step-count mixing: half of the steps sample the batch's references with fewer "
                    "steps and train at that schedule's levels, so 1- and 2-step sampling improve with the "
                    "trained count instead of breaking. 'auto' (default) = every count that divides the "
                    "references' own (1, 2 for DMD2's 4 steps; 1, 2, 4 for 8), when references are "
                    "re-sampled every step and the method is offline or DreamBooth PSO; a list such as "
                    "'1, 2'; 'none' = off. Measured on the digits benchmark (bench/README.md).",
                ),
                io.Float.Input(
                    "target_sft_weight",
                    default=_D.target_sft_weight,
                    min=0.0,
                    max=1000.0,
                    step=0.1,
                    optional=True,
                    tooltip="Adds this many times the plain diffusion loss on the targets to the pairwise "
                    "loss (not in the paper): it stops the pairwise push from overshooting the targets at "
                    "high noise, where 1-step samples are made. 0 = the paper's loss as written. Used by "
                    "pso_offline only (the other methods run as published; the summary records the weight "
                    "used).",
                ),
                io.Float.Input(
                    "ema_decay",
                    default=_D.ema_decay,
                    min=0.0,
                    max=0.9999,
                    step=0.001,
                    round=False,
                    optional=True,
                    tooltip=f"The output LoRA is a moving average of its weights over about the last "
                    f"1 / (1 - ema_decay) steps ({_D.ema_decay:g} = {EMA_HORIZON}; a short run averages "
                    "about its last tenth), not the last step's: steadier results and better 1- and 2-step "
                    "samples on the benchmarks (bench/README.md). 0 = off. Previews during training show the "
                    "current weights; checkpoints keep both, and a resume continues the average.",
                ),
                io.Combo.Input(
                    "anchor_levels",
                    options=list(NODE_ANCHOR_LEVELS),
                    default=_D.anchor_levels,
                    optional=True,
                    tooltip="Where target_sft_weight's plain diffusion loss is taken: "
                    + "; ".join(f"{k}: {v}" for k, v in NODE_ANCHOR_LEVELS.items())
                    + ". 'final' (default) removed the speckle and over-sharpness PSO kept from the model's "
                    "own samples on both benchmarks (bench/README.md); 'pair' is the earlier behaviour.",
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
    def validate_inputs(cls, beta=None) -> bool | str:
        """At queue time (the host's input validation), before references are sampled: beta > 0. A beta
        of 0 once meant "the paper's value"; it is refused with the values to use instead."""
        if beta is None:  # from a link: TrainSettings checks it at run time
            return True
        if not (valid_beta(beta) and beta <= BETA_MAX):
            return (f"PSO Train: beta={beta!r} is invalid; it must be {BETA_ALLOWED} "
                    f"(at most {BETA_MAX:g})")
        return True

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
        reference_step_counts="auto",
        target_sft_weight=_D.target_sft_weight,
        ema_decay=_D.ema_decay,
        anchor_levels=_D.anchor_levels,
    ) -> io.NodeOutput:
        host_training.refuse_untrainable_family(model, "PSO Train")
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
            target_sft_weight=target_sft_weight,
            ema_decay=ema_decay,
            anchor_levels=anchor_levels,
        )
        trained, lora, loss_map, summary = training_run.run_training(model, pairs, settings, vae)
        # one line under the node's chart (web/pso_training_monitor.js); the whole JSON is the output
        return io.NodeOutput(trained, lora, loss_map, summary, ui={"text": [summary_line(summary)]})
