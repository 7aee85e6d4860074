"""Preference pairs from two image batches: offline preference tuning (Eq. 6) without sampling.

The pairs carry no reference trajectories and the deterministic policy ``"euler"``, so PSO Train's
methods that score the model's own sampler transitions (Eq. 5, ``pso_full``) are refused there with
the existing message; forward-noised methods (``pso_offline``) train on them.
"""

from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io

from ..pso.images import TargetImageError
from . import pairing
from .target_nodes import encode_targets
from .types import PAIRS_TYPE, PairSet

#: Sampler policy of preference pairs: deterministic, so no Gaussian-policy method accepts them.
PREFERENCE_POLICY = "euler"


def split_prompts(prompt: str, count: int) -> list[str]:
    """One prompt per pair: the single line for all, or line i for pair i (blank lines ignored)."""
    lines = [line.strip() for line in prompt.splitlines() if line.strip()]
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(f"prompt has {len(lines)} non-empty line(s) but there are {count} pair(s): write "
                         f"one prompt for all pairs, or exactly {count} lines (one per pair)")
    return lines


class PSOPreferencePairs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PSOPreferencePairs",
            display_name="PSO Preference Pairs (images)",
            category="PSO/data",
            description=(
                "Offline preference tuning (PSO Eq. 6) from pairs of images you chose: the model learns to "
                "prefer the first image of each pair (preferred) over the second (rejected) for its prompt, "
                "regularised by the original model. Both batches are VAE-encoded once; nothing is sampled. "
                "Train with method pso_offline and reference_refresh_every 0 (a refresh would replace the "
                "rejected images with the model's own samples); pso_full is refused, as these pairs have no "
                "sampler trajectories."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The distilled model to fine-tune (converts the latents into "
                               "its latent space and fingerprints the pairs)."),
                io.Clip.Input("clip", tooltip="Text encoder that encodes the pairs' prompts."),
                io.Vae.Input("vae", tooltip="The VAE of the model you fine-tune: encodes both image batches "
                             "into that model's latent space (once, here)."),
                io.Image.Input("preferred", tooltip="The images the model should prefer: image i is the "
                               "winner of pair i. Width and height multiples of the VAE's factor (often 8)."),
                io.Image.Input("rejected", tooltip="The images the model should move away from: image i is "
                               "the loser of pair i. Same count and size as preferred."),
                io.String.Input("prompt", default="", multiline=True,
                                tooltip="The prompt of the pairs: one line for all pairs, or one line per "
                                "pair (as many non-empty lines as images)."),
                io.Sigmas.Input("sigmas", tooltip="The few-step SIGMAS you sample the model with (e.g. PSO "
                                "Few-Step Sigmas): training noise levels come from them."),
            ],
            outputs=[PAIRS_TYPE.Output(
                display_name="pairs", tooltip="Preferred/rejected pairs for PSO Train (use pso_offline).")],
        )

    @classmethod
    def execute(cls, model, clip, vae, preferred, rejected, prompt, sigmas) -> io.NodeOutput:
        n, m = int(preferred.shape[0]), int(rejected.shape[0])
        if n != m:
            raise ValueError(f"{n} preferred image(s) but {m} rejected image(s): every pair needs one of "
                             "each")
        if tuple(preferred.shape[1:3]) != tuple(rejected.shape[1:3]):
            (ph, pw), (rh, rw) = preferred.shape[1:3], rejected.shape[1:3]
            raise TargetImageError(f"preferred images are {pw}x{ph} but rejected images {rw}x{rh} (width x "
                                   "height): bring both to one size (e.g. Upscale Image)")
        prompts = split_prompts(prompt, n)
        fix = "Resize them with an Upscale Image node or crop them with ImageCrop first."
        outer = [encode_targets(vae, images, fix) for images in (preferred, rejected)]
        return io.NodeOutput(preference_pair_set(model, clip, outer[0], outer[1], prompts, sigmas))


def preference_pair_set(model, clip, preferred: torch.Tensor, rejected: torch.Tensor, prompts: list[str],
                        sigmas: torch.Tensor) -> PairSet:
    """Offline preference pairs from VAE-encoded winners and losers (pair i: preferred[i] over rejected[i]).

    Shapes: preferred, rejected (P, C, H, W) in the VAE's (outer) latent space; prompts P strings;
    sigmas (N+1,). Returns a PairSet in the model's inner latent space, policy "euler".
    """
    with torch.inference_mode(False):  # the trainer needs ordinary tensors, not inference ones
        target, reference = (model.model.process_latent_in(x.clone()) for x in (preferred, rejected))
    unique = pairing.unique_in_order(prompts)
    index = {p: i for i, p in enumerate(unique)}
    return PairSet(
        target=target, reference=reference, reference_traj=None,
        prompt_index=torch.tensor([index[p] for p in prompts], dtype=torch.long), prompts=unique,
        conds=[pairing.encode_prompt(clip, p) for p in unique],
        sigmas=sigmas.detach().float().cpu().clone(), policy=PREFERENCE_POLICY,
        fingerprint=pairing.model_fingerprint(model, tuple(target.shape[1:])))
