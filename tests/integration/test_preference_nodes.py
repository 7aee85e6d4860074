"""PSO Preference Pairs in-process on the tiny SD1.5 fixture: pairs from two image batches -> PSO Train.

Facts checked: the pairs' latents are the model's own encoding of the two batches (independently
recomputed), prompts per line or shared, every refused input with its message, and that PSO Train
trains on the pairs with pso_offline and refuses pso_full naming pso_offline.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from extension_loader import load_package


@pytest.fixture(scope="module")
def ext(comfy_inprocess):
    load_package()
    return {m: importlib.import_module(f"comfyui-pso.nodes.{m}") for m in ("preference_nodes", "train_nodes")}


@pytest.fixture(scope="module")
def setup(ext):
    from pso.schedules import few_step_sigmas
    from pso_test_fixtures import tiny_models

    with torch.inference_mode():
        b = tiny_models.build_bundle("sd15", seed=5)
        g = torch.Generator().manual_seed(0)
        preferred = torch.rand(3, 64, 64, 3, generator=g)
        rejected = torch.rand(3, 64, 64, 3, generator=g)
        sigmas = few_step_sigmas(b.model.get_model_object("model_sampling"), "dmd2")
    return b, preferred, rejected, sigmas


def _pairs(ext, b, preferred, rejected, prompt, sigmas):
    with torch.inference_mode():
        return ext["preference_nodes"].PSOPreferencePairs.execute(
            b.model, b.clip, b.vae, preferred, rejected, prompt, sigmas).result[0]


def test_pairs_are_the_encoded_images_with_one_shared_prompt(ext, setup):
    b, preferred, rejected, sigmas = setup
    pairs = _pairs(ext, b, preferred, rejected, "  a red circle \n", sigmas)
    with torch.inference_mode():
        want_t = b.model.model.process_latent_in(b.vae.encode(preferred).float().cpu())
        want_r = b.model.model.process_latent_in(b.vae.encode(rejected).float().cpu())
    assert len(pairs) == 3 and pairs.target.shape == (3, 4, 8, 8)
    torch.testing.assert_close(pairs.target, want_t)
    torch.testing.assert_close(pairs.reference, want_r)
    assert not pairs.target.is_inference() and not pairs.reference.is_inference()
    assert pairs.reference_traj is None and pairs.policy == "euler"
    assert pairs.prompts == ["a red circle"] and pairs.prompt_index.tolist() == [0, 0, 0]
    assert len(pairs.conds) == 1 and torch.equal(pairs.sigmas, sigmas.cpu()) and pairs.sigmas.shape == (5,)
    assert pairs.fingerprint["model_class"] == "BaseModel" and pairs.fingerprint["latent_height"] == 8


def test_one_prompt_line_per_pair(ext, setup):
    b, preferred, rejected, sigmas = setup
    pairs = _pairs(ext, b, preferred, rejected, "a cat\n\na dog\na cat\n", sigmas)
    assert pairs.prompts == ["a cat", "a dog"] and pairs.prompt_index.tolist() == [0, 1, 0]
    with torch.inference_mode():
        cond = ext["preference_nodes"].pairing.encode_prompt(b.clip, "a dog")
    assert torch.equal(pairs.conds[1][0][0], cond[0][0])


def test_mismatched_inputs_are_refused_with_the_counts_named(ext, setup):
    b, preferred, rejected, sigmas = setup
    with pytest.raises(ValueError, match=r"3 preferred image\(s\) but 2 rejected image\(s\)"):
        _pairs(ext, b, preferred, rejected[:2], "x", sigmas)
    with pytest.raises(ValueError, match="preferred images are 64x64 but rejected images 56x64"):
        _pairs(ext, b, preferred, rejected[:, :, :56], "x", sigmas)
    with pytest.raises(ValueError, match=r"prompt has 2 non-empty line\(s\) but there are 3 pair\(s\)"):
        _pairs(ext, b, preferred, rejected, "a\nb", sigmas)
    with pytest.raises(ValueError, match=r"prompt has 0 non-empty line\(s\)"):
        _pairs(ext, b, preferred, rejected, " \n", sigmas)
    with pytest.raises(ValueError, match="multiple of"):  # the shared VAE-grid check of the target nodes
        _pairs(ext, b, preferred[:, :60, :60], rejected[:, :60, :60], "x", sigmas)


def _train(ext, b, pairs, method):
    with torch.inference_mode():
        return ext["train_nodes"].PSOTrain.execute(
            b.model, pairs, method, 2, 1e-2, 50.0, 4, 2, 1, 0, 0, "float32", False, 0, 0, "attention").result


def test_train_runs_pso_offline_and_refuses_pso_full(ext, setup, output_dir):
    b, preferred, rejected, sigmas = setup
    pairs = _pairs(ext, b, preferred, rejected, "a red circle", sigmas)
    trained, lora, loss_map, summary = _train(ext, b, pairs, "pso_offline")
    assert len(loss_map["loss"]) == 2 and all(torch.isfinite(torch.tensor(loss_map["loss"])))
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_up" in k)
    info = json.loads(summary)
    assert info["method"] == "pso_offline" and info["sampler_policy"] == "euler"
    assert trained is not b.model
    with pytest.raises(ValueError, match=r"'pso_full' needs a stochastic.*'pso_offline'"):
        _train(ext, b, pairs, "pso_full")


def test_refreshing_would_overwrite_preference_images_and_is_refused(ext, setup, output_dir):
    b, preferred, rejected, sigmas = setup
    pairs = _pairs(ext, b, preferred, rejected, "a red circle", sigmas)
    with torch.inference_mode(), pytest.raises(ValueError, match="set reference_refresh_every to 0"):
        ext["train_nodes"].PSOTrain.execute(
            b.model, pairs, "pso_offline", 2, 1e-2, 50.0, 4, 2, 1, 0, 5, "float32", False, 0, 0, "attention")
    assert not (output_dir / "pso_checkpoints").exists()
