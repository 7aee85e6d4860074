"""PSO Online Train in-process on the tiny SD1.5 model: the host's samples, determinism, validation."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from extension_loader import load_package

PROMPTS = "a red square\na blue circle"


@pytest.fixture(scope="module")
def ext(comfy_inprocess):
    from pso_test_fixtures import BrightnessReward, tiny_models

    load_package()
    mods = {m: importlib.import_module(f"comfyui-pso.{m}")
            for m in ("nodes.online_nodes", "nodes.host_sampling", "nodes.host_training", "pso.online",
                      "pso.schedules", "nodes.training_run")}
    with torch.inference_mode():
        bundle = tiny_models.build_bundle("sd15", seed=0)
    return mods, bundle, BrightnessReward()


def _inputs(ext, sampler_name="lcm"):
    import comfy.samplers

    mods, b, reward = ext
    with torch.inference_mode():
        sigmas = mods["pso.schedules"].few_step_sigmas(b.model.get_model_object("model_sampling"), "dmd2")
        sampler = comfy.samplers.sampler_object(sampler_name)
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return b, reward, sampler, sigmas, latent


def _train(ext, sampler_name="lcm", prompts=PROMPTS, **kw):
    b, reward, sampler, sigmas, latent = _inputs(ext, sampler_name)
    args = dict(rounds=2, prompts_per_round=2, samples_per_prompt=2, tie_margin=0.0, method="pso_online",
                beta=5.0, learning_rate=1e-2, lora_rank=2, steps_per_round=1, batch_size=2, seed=0,
                checkpoint_every=0, preview_every=0, lora_target="attention")
    args.update(kw)
    with torch.inference_mode():
        return ext[0]["nodes.online_nodes"].PSOOnlineTrain.execute(
            b.model, b.clip, prompts, b.vae, reward, sampler, sigmas, latent, **args).result


def _host_node_sample(b, cond, sampler, sigmas, latent, seed):
    """The host's own SamplerCustomAdvanced(RandomNoise(seed), BasicGuider) output, as a user gets it."""
    from comfy_extras import nodes_custom_sampler as ncs

    with torch.inference_mode():
        noise = ncs.RandomNoise.execute(seed)[0]
        guider = ncs.BasicGuider.execute(b.model, cond)[0]
        return ncs.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent)[0]["samples"]


def _with_host_denoiser(b, cond, sigmas, fn):
    """Run ``fn(denoiser)`` with a HostDenoiser over the host's model_wrap (as training runs)."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Guider_Basic

    host_training = importlib.import_module("comfyui-pso.nodes.host_training")
    seen = {}

    class Capture(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas_, extra_args, callback, noise, latent_image=None,
                   denoise_mask=None, disable_pbar=False):
            seen["out"] = fn(host_training.HostDenoiser(model_wrap, extra_args))
            return noise

    with torch.inference_mode():
        guider = Guider_Basic(b.model)
        guider.set_conds(cond)
        dummy = torch.zeros(1, 4, 8, 8)
        guider.sample(dummy, dummy, Capture(), sigmas, seed=0)
    return seen["out"]


@pytest.mark.parametrize("sampler_name", ["euler_ancestral", "lcm"])
def test_round_samples_are_what_sampler_custom_advanced_gives_for_the_round_seed(ext, sampler_name):
    """online.sample_prompt through the host's model_wrap, with the running host's noise sampler (as a
    round samples, before any training), equals the host's own SamplerCustomAdvanced node with
    RandomNoise(seed) and a latent batch of K, and the recorded trajectory of the same sampling."""
    mods, b, _ = ext
    _, _, sampler, sigmas, _ = _inputs(ext, sampler_name)
    online, hs = mods["pso.online"], mods["nodes.host_sampling"]
    ms = b.model.get_model_object("model_sampling")
    policy = hs.policy_for_sampler(sampler, ms)
    with torch.inference_mode():
        cond = b.clip.encode_from_tokens_scheduled(b.clip.tokenize("a red square"))
        expected, _ = hs.sample_trajectories(
            b.model, cond, None, 1.0, sampler, sigmas, {"samples": torch.zeros(3, 4, 8, 8)}, 77)
    node_out = _host_node_sample(b, cond, sampler, sigmas, {"samples": torch.zeros(3, 4, 8, 8)}, 77)
    traj = _with_host_denoiser(b, cond, sigmas, lambda d: online.sample_prompt(
        d, torch.zeros(3, dtype=torch.long), 77, 3, torch.zeros(1, 4, 8, 8), sigmas, ms, policy,
        noise_sampler_factory=hs.host_noise_sampler))
    assert torch.equal(traj.latents, expected.latents)
    with torch.inference_mode():
        assert torch.equal(b.model.model.process_latent_out(traj.final), node_out)
    # pso's own seeding (ComfyUI before v0.8.0 / GPUs) is not what every host draws on CPU: on a
    # host that seeds CPU step noise differently the default factory must differ, on others not.
    own = _with_host_denoiser(b, cond, sigmas, lambda d: online.sample_prompt(
        d, torch.zeros(3, dtype=torch.long), 77, 3, torch.zeros(1, 4, 8, 8), sigmas, ms, policy))
    x = torch.zeros(3, 4, 8, 8)
    host_seeds_like_pso = torch.equal(hs.host_noise_sampler(x, 77)(1.0, 0.5),
                                      online.seeded_noise_sampler(x, 77)(1.0, 0.5))
    assert torch.equal(own.latents, traj.latents) == host_seeds_like_pso


def test_training_preview_is_the_hosts_sample_for_the_preview_seed(ext):
    """The preview PSO Train / PSO Online Train show is what SamplerCustomAdvanced + VAE Decode give
    the same model, prompt and seed on this host (pixel for pixel)."""
    mods, b, _ = ext
    _, _, sampler, sigmas, _ = _inputs(ext, "lcm")
    hs, training_run = mods["nodes.host_sampling"], mods["nodes.training_run"]
    ms = b.model.get_model_object("model_sampling")
    with torch.inference_mode():
        cond = b.clip.encode_from_tokens_scheduled(b.clip.tokenize("a red square"))
    node_out = _host_node_sample(b, cond, sampler, sigmas, {"samples": torch.zeros(1, 4, 8, 8)}, 31)
    image = _with_host_denoiser(b, cond, sigmas, lambda d: training_run.preview_sample(
        d, (4, 8, 8), "cpu", sigmas, hs.policy_for_sampler(sampler, ms), ms,
        b.model.model.process_latent_out, b.vae, 31))
    with torch.inference_mode():
        expected = training_run.to_pil(b.vae.decode(node_out))
    assert image.tobytes() == expected.tobytes() and image.size == expected.size
    other = _host_node_sample(b, cond, sampler, sigmas, {"samples": torch.zeros(1, 4, 8, 8)}, 32)
    with torch.inference_mode():
        assert training_run.to_pil(b.vae.decode(other)).tobytes() != image.tobytes()


def test_online_node_returns_host_types_and_a_reward_history(ext, output_dir):
    trained, lora, loss_map, rewards, summary = _train(ext, rounds=2)
    info = json.loads(summary)
    assert len(loss_map["loss"]) == 2 and len(rewards["loss"]) == 3 == len(info["reward_history"])
    assert rewards["loss"] == rewards["reward_mean"] and rewards["kept_pairs"][:2] == [2.0, 2.0]
    assert info["reward"] == "test_brightness" and info["beta"] == 5.0 and "round" in info["reward_table"]
    assert all(k.startswith("diffusion_model.") for k in lora)
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_up" in k)
    assert trained is not ext[1].model and not ext[1].model.weight_wrapper_patches
    assert list((output_dir / "pso_checkpoints").glob("run_*/step_*")), "the final checkpoint is saved"


def test_online_runs_repeat_exactly_under_a_fixed_seed(ext, output_dir):
    a, b, c = (_train(ext, seed=s) for s in (4, 4, 5))
    assert a[2]["loss"] == b[2]["loss"] and a[3] == b[3]
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert a[3]["reward_mean"] != c[3]["reward_mean"]


def test_clipped_online_method_trains(ext, output_dir):
    _, lora, loss_map, _, summary = _train(ext, method="pso_online_clipped", rounds=1, beta=50.0)
    assert json.loads(summary)["beta"] == 50.0 and "clipped_fraction" in loss_map


def test_beta_is_explicit_and_zero_is_refused_naming_both_defaults(ext, output_dir):
    defaults = ext[0]["nodes.online_nodes"].online_run.OnlineSettings()
    assert (defaults.method, defaults.beta) == ("pso_online_clipped", 50.0)
    with pytest.raises(ValueError, match=r"beta=0\.0 is invalid; it must be > 0: 50 for pso_online_clipped "
                                         r"\(the authors' code, the default\), 5 for pso_online"):
        _train(ext, beta=0.0)


def test_a_deterministic_sampler_is_refused_naming_the_methods_that_apply(ext, output_dir):
    match = r"'euler' is deterministic.*Eq\. 7.*lcm.*euler_ancestral.*pso_offline"
    with pytest.raises(ValueError, match=match):
        _train(ext, sampler_name="euler")
    assert not (output_dir / "pso_checkpoints").exists(), "nothing is started before the check"


@pytest.mark.parametrize("kw, match", [
    ({"rounds": 0}, "rounds=0"),
    ({"samples_per_prompt": 1}, "samples_per_prompt=1"),
    ({"tie_margin": -1.0}, "tie_margin=-1.0"),
    ({"learning_rate": 0.0}, "learning_rate=0.0"),
    ({"method": "pso_offline"}, "method 'pso_offline' is unknown.*pso_online"),
    ({"prompts": "  \n \n"}, "prompts is empty"),
    ({"reward": object()}, "reward input is a object, not a PSO_REWARD"),
])
def test_bad_inputs_are_refused_with_the_value_named(ext, output_dir, kw, match):
    reward = kw.pop("reward", None)
    if reward is not None:
        b, _, sampler, sigmas, latent = _inputs(ext)
        with pytest.raises(ValueError, match=match), torch.inference_mode():
            ext[0]["nodes.online_nodes"].PSOOnlineTrain.execute(
                b.model, b.clip, PROMPTS, b.vae, reward, sampler, sigmas, latent, 1, 2, 2, 0.0, "pso_online",
                5.0, 1e-2, 2, 1, 2, 0, 0, 0, "attention")
    else:
        with pytest.raises(ValueError, match=match):
            _train(ext, **kw)
    assert not (output_dir / "pso_checkpoints").exists()


def test_one_step_sigmas_are_refused(ext, output_dir):
    b, reward, sampler, sigmas, latent = _inputs(ext)
    one = torch.stack([sigmas[0], sigmas[-1]])
    with pytest.raises(ValueError, match="fewer than 2 steps"), torch.inference_mode():
        ext[0]["nodes.online_nodes"].PSOOnlineTrain.execute(
            b.model, b.clip, PROMPTS, b.vae, reward, sampler, one, latent, 1, 2, 2, 0.0, "pso_online", 5.0,
            1e-2, 2, 1, 2, 0, 0, 0, "attention")


def test_first_step_weight_adds_the_first_steps_shift_and_the_default_trains_the_papers_loss(ext, output_dir):
    """first_step_weight > 0 adds the first-step shift to the loss (reported per step); the default 0
    trains Eq. 7 as written. The LoRA starts at zero, so step 1 has no shift and the same loss as the
    paper's; once trained (step 2) the model's first prediction has moved and the shift counts."""
    held = _train(ext, rounds=2, seed=3, first_step_weight=0.01)
    plain = _train(ext, rounds=2, seed=3)
    assert json.loads(held[4])["settings"]["first_step_weight"] == 0.01
    assert json.loads(plain[4])["settings"]["first_step_weight"] == 0.0
    assert "first_step_shift" not in plain[2]
    assert held[2]["first_step_shift"][0] == 0 and held[2]["loss"][0] == plain[2]["loss"][0]
    assert held[2]["first_step_shift"][1] > 0
    assert held[2]["loss"][1] > held[2]["pairwise_loss"][1]
    with pytest.raises(ValueError, match=r"first_step_weight=-1.0 is invalid; it must be >= 0"):
        _train(ext, first_step_weight=-1.0)


def test_a_stopped_online_run_resumes_from_its_round_checkpoint_as_if_never_stopped(ext, output_dir):
    """Two rounds, then resume_from that run with rounds=3: the same LoRA, losses and reward history as
    one uninterrupted 3-round run (a checkpoint at every round's end holds adapter, optimizer, RNG,
    round and reward history; the next round is sampled from the restored model)."""
    whole = _train(ext, rounds=3, seed=6)
    first = _train(ext, rounds=2, seed=6)
    run = json.loads(first[4])["run"]
    assert sorted(p.name for p in (output_dir / "pso_checkpoints" / run).glob("step_*")) == \
        ["step_000001", "step_000002"], "a checkpoint per round (steps_per_round=1)"
    resumed = _train(ext, rounds=3, seed=6, resume_from=run)
    assert resumed[2]["loss"] == whole[2]["loss"]
    assert resumed[3]["reward_mean"] == whole[3]["reward_mean"]
    assert all(torch.equal(resumed[1][k], whole[1][k]) for k in whole[1])
    info = json.loads(resumed[4])
    assert info["steps_trained"] == 3 and info["steps_this_run"] == 1 and info["run"] == run


@pytest.mark.parametrize("kw, match", [
    ({"samples_per_prompt": 3}, r"other inputs \(samples_per_prompt: run '2', now '3'\)"),
    ({"prompts": "a red square\na green circle"}, r"other inputs \(prompts_sha256"),
    ({"rounds": 2}, r"already at step 2 \(round 2\).*rounds is the new total"),
    ({"resume_from": "../elsewhere"}, "must be a run folder name"),
])
def test_online_resume_refuses_what_would_not_continue_the_run(ext, output_dir, kw, match):
    run = json.loads(_train(ext, rounds=2, seed=2)[4])["run"]
    kw = {"rounds": 3, "seed": 2, "resume_from": run, **kw}
    before = sorted((output_dir / "pso_checkpoints" / run).iterdir())
    with pytest.raises(ValueError, match=match):
        _train(ext, **kw)
    assert sorted((output_dir / "pso_checkpoints" / run).iterdir()) == before, "nothing is touched"
