"""The tiny test models are real ComfyUI models with live weights (or every other test is hollow)."""

from __future__ import annotations

import contextlib

import pytest
import torch


def _snapshot(t: torch.Tensor) -> torch.Tensor:
    """Pack hook: a copy of each saved activation (parameters are never modified in place)."""
    return t if isinstance(t, torch.nn.Parameter) else t.clone()


@pytest.fixture(scope="module")
def tiny(comfy_inprocess):
    from pso_test_fixtures import tiny_models

    return tiny_models


@contextlib.contextmanager
def _host_training_switch():
    """ComfyUI 0.33's ``in_training`` (set by its native trainer): Flux's rope then takes the
    differentiable path instead of comfy_kitchen's kernel, which has no autograd formula."""
    import comfy.model_management as mm

    before = getattr(mm, "in_training", None)
    if before is not None:
        mm.in_training = True
    try:
        yield
    finally:
        if before is not None:
            mm.in_training = before


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_tiny_unet_output_and_gradients_are_alive(tiny, family):
    """A UNet left as disable_weight_init made it outputs zeros and has zero gradients."""
    bundle = tiny.build_bundle(family, seed=3)
    cond = bundle.clip.encode_from_tokens_scheduled(bundle.clip.tokenize("a red circle"))
    base = bundle.model.model
    context = cond[0][0]
    channels = tiny.LATENT_CHANNELS[family]
    x = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    kwargs = {}
    if family == "sdxl":
        kwargs["y"] = base.encode_adm(pooled_output=cond[0][1]["pooled_output"], width=64, height=64)
        assert kwargs["y"].shape == (1, tiny.unet_config("sdxl")["adm_in_channels"])
    if family == "flux":
        # T5's last hidden state is the context, CLIP-L's (unprojected) pooled output is y.
        config = tiny.unet_config("flux")
        assert context.shape[-1] == config["context_in_dim"]
        kwargs["y"] = base.encode_adm(pooled_output=cond[0][1]["pooled_output"])
        assert kwargs["y"].shape == (1, config["vec_in_dim"])
        t = torch.tensor([0.5])  # schnell's timestep is sigma (multiplier 1)
    unet = base.diffusion_model
    # ComfyUI v0.30+ builds diffusion models with requires_grad_(False) (0.3.75 did not); this checks
    # that the fixture's weights carry gradient, so it asks for them explicitly.
    unet.requires_grad_(True)
    # The host's Flux blocks add their residuals in place (``img += ...`` after a norm saved ``img``),
    # which plain autograd refuses in backward; snapshotting each saved activation keeps the
    # gradients exact. The UNet families need nothing of the kind.
    saved = (torch.autograd.graph.saved_tensors_hooks(_snapshot, lambda t: t) if family == "flux"
             else contextlib.nullcontext())
    with saved, _host_training_switch():
        out = unet(x, t, context=context, **kwargs)
        assert out.shape == x.shape
        assert out.abs().mean() > 1e-3
        out.square().mean().backward()
    grads = [p.grad.abs().sum() for p in unet.parameters() if p.grad is not None]
    assert len(grads) > 0.9 * len(list(unet.parameters()))
    assert sum(g > 0 for g in grads) > 0.9 * len(grads)
    if family == "flux":  # the text encoder drives both inputs: another prompt changes the output
        other = bundle.clip.encode_from_tokens_scheduled(bundle.clip.tokenize("a blue square"))
        y2 = base.encode_adm(pooled_output=other[0][1]["pooled_output"])
        with torch.no_grad():
            assert not torch.allclose(unet(x, t, context=other[0][0], y=y2), out)
            assert not torch.allclose(unet(x, t, context=context, y=y2), out)


def test_tiny_models_are_deterministic_in_their_seed(tiny):
    a = tiny.build_model("sd15", seed=1).model.diffusion_model.state_dict()
    b = tiny.build_model("sd15", seed=1).model.diffusion_model.state_dict()
    c = tiny.build_model("sd15", seed=2).model.diffusion_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].ndim > 1)


def test_tiny_models_use_the_host_classes(tiny, comfy_inprocess):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.sd

    b = tiny.build_bundle("sdxl")
    assert isinstance(b.model, comfy.model_patcher.ModelPatcher)
    assert isinstance(b.model.model, comfy.model_base.SDXL)
    assert isinstance(b.clip, comfy.sd.CLIP) and isinstance(b.vae, comfy.sd.VAE)
    assert 0.5e6 < sum(p.numel() for p in b.model.model.diffusion_model.parameters()) < 3e6


def test_tiny_flux_is_a_schnell_class_flow_model_through_the_host_classes(tiny, comfy_inprocess):
    import comfy.latent_formats
    import comfy.ldm.flux.model
    import comfy.model_base
    import comfy.model_patcher
    import comfy.model_sampling
    import comfy.sd
    import comfy.supported_models
    import comfy.text_encoders.flux

    b = tiny.build_bundle("flux")
    assert isinstance(b.model, comfy.model_patcher.ModelPatcher)
    assert isinstance(b.model.model, comfy.model_base.Flux)
    assert isinstance(b.model.model.model_config, comfy.supported_models.FluxSchnell)
    unet = b.model.model.diffusion_model
    assert isinstance(unet, comfy.ldm.flux.model.Flux)
    assert not unet.params.guidance_embed and unet.patch_size == 2
    assert len(unet.double_blocks) >= 1 and len(unet.single_blocks) >= 1
    assert 0.5e6 < sum(p.numel() for p in unet.parameters()) < 3e6
    # Rectified flow as a schnell checkpoint loads: CONST, DiscreteFlow with shift 1, timestep = sigma.
    ms = b.model.get_model_object("model_sampling")
    assert isinstance(ms, comfy.model_sampling.CONST)
    assert isinstance(ms, comfy.model_sampling.ModelSamplingDiscreteFlow)
    assert ms.shift == 1.0 and float(ms.sigma_max) == pytest.approx(1.0)
    assert float(ms.timestep(torch.tensor(0.25))) == pytest.approx(0.25)
    assert isinstance(b.model.get_model_object("latent_format"), comfy.latent_formats.Flux)
    # Flux's own text encoder (CLIP-L + T5-XXL) and a 16-channel VAE.
    assert isinstance(b.clip, comfy.sd.CLIP) and isinstance(b.vae, comfy.sd.VAE)
    assert isinstance(b.clip.tokenizer, comfy.text_encoders.flux.FluxTokenizer)
    assert isinstance(b.clip.cond_stage_model, comfy.text_encoders.flux.FluxClipModel)
    assert b.vae.latent_channels == 16
    with pytest.raises(ValueError, match="rectified-flow"):
        tiny.build_model("flux", prediction="v")


def test_tiny_flux_samples_and_decodes_in_well_under_a_second(tiny, comfy_inprocess):
    """A 4-step schnell-style run (simple schedule, euler) on a 64x64 image, decoded by the VAE."""
    import time

    import comfy.sample
    import comfy.samplers

    b = tiny.build_bundle("flux", seed=1)
    cond = b.clip.encode_from_tokens_scheduled(b.clip.tokenize("a red circle"))
    latent = torch.zeros(1, 16, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    sigmas = comfy.samplers.calculate_sigmas(b.model.get_model_object("model_sampling"), "simple", 4)
    assert sigmas.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    outs = []
    for name in ("euler", "euler", "euler_ancestral"):
        t0 = time.perf_counter()
        with torch.inference_mode():
            outs.append(comfy.sample.sample_custom(b.model, noise, 1.0, comfy.samplers.sampler_object(name),
                                                   sigmas, cond, [], latent, seed=1))
        elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"a 4-step tiny flux sample took {elapsed:.2f} s"
    assert outs[0].shape == latent.shape and torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])  # euler is deterministic
    assert not torch.allclose(outs[0], outs[2])  # euler_ancestral (its RF variant) adds noise
    with torch.inference_mode():
        image = b.vae.decode(outs[0])
    assert image.shape == (1, 64, 64, 3) and image.std() > 1e-3
