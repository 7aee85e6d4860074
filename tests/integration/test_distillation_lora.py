"""PSO on a MODEL made few-step by a distillation LoRA (Lightning / Hyper / DMD2 / lightx2v applied
with the stock LoraLoader): the frozen reference is that MODEL, distillation LoRA included; the saved
PSO LoRA holds only the new adapter; the stock loader with both LoRAs reproduces the trained model."""

from __future__ import annotations

import importlib
import logging
from types import SimpleNamespace

import pytest
import safetensors
import torch
from tiny_training import sample, train_lora

from extension_loader import load_package


@pytest.fixture(scope="module")
def ext(comfy_inprocess):
    load_package()

    class Ext:
        nodes = importlib.import_module("comfyui-pso.nodes.lora_nodes")
        host = importlib.import_module("comfyui-pso.nodes.host_training")
        lora = importlib.import_module("comfyui-pso.pso.lora")

    return Ext


def _distillation_lora(ext, model) -> dict:
    """A LoRA on every attention and feed-forward layer that visibly changes the model (the stand-in
    for a downloaded distillation LoRA; any kohya-named file loads the same way)."""
    unet = model.get_model_object("diffusion_model")
    with torch.inference_mode(False):
        net = ext.lora.LoRANetwork.for_module(unet, ext.lora.LoRAConfig(rank=4, target="attention_mlp"),
                                              torch.Generator().manual_seed(7))
        with torch.no_grad():
            gen = torch.Generator().manual_seed(8)
            for path in net.paths:
                net.lora_up(path).copy_(torch.randn(net.lora_up(path).shape, generator=gen) * 0.05)
    return ext.host.lora_model_dict(net)


def test_pso_trains_on_top_of_a_distillation_lora_and_saves_only_its_own_adapter(ext, bundles, loras, caplog):
    import nodes as comfy_nodes  # ComfyUI's nodes.py

    bundle = bundles["sd15"]
    with torch.inference_mode():
        conds = [bundle.clip.encode_from_tokens_scheduled(bundle.clip.tokenize(p))
                 for p in ("a red circle", "a blue square")]
    distill_name = ext.nodes.PSOSaveLoRA.execute(_distillation_lora(ext, bundle.model), bundle.model,
                                                 "distill/lightning", None).result[0]
    with caplog.at_level(logging.WARNING):
        distilled = comfy_nodes.LoraLoader().load_lora(bundle.model, bundle.clip, distill_name, 1.0, 0.0)[0]
    base_out, distilled_out = sample(bundle.model, conds[0]), sample(distilled, conds[0])
    distill_gap = (distilled_out - base_out).abs().max().item()
    assert distill_gap > 1e-2, f"the distillation LoRA changes too little ({distill_gap}) to test with"

    trained, net, _ = train_lora(ext.host, ext.lora, SimpleNamespace(model=distilled), conds, steps=4,
                                 lr=3e-2)
    trained_out = sample(trained, conds[0])
    with net.disabled():  # the frozen reference PSO trained against: the distilled MODEL, LoRA included
        frozen_out = sample(trained, conds[0])
    assert (frozen_out - distilled_out).abs().max().item() < 1e-5
    gap = (trained_out - distilled_out).abs().max().item()
    assert gap > 1e-3, f"training changed nothing measurable (gap {gap})"

    pso_name = ext.nodes.PSOSaveLoRA.execute(ext.host.lora_model_dict(net), bundle.model, "pso/on_distill",
                                             None).result[0]
    with safetensors.safe_open(str(loras / pso_name), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    assert len(saved) == 3 * len(net.paths)  # the new adapter only: down, up, alpha per trained layer
    with safetensors.safe_open(str(loras / distill_name), "pt") as f:
        up_key = next(k for k in saved if k.endswith("lora_up.weight"))
        assert not torch.allclose(f.get_tensor(up_key), saved[up_key])  # not the distillation LoRA's

    with caplog.at_level(logging.WARNING):
        loader = comfy_nodes.LoraLoader()
        both = loader.load_lora(loader.load_lora(bundle.model, bundle.clip, distill_name, 1.0, 0.0)[0], None,
                                pso_name, 1.0, 0.0)[0]
        pso_only = loader.load_lora(bundle.model, None, pso_name, 1.0, 0.0)[0]
    assert "not loaded" not in caplog.text.lower(), caplog.text
    err = (sample(both, conds[0]) - trained_out).abs().max().item()
    print(f"\ndistillation LoRA moves the output by {distill_gap:.3e}, PSO by {gap:.3e}; "
          f"stock loader with both vs the trained model: {err:.2e}")
    assert err <= 1e-4 * max(1.0, gap), (err, gap)
    # without the distillation LoRA the PSO LoRA alone is a different model (nothing was folded in)
    assert (sample(pso_only, conds[0]) - trained_out).abs().max().item() > 0.5 * distill_gap
