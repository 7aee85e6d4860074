"""PSO on a MODEL made few-step by a distillation LoRA (Lightning / Hyper / DMD2 / lightx2v applied
with the stock LoraLoader): the frozen reference is that MODEL, distillation LoRA included; the saved
PSO LoRA holds only the new adapter; the stock loader with both LoRAs reproduces the trained model."""

from __future__ import annotations

import importlib
import logging
from types import SimpleNamespace

import pytest
import safetensors
import safetensors.torch
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


# --------------------------------------------------------------------------------------------
# Through the real server: the user's graph, LoraLoader -> PSO Train -> PSO Save LoRA
# --------------------------------------------------------------------------------------------

def _on_model(graph: dict, source: list) -> dict:
    """``graph`` with every use of the checkpoint's MODEL output taken from ``source`` instead."""
    out = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in graph.items()}
    for node in out.values():
        for name, value in node["inputs"].items():
            if value == ["ckpt", 0]:
                node["inputs"][name] = source
    return out


def _latent(comfy_server, prefix: str) -> torch.Tensor:
    (path,) = sorted((comfy_server.base_dir / "output" / "latents").glob(f"{prefix}_*.latent"))
    with safetensors.safe_open(str(path), "pt") as f:
        return f.get_tensor("latent_tensor")


@pytest.mark.server
def test_the_server_graph_trains_on_a_distillation_lora_and_the_stock_loader_reproduces_it(comfy_server):
    from tools.graphs import pso_training_graph

    loras = comfy_server.base_dir / "models" / "loras"
    # a "distillation LoRA" for the tiny model: a PSO LoRA of the base model, made 5x stronger
    source = pso_training_graph("sd15", prefix="distill_source")
    for name in ("save_lora", "plot", "load_lora", "guider", "sample", "decode", "save", "text", "latent",
                 "noise"):
        del source[name]
    comfy_server.run(source, timeout=300)
    (made,) = (loras / "pso").glob("distill_source_*.safetensors")
    with safetensors.safe_open(str(made), "pt") as f:
        tensors = {k: f.get_tensor(k) * (5.0 if k.endswith("lora_up.weight") else 1.0) for k in f.keys()}  # noqa: SIM118
    (loras / "distill").mkdir()
    safetensors.torch.save_file(tensors, str(loras / "distill" / "lightning.safetensors"))

    distill = {"class_type": "LoraLoaderModelOnly",
               "inputs": {"model": ["ckpt", 0], "lora_name": "distill/lightning.safetensors",
                          "strength_model": 1.0}}
    graph = _on_model(pso_training_graph("sd15", prefix="on_distill"), ["distill", 0])
    graph["distill"] = distill
    graph["trained_latent"] = {"class_type": "SaveLatent",
                               "inputs": {"samples": ["sample", 0], "filename_prefix": "latents/trained"}}
    comfy_server.run(graph, timeout=300)
    (pso_file,) = (loras / "pso").glob("on_distill_*.safetensors")
    with safetensors.safe_open(str(pso_file), "pt") as f:
        assert set(f.keys()) == set(tensors)  # the same layers ("attention"), the new adapter's values
        key = next(k for k in f.keys() if k.endswith("lora_up.weight"))  # noqa: SIM118
        assert not torch.allclose(f.get_tensor(key), tensors[key])

    check = {k: graph[k] for k in ("ckpt", "text", "latent", "noise", "sigmas", "sampler")}
    check["distill"] = distill
    check["both"] = {"class_type": "LoraLoaderModelOnly",
                     "inputs": {"model": ["distill", 0], "lora_name": f"pso/{pso_file.name}",
                                "strength_model": 1.0}}
    for tag, model in (("both", ["both", 0]), ("distill_only", ["distill", 0])):
        check[f"guider_{tag}"] = {"class_type": "BasicGuider",
                                  "inputs": {"model": model, "conditioning": ["text", 0]}}
        check[f"sample_{tag}"] = {"class_type": "SamplerCustomAdvanced",
                                  "inputs": {"noise": ["noise", 0], "guider": [f"guider_{tag}", 0],
                                             "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
                                             "latent_image": ["latent", 0]}}
        check[f"save_{tag}"] = {"class_type": "SaveLatent",
                                "inputs": {"samples": [f"sample_{tag}", 0],
                                           "filename_prefix": f"latents/{tag}"}}
    comfy_server.run(check, timeout=300)
    trained, both, distill_only = (_latent(comfy_server, t) for t in ("trained", "both", "distill_only"))
    gap = (trained - distill_only).abs().max().item()
    err = (both - trained).abs().max().item()
    print(f"\nserver: PSO on the distilled model moves the sample by {gap:.3e}; stock loader with both LoRAs "
          f"vs the trained MODEL {err:.2e}")
    assert gap > 1e-3, f"training changed nothing measurable ({gap})"
    assert err <= 1e-4 * max(1.0, gap), (err, gap)
