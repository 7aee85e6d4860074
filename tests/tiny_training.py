"""Shared by host tests: train a small LoRA on a tiny fixture model through nodes.host_training,
and sample a model with the host's own KSampler path."""

from __future__ import annotations

import torch


def sample(model, cond, seed=3):
    """Two Euler steps of the host's comfy.sample.sample on an 8x8 latent (inference mode)."""
    import comfy.sample

    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, 2, 1.0, "euler", "sgm_uniform", cond, cond, latent,
                                   seed=seed, disable_pbar=True)


def train_lora(host, lora_module, bundle, conds, steps=4, lr=3e-2, callback=None):
    """Offline PSO on random target/reference latents of two prompts; returns (trained, net, result).

    ``host`` and ``lora_module`` are the extension's own modules (nodes.host_training, pso.lora).
    """
    from pso.methods import MethodConfig, PairBatch
    from pso.schedules import few_step_sigmas
    from pso.trainer import TrainConfig

    g = torch.Generator().manual_seed(0)
    targets, refs = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g) * 2
    prompt_of = torch.tensor([0, 1, 0, 1])

    def batch_source(step, generator):
        idx = torch.randperm(4, generator=generator)[:2]
        return PairBatch(target=targets[idx], reference=refs[idx], cond=prompt_of[idx])

    ms = bundle.model.get_model_object("model_sampling")
    run = host.HostRun(method=MethodConfig("pso_offline", beta=50.0),
                       train_config=TrainConfig(steps=steps, lr=lr, seed=1),
                       sigmas=few_step_sigmas(ms, "dmd2"), batch_source=batch_source, callback=callback)
    return host.train_on_host(bundle.model, conds, (4, 8, 8), run, lora_module.LoRAConfig(rank=4), seed=2)


def sampled_pairs_chain(data_nodes, types):
    """Three targets of two prompts on the tiny SD1.5 bundle, 2 references each sampled with the host's
    ``lcm`` sampler on DMD2's 4 steps (seed 11), joined by PSO Build Pairs.

    ``data_nodes`` / ``types`` are the extension's own modules; returns (bundle, targets, refs, pairs).
    """
    import comfy.samplers

    from pso.schedules import few_step_sigmas
    from pso_test_fixtures import tiny_models

    with torch.inference_mode():
        b = tiny_models.build_bundle("sd15", seed=5)
        g = torch.Generator().manual_seed(0)
        targets = types.TargetSet(latents=torch.randn(3, 4, 8, 8, generator=g),
                                  prompts=["a red circle", "a red circle", "a blue square"],
                                  sources=["a.png", "b.png", "c.png"])
        sigmas = few_step_sigmas(b.model.get_model_object("model_sampling"), "dmd2")
        refs = data_nodes.PSOSampleReferences.execute(
            b.model, b.clip, targets, comfy.samplers.sampler_object("lcm"), sigmas, 11, 2).result[0]
        pairs = data_nodes.PSOBuildPairs.execute(b.model, targets, refs).result[0]
    return b, targets, refs, pairs


def train_node(train_nodes, bundle, pairs, steps, **kw):
    """PSO Train's ``execute`` on the tiny bundle with small settings (offline PSO, lr 1e-2, rank 4,
    batch 2, seed 3, references refreshed once 2 steps old, no checkpoints or previews); ``kw`` overrides
    any of them. Returns the node's outputs (model, lora, loss map, summary)."""
    args = dict(method="pso_offline", steps=steps, learning_rate=1e-2, beta=10.0, lora_rank=4, batch_size=2,
                grad_accumulation=1, seed=3, reference_refresh_every=2, training_dtype="float32",
                gradient_checkpointing=False, checkpoint_every=0, preview_every=0, lora_target="attention")
    args.update(kw)
    with torch.inference_mode():
        return train_nodes.PSOTrain.execute(bundle.model, pairs, **args).result
