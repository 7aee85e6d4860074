"""The newer few-step families (Z-Image-Turbo, Qwen-Image, SD3.5, Wan 2.2 TI2V-5B video, FLUX.2) on
tiny models built through the host's own classes: offline PSO trains through the host, PSO Save LoRA
writes a file the stock LoraLoader maps key for key and that reproduces the trained model, and PSO
Few-Step Sigmas gives each family's preset on its own flow sampling."""

from __future__ import annotations

import importlib
import json
import logging

import pytest
import safetensors
import torch

from extension_loader import load_package
from pso import families

#: tiny family -> (the host's config class name, its Few-Step Sigmas preset or None)
ROWS = {"zimage": ("ZImage", "zimage_turbo_8"), "qwen_image": ("QwenImage", "qwen_lightning_4"),
        "sd3": ("SD3", "sd35_turbo_4"), "wan22": ("WAN22_T2V", "wan_lightning_4"), "flux2": ("Flux2", None)}


@pytest.fixture(scope="module")
def ext(comfy_inprocess):
    load_package()

    class Ext:
        nodes = importlib.import_module("comfyui-pso.nodes.lora_nodes")
        schedule_nodes = importlib.import_module("comfyui-pso.nodes.schedule_nodes")
        host = importlib.import_module("comfyui-pso.nodes.host_training")
        lora = importlib.import_module("comfyui-pso.pso.lora")

    return Ext


def _sample(model, cond, sigmas, shape, seed=3):
    """The host's own sampling (comfy.sample.sample_custom, euler) on the given sigmas."""
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros((1, *shape))
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas,
                                          cond, cond, latent, seed=seed, disable_pbar=True)


def _train(ext, model, conds, shape, sigmas, steps=3):
    from pso.methods import MethodConfig, PairBatch
    from pso.trainer import TrainConfig

    g = torch.Generator().manual_seed(0)
    targets, refs = torch.randn(4, *shape, generator=g), torch.randn(4, *shape, generator=g) * 2
    prompt_of = torch.tensor([0, 1, 0, 1])

    def batch_source(step, generator):
        idx = torch.randperm(4, generator=generator)[:2]
        return PairBatch(target=targets[idx], reference=refs[idx], cond=prompt_of[idx])

    run = ext.host.HostRun(method=MethodConfig("pso_offline", beta=50.0),
                           train_config=TrainConfig(steps=steps, lr=3e-2, seed=1), sigmas=sigmas,
                           batch_source=batch_source)
    config = ext.lora.LoRAConfig(rank=4, target="attention_mlp")
    return ext.host.train_on_host(model, conds, shape, run, config, seed=2)


@pytest.mark.parametrize("tiny", list(ROWS))
def test_a_family_trains_saves_and_loads_back_in_the_stock_loader(ext, loras, tiny, caplog):
    import comfy.lora
    import comfy.samplers

    import nodes as comfy_nodes  # ComfyUI's nodes.py
    from pso_test_fixtures import tiny_families

    config, preset = ROWS[tiny]
    with torch.inference_mode():
        model = tiny_families.build_model(tiny, seed=1)
    assert type(model.model.model_config).__name__ == config
    row = families.FAMILIES[config]
    assert type(model.model).__name__ == row.model_class
    shape = tiny_families.LATENT_SHAPES[tiny]
    assert len(shape) + 1 == row.latent_dims
    conds = tiny_families.conditioning(tiny)

    if preset is None:
        ms = model.get_model_object("model_sampling")
        sigmas = comfy.samplers.calculate_sigmas(ms, "simple", 4).float()
    else:
        sigmas = ext.schedule_nodes.PSOFewStepSigmas.execute(model, preset).result[0]
        steps = next(p.steps for p in row.schedules if p.name == preset)
        assert sigmas.shape == (steps + 1,) and float(sigmas[0]) == pytest.approx(1.0)
        assert float(sigmas[-1]) == 0.0 and bool((sigmas[:-1] > sigmas[1:]).all())
    train_sigmas = sigmas if len(sigmas) <= 5 else sigmas[::2]  # 4 steps of an 8-step preset

    trained, net, result = _train(ext, model, conds, shape, train_sigmas)
    assert all(torch.isfinite(torch.tensor(result.loss_history)))
    # the adapter sits on the family's attention / feed-forward layers, as the table lists them (a target
    # name matches the union over all families: Qwen-Image's top-level proj_out has the UNets' name)
    def ends_with(path, suffixes):
        return any(tuple(path.split("."))[-len(s):] == s for s in suffixes)

    assert all(ends_with(p, families.attention_suffixes() + families.mlp_suffixes()) for p in net.paths)
    own = [p for p in net.paths if ends_with(p, row.attention + row.mlp)]
    assert len(own) >= len(net.paths) - 1 and any(ends_with(p, row.attention) for p in own), net.paths

    base_out, trained_out = _sample(model, conds[0], train_sigmas, shape), _sample(trained, conds[0],
                                                                                  train_sigmas, shape)
    gap = (trained_out - base_out).abs().max().item()
    assert gap > 1e-4, f"training changed nothing measurable ({gap})"

    name = ext.nodes.PSOSaveLoRA.execute(ext.host.lora_model_dict(net), model, f"pso/{tiny}", None).result[0]
    with safetensors.safe_open(str(loras / name), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    assert meta["pso.key_naming"] == row.naming == "kohya_ldm"
    assert meta["modelspec.architecture"] == f"{row.architecture}/lora"
    assert json.loads(meta["pso.base_fingerprint"])["model_config"] == config
    assert all(k.startswith("lora_unet_") for k in tensors)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(tensors, key_map, log_missing=False)
    assert set(patches) == {f"diffusion_model.{p}.weight" for p in net.paths}

    with caplog.at_level(logging.WARNING):
        stock = comfy_nodes.LoraLoader().load_lora(model, None, name, 1.0, 0.0)[0]
    assert "not loaded" not in caplog.text.lower(), caplog.text
    err = (_sample(stock, conds[0], train_sigmas, shape) - trained_out).abs().max().item()
    print(f"\n{config}: {len(net.paths)} LoRA layers, training moved the sample by {gap:.3e}, "
          f"stock LoraLoader vs trained {err:.2e}")
    assert err <= 1e-4 * max(1.0, gap), (err, gap)


def _build(tiny):
    from pso_test_fixtures import tiny_families, tiny_models

    if tiny in tiny_families.FAMILIES:
        return (tiny_families.build_model(tiny, seed=1), tiny_families.LATENT_SHAPES[tiny],
                tiny_families.conditioning(tiny))
    bundle = tiny_models.build_bundle(tiny, seed=1)
    conds = [bundle.clip.encode_from_tokens_scheduled(bundle.clip.tokenize(p)) for p in ("a circle", "a cat")]
    return bundle.model, (tiny_models.LATENT_CHANNELS[tiny], 8, 8), conds


#: Known bug, on main before the new families too: on the FLUX models (in-place residuals, whose saved
#: activations a saved-tensor hook copies) the recomputed forward of a checkpointed block saves other
#: tensors than the first forward did, and torch refuses it (CheckpointError, loud: never a silently
#: wrong gradient); PSO Train refuses the setting there. Strict: a fix shows up.
_CHECKPOINT_BUG = pytest.mark.xfail(strict=True, reason="FLUX blocks under gradient checkpointing: torch "
                                    "CheckpointError (recomputed tensors differ)")


_CONFIGS = {**{t: c for t, (c, _) in ROWS.items()}, "flux": "FluxSchnell", "sd15": "SD15"}
_CHECKPOINT_CASES = [pytest.param(t, marks=() if families.checkpointing_works(c) else _CHECKPOINT_BUG)
                     for t, c in _CONFIGS.items()]


@pytest.mark.parametrize("tiny", _CHECKPOINT_CASES)
def test_gradient_checkpointing_on_the_family_s_blocks_trains_the_same_adapter(ext, tiny):
    """The table's checkpoint blocks wrap real top-level blocks of each family, and recomputing them in
    backward (in-place residuals handled as the table says) gives the same adapter after two steps."""
    import comfy.samplers

    training_run = importlib.import_module("comfyui-pso.nodes.training_run")
    with torch.inference_mode():
        model, shape, conds = _build(tiny)
    unet = model.get_model_object("diffusion_model")
    blocks = [p for p, m in unet.named_modules() if p and training_run.checkpoint_predicate(p, m)]
    assert blocks, f"no checkpoint block of {tiny} matches the table"
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 4).float()
    from pso.methods import MethodConfig, PairBatch
    from pso.trainer import TrainConfig

    g = torch.Generator().manual_seed(0)
    target, reference = torch.randn(2, *shape, generator=g), torch.randn(2, *shape, generator=g)
    batch = PairBatch(target=target, reference=reference, cond=torch.tensor([0, 1]))

    def checkpoint_blocks(clone):
        return ext.lora.enable_gradient_checkpointing(clone.get_model_object("diffusion_model"),
                                                      training_run.checkpoint_predicate)

    results = []
    for checkpointing in (True, False):
        run = ext.host.HostRun(method=MethodConfig("pso_offline", beta=50.0),
                               train_config=TrainConfig(steps=2, lr=3e-2, seed=1), sigmas=sigmas,
                               batch_source=lambda step, gen: batch,
                               setup=checkpoint_blocks if checkpointing else None)
        config = ext.lora.LoRAConfig(rank=2, target="attention_mlp")
        _, net, _ = ext.host.train_on_host(model, conds, shape, run, config, seed=2)
        results.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    checkpointed, plain = results
    assert any(v.abs().max() > 0 for k, v in plain.items() if k.startswith("up."))  # it trained
    for key, value in plain.items():
        assert torch.allclose(value, checkpointed[key], atol=1e-6), key


@pytest.mark.parametrize("tiny", list(_CONFIGS))
def test_pso_train_refuses_gradient_checkpointing_where_the_table_says_it_fails(ext, tiny):
    training_run = importlib.import_module("comfyui-pso.nodes.training_run")
    with torch.inference_mode():
        model = _build(tiny)[0]
    training_run.check_gradient_checkpointing(model, False)  # off: always fine
    if families.checkpointing_works(_CONFIGS[tiny]):
        training_run.check_gradient_checkpointing(model, True)
    else:
        expected = rf"gradient_checkpointing is not available for {_CONFIGS[tiny]}"
        with pytest.raises(ValueError, match=expected):
            training_run.check_gradient_checkpointing(model, True)


def test_a_decoded_video_previews_as_a_strip_of_its_frames(ext):
    training_run = importlib.import_module("comfyui-pso.nodes.training_run")
    frames = torch.stack([torch.full((4, 6, 3), v) for v in (0.0, 0.5, 1.0)])  # (T, H, W, C)
    image = training_run.to_pil(frames[None])  # a video VAE's (B, T, H, W, C)
    assert image.size == (18, 4)  # three 6-wide frames side by side
    assert [image.getpixel((x, 0))[0] for x in (0, 6, 12)] == [0, 128, 255]
    still = training_run.to_pil(frames[:1])  # an IMAGE batch (B, H, W, C) stays one image
    assert still.size == (6, 4)


@pytest.mark.parametrize("tiny", ["wan22", "qwen_image", "zimage"])
def test_pso_train_node_trains_a_new_family_from_pairs(ext, tiny, output_dir):
    """The PSO Train node itself (pairs, batches, checkpoints, summary) on a family's latents: 5-D video
    latents for Wan 2.2, Qwen-Image's one-frame 5-D latents, Z-Image's 4-D ones."""
    from types import SimpleNamespace

    from tiny_training import train_node

    from pso_test_fixtures import tiny_families

    train_nodes = importlib.import_module("comfyui-pso.nodes.train_nodes")
    types = importlib.import_module("comfyui-pso.nodes.types")
    config, preset = ROWS[tiny]
    with torch.inference_mode():
        model = tiny_families.build_model(tiny, seed=1)
        sigmas = ext.schedule_nodes.PSOFewStepSigmas.execute(model, preset).result[0]
    shape = tiny_families.LATENT_SHAPES[tiny]
    g = torch.Generator().manual_seed(0)
    target, reference = torch.randn(4, *shape, generator=g), torch.randn(4, *shape, generator=g)
    pairs = types.PairSet(target=target, reference=reference, reference_traj=None,
                          prompt_index=torch.tensor([0, 1, 0, 1]), prompts=["a", "b"],
                          conds=tiny_families.conditioning(tiny), sigmas=sigmas, policy="euler")
    trained, lora, loss_map, summary = train_node(train_nodes, SimpleNamespace(model=model), pairs, steps=2,
                                                  reference_refresh_every=0)
    assert len(loss_map["loss"]) == 2 and all(torch.isfinite(torch.tensor(loss_map["loss"])))
    assert json.loads(summary)["sigmas"] == pytest.approx(sigmas.tolist(), abs=1e-6)
    assert lora and all(k.startswith("diffusion_model.") for k in lora)
    assert list((output_dir / "pso_checkpoints").glob("run_*/step_*")), "the final checkpoint is saved"


@pytest.mark.parametrize("tiny", list(_CONFIGS))
def test_training_the_same_model_twice_trains_the_same_adapter(ext, tiny):
    """A second PSO run on the same MODEL (queueing the graph again) while the first run's clone is
    still patched in: before the fix, FLUX's plain parameters (q/k norm scales) were then left as the
    loader's inference tensors and the run failed ("Inference tensors cannot be saved for backward")."""
    import comfy.samplers

    from pso.methods import MethodConfig, PairBatch
    from pso.trainer import TrainConfig

    with torch.inference_mode():
        model, shape, conds = _build(tiny)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 4).float()
    g = torch.Generator().manual_seed(0)
    target, reference = torch.randn(2, *shape, generator=g), torch.randn(2, *shape, generator=g)
    batch = PairBatch(target=target, reference=reference, cond=torch.tensor([0, 1]))
    runs = []
    for _ in range(2):
        run = ext.host.HostRun(method=MethodConfig("pso_offline", beta=50.0),
                               train_config=TrainConfig(steps=2, lr=3e-2, seed=1), sigmas=sigmas,
                               batch_source=lambda step, gen: batch)
        config = ext.lora.LoRAConfig(rank=2, target="attention_mlp")
        _, net, result = ext.host.train_on_host(model, conds, shape, run, config, seed=2)
        runs.append((result.loss_history, {k: v.detach().clone() for k, v in net.state_dict().items()}))
    (loss_a, a), (loss_b, b) = runs
    assert loss_a == loss_b and loss_a[1] < loss_a[0], (loss_a, loss_b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_target_images_through_a_video_vae_are_one_frame_clips_each(ext):
    """Qwen-Image and Wan use a video VAE, which reads an IMAGE batch as the frames of one clip (three
    images -> ONE latent frame: two of them lost). PSO Target Images encodes each image alone."""
    from pso_test_fixtures import tiny_families

    target_nodes = importlib.import_module("comfyui-pso.nodes.target_nodes")
    vae = tiny_families.build_video_vae(seed=0)
    pixels = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    assert vae.encode(pixels).shape == (1, 16, 1, 8, 8)  # the host's reading of a batch
    targets = target_nodes.PSOTargetImagesFromBatch.execute(pixels, vae, "a red square").result[0]
    assert targets.latents.shape == (3, 16, 1, 8, 8)
    for i in range(3):
        alone = vae.encode(pixels[i:i + 1]).float()
        assert torch.allclose(targets.latents[i:i + 1], alone, atol=1e-5), i
    assert not torch.allclose(targets.latents[0], targets.latents[1])


@pytest.mark.parametrize("node", ["references", "train", "online"])
def test_wan21_t2v_and_the_wan22_a14b_experts_are_refused_naming_the_supported_model(ext, node):
    """The host loads Wan 2.1 T2V and each Wan 2.2 A14B expert as WAN21_T2V (one class, PSO cannot tell
    them apart); an expert trained alone would learn from references the two-expert sampler never makes,
    so PSO Sample References and both training nodes refuse it before sampling or training anything,
    naming the Wan 2.2 model PSO trains."""
    from pso_test_fixtures import tiny_families

    with torch.inference_mode():
        model = tiny_families.build_model("wan21", seed=1)
    assert type(model.model.model_config).__name__ == "WAN21_T2V"
    assert type(model.model).__name__ == families.FAMILIES["WAN21_T2V"].model_class
    if node == "references":  # the first PSO node of a graph to get the MODEL: nothing is sampled
        nodes = importlib.import_module("comfyui-pso.nodes.data_nodes")
        call, name = (lambda: nodes.PSOSampleReferences.execute(model, None, None, None, None, 0, 1)), \
            "PSO Sample References"
    elif node == "train":
        nodes = importlib.import_module("comfyui-pso.nodes.train_nodes")
        call, name = (lambda: nodes.PSOTrain.execute(model, None, "pso_offline", 2, 1e-4, 10.0, 4, 1, 1, 0, 0,
                                                      "float32", False, 0, 0, "attention")), "PSO Train"
    else:
        nodes = importlib.import_module("comfyui-pso.nodes.online_nodes")
        call, name = (lambda: nodes.PSOOnlineTrain.execute(
            model, None, "", None, None, None, None, None, 1, 1, 2, 0.0, "pso_online", 5.0, 1e-4, 4, 1, 1, 0,
            0, 0, "attention")), "PSO Online Train"
    with pytest.raises(ValueError, match=rf"{name}: ComfyUI loads Wan 2\.1 T2V and each expert of Wan 2\.2 "
                       r"A14B .* as WAN21_T2V.*train TI2V-5B \(wan2\.2_ti2v_5B_fp16\.safetensors"):
        call()
