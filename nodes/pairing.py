"""Sampling references for targets and joining the two into pairs (host side)."""

from __future__ import annotations

import logging

import torch

from ..pso.limits import check_prompt
from ..pso.samplers import cat_trajectories
from . import host_sampling
from .types import PairSet, ReferenceSet, TargetSet

logger = logging.getLogger(__name__)


def unique_in_order(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def encode_prompt(clip, prompt: str) -> list:
    """CONDITIONING of one prompt, as the CLIPTextEncode node makes it. Every node encodes its
    prompts here, so the length limit (:data:`pso.limits.MAX_PROMPT_CHARS`) holds for all of them:
    tokenizing megabytes of text would block the server and ignore Cancel."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(check_prompt(prompt, "prompt")))


def sample_references(model, clip, targets: TargetSet, sampler, sigmas: torch.Tensor, seed: int,
                      per_target: int) -> ReferenceSet:
    """Sample ``per_target`` references for each target, prompt by prompt, through the host sampler.

    Prompt group j (in order of first appearance) uses noise seed ``seed + j``; the latent size is
    the targets'. Shapes: returns a trajectory of sum_j (count_j * per_target) samples.
    """
    if per_target < 1:
        raise ValueError(f"references_per_target must be >= 1, got {per_target}")
    ms = model.get_model_object("model_sampling")
    policy = host_sampling.policy_for_sampler(sampler, ms)
    shape = tuple(targets.latents.shape[1:])
    trajs, prompts, conds = [], [], {}
    for j, prompt in enumerate(unique_in_order(targets.prompts)):
        count = targets.prompts.count(prompt) * per_target
        conds[prompt] = encode_prompt(clip, prompt)
        latent = {"samples": torch.zeros((count, *shape))}
        traj, _ = host_sampling.sample_trajectories(model, conds[prompt], None, 1.0, sampler, sigmas, latent,
                                                    seed + j)
        trajs.append(traj.to("cpu"))
        prompts += [prompt] * count
    return ReferenceSet(trajectory=cat_trajectories(trajs), prompts=prompts, seed=seed, sampler=policy,
                        conds=conds)


def model_fingerprint(model, latent_shape: tuple[int, ...]) -> dict:
    """What a pair set is tied to: the model class, its latent format and the latent size."""
    base = model.model
    return {"model_family": type(base.model_config).__name__, "model_class": type(base).__name__,
            "latent_format": type(base.latent_format).__name__,
            "latent_channels": int(latent_shape[0]), "latent_height": int(latent_shape[1]),
            "latent_width": int(latent_shape[2])}


def build_pairs(model, targets: TargetSet, references: ReferenceSet) -> PairSet:
    """Pair each reference with a target of the same prompt (targets cycle when a prompt has several
    references per target).

    Every target prompt needs references, and each prompt's reference count must be a multiple of its
    target count; both are checked with messages naming the prompt and the counts.
    """
    with torch.inference_mode(False):
        target_latents = model.model.process_latent_in(targets.latents.clone().float())
    ref_final = references.final
    if tuple(target_latents.shape[1:]) != tuple(ref_final.shape[1:]):
        raise ValueError(
            f"targets have latents of shape {tuple(target_latents.shape[1:])} but the references "
            f"{tuple(ref_final.shape[1:])}: sample the references for these targets (same model, same size)"
        )
    prompts = unique_in_order(targets.prompts)
    t_idx, r_idx, p_idx = [], [], []
    for j, prompt in enumerate(prompts):
        ts = [i for i, p in enumerate(targets.prompts) if p == prompt]
        rs = [i for i, p in enumerate(references.prompts) if p == prompt]
        if not rs:
            raise ValueError(f"no references for the target prompt {prompt!r} ({len(ts)} target(s)); "
                             "sample references from these targets with PSO Sample References")
        if len(rs) % len(ts):
            raise ValueError(
                f"prompt {prompt!r} has {len(ts)} target(s) but {len(rs)} reference(s); the number of "
                "references must be a multiple of the number of targets (set references_per_target)"
            )
        t_idx += [ts[k % len(ts)] for k in range(len(rs))]
        r_idx += rs
        p_idx += [j] * len(rs)
    unused = sorted(set(references.prompts) - set(prompts))
    if unused:
        logger.warning("PSO Build Pairs: references for prompts without targets are unused: %s", unused[:5])
    missing = [p for p in prompts if p not in references.conds]
    if missing:
        raise ValueError(f"the references carry no conditioning for prompts {missing}")
    r = torch.tensor(r_idx)
    return PairSet(target=target_latents[torch.tensor(t_idx)], reference=ref_final[r].clone(),
                   reference_traj=references.trajectory.select(r), prompt_index=torch.tensor(p_idx),
                   prompts=prompts, conds=[references.conds[p] for p in prompts],
                   sigmas=references.trajectory.sigmas.cpu(), policy=references.trajectory.policy,
                   fingerprint=model_fingerprint(model, tuple(target_latents.shape[1:])))
