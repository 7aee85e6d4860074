"""Reference trajectories recorded through the host are the ones ComfyUI samples, bit for bit.

In-process, with the host's real classes and the tiny SD1.5 / SDXL fixture models. The reference is
the host's own SamplerCustomAdvanced node (RandomNoise, BasicGuider / CFGGuider, the same SAMPLER
and SIGMAS), run under ``torch.inference_mode()`` as ComfyUI runs every node.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

from extension_loader import load_package

SEED = 1234
BATCH = 2
# (KSamplerSelect name, few-step timestep set it is run with)
CASES = [("lcm", "dmd2"), ("euler_ancestral", "turbo_4"), ("euler", "lightning_4")]


@pytest.fixture(scope="module")
def host(comfy_inprocess):
    from pso_test_fixtures import tiny_models

    load_package()
    hs = importlib.import_module("comfyui-pso.nodes.host_sampling")
    ncs = importlib.import_module("comfy_extras.nodes_custom_sampler")
    schedules = importlib.import_module("comfyui-pso.pso.schedules")
    return SimpleNamespace(hs=hs, ncs=ncs, schedules=schedules, tiny=tiny_models, bundles={})


def _bundle(host, family):
    """(bundle, positive, negative) for a family, built once per module."""
    if family not in host.bundles:
        b = host.tiny.build_bundle(family, seed=7)
        with torch.inference_mode():
            pos = b.clip.encode_from_tokens_scheduled(b.clip.tokenize("a red circle on grass"))
            neg = b.clip.encode_from_tokens_scheduled(b.clip.tokenize(""))
        host.bundles[family] = (b, pos, neg)
    return host.bundles[family]


def _inputs(host, family, sampler_name, schedule):
    b, pos, neg = _bundle(host, family)
    with torch.inference_mode():  # SIGMAS, SAMPLER and LATENT come from nodes, i.e. inference tensors
        sigmas = host.schedules.few_step_sigmas(b.model.get_model_object("model_sampling"), schedule)
        sampler = host.ncs.KSamplerSelect.execute(sampler_name)[0]
        latent = {"samples": torch.zeros(BATCH, 4, 8, 8)}  # EmptyLatentImage 64 x 64, batch 2
    return b, pos, neg, sigmas, sampler, latent


def _record(host, b, pos, sampler, sigmas, latent, seed=SEED, negative=None, cfg=1.0):
    with torch.inference_mode():
        return host.hs.sample_trajectories(b.model, pos, negative, cfg, sampler, sigmas, latent, seed)


def _node(host, b, pos, sampler, sigmas, latent, seed=SEED, negative=None, cfg=1.0):
    ncs = host.ncs
    with torch.inference_mode():
        noise = ncs.RandomNoise.execute(seed)[0]
        if negative is None:
            guider = ncs.BasicGuider.execute(b.model, pos)[0]
        else:
            guider = ncs.CFGGuider.execute(b.model, pos, negative, cfg)[0]
        return ncs.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent)[0]["samples"]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize(("sampler_name", "schedule"), CASES)
def test_recorded_trajectory_is_the_hosts_sampling_bit_for_bit(host, family, sampler_name, schedule):
    b, pos, _, sigmas, sampler, latent = _inputs(host, family, sampler_name, schedule)
    traj, out = _record(host, b, pos, sampler, sigmas, latent)
    reference = _node(host, b, pos, sampler, sigmas, latent)

    n = sigmas.numel() - 1
    assert traj.latents.shape == (BATCH, n + 1, 4, 8, 8)
    assert traj.policy == {"lcm": "renoise"}.get(sampler_name, sampler_name)
    # 1. the final inner latent, processed out as guider.sample does, is the node's output
    with torch.inference_mode():
        final_out = b.model.model.process_latent_out(traj.final.to(torch.float32))
    assert torch.equal(final_out, reference)
    assert torch.equal(out["samples"], reference)
    assert not torch.equal(traj.final[0], traj.final[1])  # each batch item is its own trajectory
    assert traj.final.abs().mean() > 1e-3  # the model is alive: not a zero-output fixture
    # the start is RandomNoise's noise scaled to sigma_0 (txt2img at sigma_max: max_denoise)
    ms = b.model.get_model_object("model_sampling")
    noise = host.ncs.Noise_RandomNoise(SEED).generate_noise(latent)
    assert torch.equal(traj.latents[:, 0], ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), True))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize(("sampler_name", "schedule"), CASES)
def test_every_step_is_its_policy_mean_plus_std_times_the_recorded_draw(host, family, sampler_name, schedule):
    b, pos, _, sigmas, sampler, latent = _inputs(host, family, sampler_name, schedule)
    traj, _ = _record(host, b, pos, sampler, sigmas, latent)
    n = traj.num_steps
    for i in range(n):
        assert torch.equal(traj.latents[:, i + 1], traj.mean[:, i] + traj.std[i] * traj.noise[:, i]), i
    stochastic = sampler_name != "euler"
    # noise is drawn on every step but the last (std 0, x_N = x0) for the stochastic samplers, never for euler
    expected = list(range(n - 1)) if stochastic else []
    assert traj.stochastic_steps() == expected
    for i in range(n):
        drawn = bool(traj.noise[:, i].abs().sum() > 0)
        assert drawn == (i in expected), i
    if stochastic:
        assert torch.equal(traj.latents[:, -1], traj.x0[:, -1])
        # the draws are unit Gaussians, independent per step
        z = traj.noise[:, : n - 1]
        assert abs(float(z.std()) - 1.0) < 0.2
        assert not torch.equal(traj.noise[:, 0], traj.noise[:, 1])


def test_cfg_guider_with_a_negative_matches_the_host(host):
    b, pos, neg, sigmas, sampler, latent = _inputs(host, "sd15", "lcm", "dmd2")
    traj, _ = _record(host, b, pos, sampler, sigmas, latent, negative=neg, cfg=2.5)
    reference = _node(host, b, pos, sampler, sigmas, latent, negative=neg, cfg=2.5)
    plain, _ = _record(host, b, pos, sampler, sigmas, latent)
    with torch.inference_mode():
        assert torch.equal(b.model.model.process_latent_out(traj.final), reference)
    assert not torch.equal(traj.x0[:, 0], plain.x0[:, 0])  # the guidance changed the recorded x0


def test_same_seed_same_trajectory_other_seed_other_trajectory(host):
    b, pos, _, sigmas, sampler, latent = _inputs(host, "sd15", "euler_ancestral", "turbo_4")
    a, _ = _record(host, b, pos, sampler, sigmas, latent, seed=5)
    again, _ = _record(host, b, pos, sampler, sigmas, latent, seed=5)
    other, _ = _record(host, b, pos, sampler, sigmas, latent, seed=6)
    for name in ("sigmas", "latents", "x0", "noise", "mean", "std"):
        assert torch.equal(getattr(a, name), getattr(again, name)), name
    assert not torch.equal(a.latents[:, 0], other.latents[:, 0])
    assert not torch.equal(a.noise[:, 0], other.noise[:, 0])
    assert not torch.equal(a.final, other.final)


def test_unsupported_samplers_are_refused_with_the_reason(host):
    b, pos, _, sigmas, _, latent = _inputs(host, "sd15", "lcm", "dmd2")
    ms = b.model.get_model_object("model_sampling")
    dpmpp = host.ncs.KSamplerSelect.execute("dpmpp_2m")[0]
    refused = r"sampler 'dpmpp_2m' \(function sample_dpmpp_2m\) is not supported"
    with pytest.raises(ValueError, match=refused) as e:
        _record(host, b, pos, dpmpp, sigmas, latent)
    msg = str(e.value)
    assert "Gaussian policy" in msg and "multi-step" in msg
    assert all(f"'{name}'" in msg for name in ("lcm", "euler_ancestral", "euler"))

    eta = host.ncs.SamplerEulerAncestral.execute(0.5, 1.0)[0]
    with pytest.raises(ValueError, match=r"'euler_ancestral' with eta=0.5 is not supported: PSO needs "
                                         r"eta=1.0, s_noise=1.0"):
        _record(host, b, pos, eta, sigmas, latent)
    s_noise = host.ncs.SamplerEulerAncestral.execute(1.0, 0.9)[0]
    with pytest.raises(ValueError, match=r"s_noise=0.9"):
        host.hs.policy_for_sampler(s_noise, ms)
    with pytest.raises(ValueError, match=r"not a k-diffusion sampler"):
        host.hs.policy_for_sampler(object(), ms)


def test_policy_names_follow_the_model(host):
    import comfy.model_sampling

    b, *_ = _bundle(host, "sd15")
    ms = b.model.get_model_object("model_sampling")

    class Flow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    select = host.ncs.KSamplerSelect.execute
    assert host.hs.policy_for_sampler(select("lcm")[0], ms) == "renoise"
    assert host.hs.policy_for_sampler(select("euler_ancestral")[0], ms) == "euler_ancestral"
    eta_one = host.ncs.SamplerEulerAncestral.execute(1.0, 1.0)[0]
    assert host.hs.policy_for_sampler(eta_one, ms) == "euler_ancestral"
    assert host.hs.policy_for_sampler(select("euler")[0], ms) == "euler"
    assert host.hs.policy_for_sampler(select("euler_ancestral")[0], Flow()) == "euler_ancestral_rf"


def test_recorded_tensors_can_be_used_for_training(host):
    b, pos, _, sigmas, sampler, latent = _inputs(host, "sd15", "lcm", "dmd2")
    traj, _ = _record(host, b, pos, sampler, sigmas, latent)
    for name in ("sigmas", "latents", "x0", "noise", "mean", "std"):
        t = getattr(traj, name)
        assert not t.is_inference(), name
        assert not t.requires_grad, name
    # autograd can save them (inference tensors raise "Inference tensors cannot be saved for backward")
    w = torch.ones((), requires_grad=True)
    (traj.latents * w).square().mean().backward()
    assert w.grad is not None and float(w.grad) > 0


def test_lcm_distilled_sampling_and_sdxl_size_conditioning_are_the_hosts_bit_for_bit(host):
    """LCM's distilled model sampling (ModelSamplingDiscrete 'lcm') on an SDXL model conditioned with
    CLIPTextEncodeSDXL sizes: the recorded trajectory is still SamplerCustomAdvanced's output, and
    both settings change it (so they really reached the prediction)."""
    adv = importlib.import_module("comfy_extras.nodes_model_advanced")
    sdxl_clip = importlib.import_module("comfy_extras.nodes_clip_sdxl")
    b, plain_pos, _, sigmas, sampler, latent = _inputs(host, "sdxl", "lcm", "dmd2")
    with torch.inference_mode():
        lcm_model = adv.ModelSamplingDiscrete().patch(b.model, "lcm", False)[0]
        pos = sdxl_clip.CLIPTextEncodeSDXL.execute(b.clip, 512, 768, 0, 32, 512, 768, "a red circle on grass",
                                                   "a red circle on grass")[0]
        ms = lcm_model.get_model_object("model_sampling")
        sigmas = host.schedules.few_step_sigmas(ms, "dmd2")
    assert type(ms).__name__ == "ModelSamplingAdvanced" and hasattr(ms, "original_timesteps")
    lcm = SimpleNamespace(model=lcm_model, clip=b.clip)
    traj, out = _record(host, lcm, pos, sampler, sigmas, latent)
    reference = _node(host, lcm, pos, sampler, sigmas, latent)
    assert torch.equal(out["samples"], reference)
    for i in range(traj.num_steps):
        assert torch.equal(traj.latents[:, i + 1], traj.mean[:, i] + traj.std[i] * traj.noise[:, i]), i
    plain_sizes, _ = _record(host, lcm, plain_pos, sampler, sigmas, latent)
    plain_sampling, _ = _record(host, b, pos, sampler, sigmas, latent)
    assert not torch.equal(plain_sizes.final, traj.final), "the size conditioning did not reach the model"
    assert not torch.equal(plain_sampling.final, traj.final), "LCM's model sampling did not reach the model"
