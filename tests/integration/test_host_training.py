"""PSO training through the real host classes: a LoRA trained on the user's MODEL (cloned, never
modified) reproduces its predictions after a round trip through ComfyUI's own LoRA loading."""

from __future__ import annotations

import importlib
import logging

import pytest
import tiny_training
import torch

from extension_loader import load_package


@pytest.fixture(scope="module")
def host(comfy_inprocess):
    load_package()
    return importlib.import_module("comfyui-pso.nodes.host_training")


@pytest.fixture(scope="module")
def bundle(comfy_inprocess):
    from pso_test_fixtures import tiny_models

    with torch.inference_mode():  # as a loader node builds it inside the host
        return tiny_models.build_bundle("sd15", seed=4)


def _train(host, bundle, steps=6, lr=3e-2):
    with torch.inference_mode():
        conds = [bundle.clip.encode_from_tokens_scheduled(bundle.clip.tokenize(p))
                 for p in ("a red circle", "a blue square")]
    events = []
    trained, net, result = tiny_training.train_lora(
        host, importlib.import_module("comfyui-pso.pso.lora"), bundle, conds, steps, lr,
        callback=lambda event, denoiser: events.append(event))
    return trained, net, result, conds, events


def test_training_leaves_the_users_model_unchanged_and_reports_every_step(host, bundle):
    before = {k: v.clone() for k, v in bundle.model.model.diffusion_model.state_dict().items()}
    trained, net, result, conds, events = _train(host, bundle)
    after = bundle.model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not bundle.model.weight_wrapper_patches, "the user's ModelPatcher got the adapter"
    assert len(result.loss_history) == 6 and all(torch.isfinite(torch.tensor(result.loss_history)))
    assert [e.step for e in events if e.phase == "step"] == list(range(1, 7))
    assert max(p.abs().max().item() for n, p in net.named_parameters() if "up" in n) > 0


def test_saved_lora_reproduces_the_trained_model_through_the_host_loader(host, bundle, caplog):
    import comfy.sd

    trained, net, result, conds, _ = _train(host, bundle)
    base_out = tiny_training.sample(bundle.model, conds[0])
    trained_out = tiny_training.sample(trained, conds[0])
    gap = (trained_out - base_out).abs().max().item()
    assert gap > 1e-3, f"training changed nothing measurable (gap {gap}); the round trip would be vacuous"
    lora = host.lora_model_dict(net)
    with caplog.at_level(logging.WARNING):
        loaded, _ = comfy.sd.load_lora_for_models(bundle.model, None, lora, 1.0, 0.0)
    assert "not loaded" not in caplog.text, caplog.text
    loaded_out = tiny_training.sample(loaded, conds[0])
    assert torch.allclose(loaded_out, trained_out, atol=1e-4 * max(1.0, gap), rtol=1e-4), (
        (loaded_out - trained_out).abs().max().item(), gap)


def test_text_encoder_is_unloaded_while_training(host, bundle):
    import comfy.model_management as mm

    with torch.inference_mode():
        conds = [bundle.clip.encode_from_tokens_scheduled(bundle.clip.tokenize("a red circle"))]
    assert any(m.model is bundle.clip.patcher for m in mm.current_loaded_models), "CLIP was never loaded"
    seen = []
    lora = importlib.import_module("comfyui-pso.pso.lora")
    tiny_training.train_lora(host, lora, bundle, conds * 2, steps=2,
                             callback=lambda e, d: seen.append([m.model for m in mm.current_loaded_models]))
    assert seen and all(bundle.clip.patcher not in loaded for loaded in seen)


@pytest.mark.parametrize("vram", ["NO_VRAM", "LOW_VRAM"])
def test_training_under_lowvram_partial_loading_matches_a_full_load(host, bundle, monkeypatch, vram):
    """--novram / --lowvram: the host loads the model partially and casts weights per layer, calling
    the LoRA's weight wrappers from its cast path. On a CPU device the host always loads fully, so
    the test makes it treat the CPU as a low-memory accelerator (free memory 1 MB: almost every
    layer is left to the per-use cast path) and checks that training computes the same thing."""
    import comfy.model_management as mm

    _, full_net, full, _, _ = _train(host, bundle, steps=3)
    mm.unload_all_models()
    loads = []
    real_load = mm.LoadedModel.model_load

    def spy(self, lowvram_model_memory=0, force_patch_weights=False):
        loads.append(lowvram_model_memory)
        return real_load(self, lowvram_model_memory, force_patch_weights)

    monkeypatch.setattr(mm, "vram_state", getattr(mm.VRAMState, vram))
    monkeypatch.setattr(mm, "is_device_cpu", lambda device: False)
    # Only the loader sees 1 MB free; attention (which asks with torch_free_too) sees plenty, as on
    # a GPU: the host's sub-quadratic CPU attention takes an autograd-less chunked path when short.
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False:
                        (1 << 34, 1 << 34) if torch_free_too else 1 << 20)
    monkeypatch.setattr(mm.LoadedModel, "model_load", spy)
    try:
        _, low_net, low, _, _ = _train(host, bundle, steps=3)
        partial = [m for m in mm.current_loaded_models if m.model.model.model_lowvram]
    finally:
        monkeypatch.undo()
        mm.unload_all_models()
    assert loads and 0 < loads[-1] < 1 << 20, f"the host did not load partially: {loads}"
    assert partial, "no model was left partially loaded (lowvram) during training"
    assert low.loss_history == pytest.approx(full.loss_history, rel=1e-5, abs=1e-6)
    for (name, a), (_, b) in zip(full_net.named_parameters(), low_net.named_parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_fp8_weights_train_and_the_lora_reproduces_the_trained_fp8_model(host, comfy_inprocess):
    """fp8 base weights (Load Diffusion Model, weight_dtype fp8_e4m3fn): the host casts each weight to
    the compute dtype and the LoRA's weight wrapper adds its delta there, so training works and the
    adapter is trained in float32. (Measured: gap 75, reload error 6.3 = 8% of it.)"""
    import comfy.sd

    from pso_test_fixtures import tiny_models

    with torch.inference_mode():
        b = tiny_models.build_bundle("sd15", seed=4)
        b.model = tiny_models.build_model("sd15", seed=4, weight_dtype=torch.float8_e4m3fn)
    weights = b.model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight
    assert weights.dtype == torch.float8_e4m3fn
    trained, net, result, conds, _ = _train(host, b, steps=4)
    assert all(torch.isfinite(torch.tensor(result.loss_history)))
    assert all(p.dtype == torch.float32 for p in net.parameters())
    base_out, trained_out = tiny_training.sample(b.model, conds[0]), tiny_training.sample(trained, conds[0])
    gap = (trained_out - base_out).abs().max().item()
    assert gap > 1e-3, gap
    loaded, _ = comfy.sd.load_lora_for_models(b.model, None, host.lora_model_dict(net), 1.0, 0.0)
    # The stock loader merges W + delta and rounds the sum back to fp8 (3 mantissa bits, ~6% steps),
    # while training added delta to the cast weight: the reload is exact only up to that rounding.
    err = (tiny_training.sample(loaded, conds[0]) - trained_out).abs().max().item()
    assert err < 0.15 * gap, (err, gap)


class _GGUFStyleWeight(torch.nn.Parameter):
    """Storage as ComfyUI-GGUF keeps it: raw quantised bytes plus the GGML type and the real shape."""

    class _Q4K:
        name = "Q4_K"

    tensor_type = _Q4K()
    tensor_shape = torch.Size([64, 64])


@pytest.mark.parametrize("kind", ["gguf", "uint8"])
def test_quantised_base_weights_are_refused_with_what_to_load_instead(host, comfy_inprocess, kind):
    from pso_test_fixtures import tiny_models

    lora = importlib.import_module("comfyui-pso.pso.lora")
    with torch.inference_mode():
        model = tiny_models.build_model("sd15", seed=1)
    attn = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    packed = torch.zeros(64 * 64 // 2, dtype=torch.uint8)
    attn.weight = (_GGUFStyleWeight(packed, requires_grad=False) if kind == "gguf"
                   else torch.nn.Parameter(packed, requires_grad=False))
    msg = r"GGUF-quantised weights .*attn1\.to_q\.weight: Q4_K.*Load the fp16/bf16" if kind == "gguf" \
        else r"to_q\.weight as torch\.uint8.*Load the fp16/bf16 or fp8"
    with pytest.raises(ValueError, match=msg):
        host.attach_lora(model, lora.LoRAConfig(rank=2), torch.Generator().manual_seed(0))
    assert not model.weight_wrapper_patches


def test_a_run_that_fails_mid_training_leaves_the_users_model_predicting_as_before(host, bundle):
    """An error inside training (here raised by the progress callback, as Cancel does) must not leave
    the clone's weight wrappers or object patches on the shared module the user's MODEL samples with."""
    with torch.inference_mode():
        conds = [bundle.clip.encode_from_tokens_scheduled(bundle.clip.tokenize(p))
                 for p in ("a red circle", "a blue square")]
    before = tiny_training.sample(bundle.model, conds[0])

    def fail(event, denoiser):
        if event.phase == "step" and event.step == 2:
            raise RuntimeError("stop here")

    lora = importlib.import_module("comfyui-pso.pso.lora")
    with pytest.raises(RuntimeError, match="stop here"):
        tiny_training.train_lora(host, lora, bundle, conds, steps=4, lr=3e-1, callback=fail)
    assert torch.equal(tiny_training.sample(bundle.model, conds[0]), before)


def test_training_does_not_depend_on_the_base_weights_requires_grad_flags(host, comfy_inprocess):
    """ComfyUI v0.30+ builds diffusion models with ``requires_grad_(False)``, 0.3.75 left them True.
    PSO trains only its LoRA parameters either way: the same LoRA comes out, the loss moves, and the
    base weights keep the flags they had."""
    from pso_test_fixtures import tiny_models

    loras, flags_after = [], []
    for flag in (True, False):
        b = tiny_models.build_bundle("sd15", seed=4)  # outside inference mode: flags can be set
        unet = b.model.model.diffusion_model
        unet.requires_grad_(flag)
        _, net, result, _, _ = _train(host, b, steps=3)
        loras.append(host.lora_model_dict(net))
        flags_after.append({p.requires_grad for p in unet.parameters()})
        assert result.loss_history[0] != result.loss_history[-1], result.loss_history
    assert flags_after == [{True}, {False}]
    assert loras[0].keys() == loras[1].keys()
    assert all(torch.equal(loras[0][k], loras[1][k]) for k in loras[0])
    assert any(v.abs().max() > 0 for k, v in loras[1].items() if "lora_up" in k)


def _sample_int8(model, cond, seed=3):
    """tiny_training.sample without inference mode: ComfyUI 0.33 on CPU cannot move int8
    QuantizedTensor weights under inference mode ("Cannot set version_counter for inference
    tensor" in comfy/ops.py's _quantized_apply), a host quirk outside PSO."""
    import comfy.sample

    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.no_grad():
        return comfy.sample.sample(model, noise, 2, 1.0, "euler", "sgm_uniform", cond, cond, latent,
                                   seed=seed, disable_pbar=True)


def test_the_hosts_quantized_layers_train_in_bypass_mode_and_the_lora_reproduces_the_model(
        host, comfy_inprocess):
    """ComfyUI 0.33 loads quantized checkpoints (int8 / fp8 / nvfp4 mixed precision) as QuantizedTensor
    weights, which take no weight patch; its native trainer trains them in bypass mode (forward
    hooks). PSO does the same: the LoRA trains, the user's MODEL is left as it was, and the host's
    own bypass LoRA loading of the trained LoRA reproduces the trained model's samples."""
    from pso_test_fixtures import tiny_models

    try:  # outside inference mode: 0.33 on CPU cannot move int8 weights made under it (a host quirk)
        model = tiny_models.build_int8_model("sd15", seed=4)
    except NotImplementedError as exc:
        pytest.skip(f"needs a host with int8 quantized storage: {exc}")
    bundle = tiny_models.build_bundle("sd15", seed=4)
    bundle.model = model
    with torch.no_grad():  # a working quantized model: close to the float one it came from
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        q = model.model.diffusion_model(x, torch.tensor([500.0]), context=torch.ones(1, 77, 32))
        f = tiny_models.build_model("sd15", seed=4).model.diffusion_model(
            x, torch.tensor([500.0]), context=torch.ones(1, 77, 32))
    assert 0 < float((q - f).abs().max()) < 0.2 * float(f.abs().mean())
    with torch.inference_mode():
        cond = bundle.clip.encode_from_tokens_scheduled(bundle.clip.tokenize("a red circle"))
    before = _sample_int8(model, cond)
    trained, net, result, _, _ = _train(host, bundle, steps=4)
    assert result.loss_history[0] != result.loss_history[-1], result.loss_history
    lora = host.lora_model_dict(net)
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_up" in k)
    assert not trained.weight_wrapper_patches.keys() & {f"diffusion_model.{p}.weight" for p in net.paths}
    assert torch.equal(_sample_int8(model, cond), before), "the user's MODEL changed"
    after = _sample_int8(trained, cond)
    assert not torch.allclose(after, before, atol=1e-4), "the LoRA changes nothing"
    loaded = _sample_int8(host.apply_lora(model, lora), cond)
    torch.testing.assert_close(loaded, after, rtol=1e-4, atol=1e-5)
    assert torch.equal(_sample_int8(model, cond), before)
