"""The online PSO training node (Eq. 7): sample, score with a reward, label, train, repeat."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..pso import lora as pso_lora
from ..pso.online import ONLINE_METHODS
from ..pso.online_settings import BETA_ONLINE, BETA_ONLINE_CLIPPED, FIRST_STEP_SUGGESTED, OnlineSettings
from . import host_training, online_run
from .types import LORA_MODEL_TYPE, LOSS_MAP_TYPE, REWARD_TYPE

_D = OnlineSettings()


class PSOOnlineTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PSOOnlineTrain",
            display_name="PSO Online Train LoRA",
            category="PSO/training",
            description=(
                "Online PSO (paper Eq. 7, Algorithm 2): in every round, samples several images per prompt "
                "from the current model with your sampler and SIGMAS, scores them with the reward, makes the "
                "best the target and the worst the reference (ties skipped), and trains a LoRA on those "
                "pairs; then repeats with the improved model. Needs a stochastic sampler (lcm, "
                "euler_ancestral). Shows progress and previews; Cancel stops and leaves a checkpoint in "
                "output/pso_checkpoints."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The distilled model to tune (it is cloned, never changed)."),
                io.Clip.Input("clip", tooltip="Text encoder that encodes the training prompts."),
                io.String.Input("prompts", default="", multiline=True,
                                tooltip="Training prompts, one per line; each round samples the next "
                                "prompts_per_round of them, cycling through the list."),
                io.Vae.Input("vae", tooltip="Decodes the samples so the reward can score them (and the "
                             "previews)."),
                REWARD_TYPE.Input("reward", tooltip="The reward model that decides which sample of a "
                                  "prompt is the target (higher score) and which the reference."),
                io.Sampler.Input("sampler", tooltip="The sampler you run the model with: lcm (DMD2, LCM) or "
                                 "euler_ancestral (Turbo). Deterministic euler is refused (no Gaussian "
                                 "step)."),
                io.Sigmas.Input("sigmas", tooltip="The few-step SIGMAS you sample with (e.g. PSO Few-Step "
                                "Sigmas), at least 2 steps."),
                io.Latent.Input("latent", tooltip="Size of the samples (e.g. Empty Latent Image); only its "
                                "first item is used: samples_per_prompt sets the batch."),
                io.Int.Input("rounds", default=_D.rounds, min=1, max=1_000_000,
                             tooltip="Sample-score-train rounds."),
                io.Int.Input("prompts_per_round", default=_D.prompts_per_round, min=1, max=100_000,
                             tooltip="Prompts sampled per round (paper: 128); at most the number of "
                             "prompts."),
                io.Int.Input("samples_per_prompt", default=_D.samples_per_prompt, min=2, max=64,
                             tooltip="Images sampled per prompt (paper: 2); the best and the worst form the "
                             "pair."),
                io.Float.Input("tie_margin", default=_D.tie_margin, min=0.0, max=1e6, step=0.001, round=False,
                               tooltip="Pairs whose reward gap is at most this are ties and are skipped "
                               "(0 skips exact ties only)."),
                io.Combo.Input("method", options=list(ONLINE_METHODS), default=_D.method,
                               tooltip="; ".join(f"{k}: {v}" for k, v in ONLINE_METHODS.items())),
                io.Float.Input("beta", default=_D.beta, min=0.0, max=100_000.0, step=0.5,
                               tooltip="Strength of the pull toward the original model (> 0): "
                               f"{BETA_ONLINE_CLIPPED:g} for pso_online_clipped (the authors' code, the "
                               f"default), {BETA_ONLINE:g} for pso_online (the paper's Eq. 7). Set it "
                               "with the method: the two scale it differently."),
                io.Float.Input("learning_rate", default=_D.learning_rate, min=1e-7, max=1.0, step=1e-6,
                               round=False, tooltip="Learning rate of AdamW (paper: 1e-5 with batch 32)."),
                io.Int.Input("lora_rank", default=_D.lora_rank, min=1, max=256,
                             tooltip="Rank r of the trained LoRA (paper: 16)."),
                io.Int.Input("steps_per_round", default=_D.steps_per_round, min=1, max=100_000,
                             tooltip="Optimizer steps on each round's pairs (paper: one epoch, 128 pairs / "
                             "batch 32 = 4)."),
                io.Int.Input("batch_size", default=_D.batch_size, min=1, max=1024,
                             tooltip="Pairs per optimizer step (paper: 32)."),
                io.Int.Input("seed", default=_D.seed, min=0, max=2**63 - 1,
                             tooltip="Seed of everything random: round r, prompt slot i samples with noise "
                             "seed + r * prompts_per_round + i; batches and the LoRA init use it too."),
                io.Int.Input("checkpoint_every", default=_D.checkpoint_every, min=0, max=1_000_000,
                             tooltip="Save a checkpoint every this many optimizer steps; 0 = at the end of "
                             "every round (and on Cancel). resume_from continues a run from its latest one."),
                io.Int.Input("preview_every", default=_D.preview_every, min=0, max=1_000_000,
                             tooltip="Show a fixed-seed sample of the first prompt every this many steps, "
                             "and each round's first samples (0 = no previews)."),
                io.Combo.Input("lora_target", options=list(pso_lora.TARGETS), default=_D.lora_target,
                               tooltip="Layers that get a LoRA: "
                               + "; ".join(f"{k}: {v.description}" for k, v in pso_lora.TARGETS.items())),
                io.String.Input("resume_from", default="", optional=True, tooltip=(
                    "Continue a stopped or finished online run: its folder name in output/pso_checkpoints "
                    "(e.g. run_00003; the summary names it). rounds is the new total; the other settings, "
                    "prompts, reward, sampler and SIGMAS must be the run's. Empty: a new run.")),
                io.Float.Input("first_step_weight", default=_D.first_step_weight, min=0.0, max=1000.0,
                               step=0.001, round=False, optional=True, tooltip=(
                    "Holds the first sampling step near the original model: adds this weight x the "
                    "squared shift of the first step's prediction (what a 1-step sample shows) from the "
                    "original model's. 0 (default) = the paper's loss, which on our benchmark broke the "
                    "1-step samples of a 4-step model. If you also run the model at fewer steps than you "
                    f"train, try {FIRST_STEP_SUGGESTED:g}: on the shapes benchmark it kept the 4-step "
                    "reward gain and most 1-step samples, but on another tiny model it stopped the reward "
                    "from rising, so watch the reward chart (bench/README.md).")),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained LoRA applied."),
                LORA_MODEL_TYPE.Output(display_name="lora",
                                       tooltip="The trained LoRA (for PSO Save LoRA or the native Save "
                                       "LoRA)."),
                LOSS_MAP_TYPE.Output(display_name="loss",
                                     tooltip="Loss per optimizer step (and PSO metrics), for Plot Loss "
                                     "Graph."),
                LOSS_MAP_TYPE.Output(display_name="rewards",
                                     tooltip="Mean reward of each round's samples (the last entry: the "
                                     "trained model), plus best/worst and kept/tied pair counts; Plot "
                                     "Loss Graph "
                                     "draws the mean."),
                io.String.Output(display_name="summary",
                                 tooltip="JSON summary: settings, reward table per round, final loss, "
                                 "checkpoint."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, prompts, vae, reward, sampler, sigmas, latent, rounds, prompts_per_round,
                samples_per_prompt, tie_margin, method, beta, learning_rate, lora_rank, steps_per_round,
                batch_size, seed, checkpoint_every, preview_every, lora_target,
                resume_from: str = "", first_step_weight: float = _D.first_step_weight) -> io.NodeOutput:
        host_training.refuse_untrainable_family(model, "PSO Online Train")
        settings = OnlineSettings(
            rounds=rounds, prompts_per_round=prompts_per_round, samples_per_prompt=samples_per_prompt,
            tie_margin=tie_margin, method=method, beta=beta, learning_rate=learning_rate, lora_rank=lora_rank,
            steps_per_round=steps_per_round, batch_size=batch_size, seed=seed,
            checkpoint_every=checkpoint_every, preview_every=preview_every, lora_target=lora_target,
            resume_from=(resume_from or "").strip(), first_step_weight=first_step_weight)
        outputs = online_run.run_online_training(model, clip, prompts, vae, reward, sampler, sigmas, latent,
                                                 settings)
        return io.NodeOutput(*outputs)
