"""Values that flow between PSO nodes (custom ComfyUI types ``PSO_*``).

All latents are in the model's *inner* latent space (after ``process_latent_in``), the space the
sampler and the trajectories live in; conversions happen where images enter (VAE encode) and leave
(VAE decode) the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from comfy_api.v0_0_2 import io

from ..pso.samplers import Trajectory

TARGETS_TYPE = io.Custom("PSO_TARGETS")
REFERENCES_TYPE = io.Custom("PSO_REFERENCES")
PAIRS_TYPE = io.Custom("PSO_PAIRS")
# The native trainer's types, as the versioned API declares them (0.3.75 and 0.33 both have them in
# v0_0_2): Save LoRA / Load LoRA Model read LORA_MODEL, Plot Loss Graph reads LOSS_MAP.
LORA_MODEL_TYPE = io.LoraModel
LOSS_MAP_TYPE = io.LossMap
#: A reward model: any object with ``name: str`` and
#: ``score(images, prompts) -> scores`` where images is a ComfyUI IMAGE batch (B, H, W, 3) in [0, 1],
#: prompts B strings, and scores a (B,) float32 CPU tensor, higher = better. Online PSO labels pairs
#: with it; the evaluation node tabulates it.
REWARD_TYPE = io.Custom("PSO_REWARD")


@dataclass
class TargetSet:
    """Target images, VAE-encoded once.

    Shapes: latents (M, C, H, W) in the VAE's latent space (outer: not yet ``process_latent_in``), or
    (M, C, 1, H, W) from a video VAE (one frame per image);
    prompts, sources: M strings (the caption of each image; its file name or "image <i>").
    """

    latents: torch.Tensor
    prompts: list[str]
    sources: list[str]

    def __post_init__(self):
        m = self.latents.shape[0]
        if len(self.prompts) != m or len(self.sources) != m:
            raise ValueError(f"{m} target latents but {len(self.prompts)} prompts and {len(self.sources)} "
                             "sources")


@dataclass
class ReferenceSet:
    """Reference samples of the user's model, with their recorded trajectories.

    Shapes: trajectory of R samples (latents (R, N+1, C, H, W), inner space); prompts R strings.
    """

    trajectory: Trajectory
    prompts: list[str]
    seed: int
    sampler: str
    conds: dict[str, list] = field(default_factory=dict)  # prompt -> CONDITIONING, as encoded

    @property
    def final(self) -> torch.Tensor:
        return self.trajectory.final


@dataclass
class PairSet:
    """Target/reference pairs joined by prompt, ready to train on.

    Shapes: target, reference (P, C, H, W) inner latents; reference_traj of P samples or None;
    prompt_index (P,) long into ``prompts`` (the unique prompts); conds[i] is the CONDITIONING of
    prompts[i]. sigmas: (N+1,) the schedule the references were sampled with.
    """

    target: torch.Tensor
    reference: torch.Tensor
    reference_traj: Trajectory | None
    prompt_index: torch.Tensor
    prompts: list[str]
    conds: list
    sigmas: torch.Tensor
    policy: str
    fingerprint: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.target.shape[0])
