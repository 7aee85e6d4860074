"""Nodes that sample references from the user's model and join them with targets into pairs."""

from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io, ui

from . import host_training, pairing
from .types import PAIRS_TYPE, REFERENCES_TYPE, TARGETS_TYPE


class PSOSampleReferences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PSOSampleReferences",
            display_name="PSO Sample References",
            category="PSO/data",
            description=(
                "Samples reference images from your distilled model for every target prompt, with your "
                "sampler and SIGMAS, recording every step. PSO trains the model to prefer the targets over "
                "these, its own samples. Use the same sampler and SIGMAS you generate with."
            ),
            inputs=[
                io.Model.Input("model",
                               tooltip="The distilled model to fine-tune (the references are its samples)."),
                io.Clip.Input("clip", tooltip="Text encoder used to encode each target's prompt."),
                TARGETS_TYPE.Input("targets",
                                   tooltip="Targets whose prompts (and latent size) the references use."),
                io.Sampler.Input("sampler", tooltip="The sampler you run the model with: lcm (DMD2, LCM), "
                                 "euler_ancestral (Turbo) or euler (Lightning, Hyper, schnell)."),
                io.Sigmas.Input("sigmas",
                                tooltip="The few-step SIGMAS you sample with (e.g. PSO Few-Step Sigmas)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the references' noise; prompt group j uses seed + j."),
                io.Int.Input("references_per_target", default=1, min=1, max=64,
                             tooltip="How many references to sample for each target image."),
                io.Vae.Input("vae", optional=True, tooltip="Optional: decode the references to show them."),
            ],
            outputs=[REFERENCES_TYPE.Output(
                display_name="references", tooltip="The sampled references and their recorded steps.")],
        )

    @classmethod
    def execute(cls, model, clip, targets, sampler, sigmas, seed, references_per_target, vae=None):
        host_training.refuse_untrainable_family(model, "PSO Sample References")  # before sampling
        refs = pairing.sample_references(model, clip, targets, sampler, sigmas, seed, references_per_target)
        if vae is None:
            return io.NodeOutput(refs)
        images = vae.decode(model.model.process_latent_out(refs.final.to(torch.float32)))
        if images.ndim == 5:  # a video VAE: (B, T, H, W, C), every frame of every reference, in order
            images = images.reshape(-1, *images.shape[2:])
        return io.NodeOutput(refs, ui=ui.PreviewImage(images[..., :3], cls=cls))


class PSOBuildPairs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PSOBuildPairs",
            display_name="PSO Build Pairs",
            category="PSO/data",
            description=(
                "Joins targets and references by prompt into training pairs: each target is paired with the "
                "references sampled for its prompt."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model the references came from (converts target latents "
                               "into its latent space and fingerprints the pairs)."),
                TARGETS_TYPE.Input("targets", tooltip="What the model should learn to prefer."),
                REFERENCES_TYPE.Input("references", tooltip="The model's own samples for the same prompts."),
            ],
            outputs=[PAIRS_TYPE.Output(display_name="pairs",
                                       tooltip="Target/reference pairs for PSO Train.")],
        )

    @classmethod
    def execute(cls, model, targets, references):
        return io.NodeOutput(pairing.build_pairs(model, targets, references))
