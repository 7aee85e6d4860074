"""A newer few-step family trained through the real server, from its own text encoder and VAE.

Z-Image-Turbo (tiny, through the host's classes: its NextDiT, its Qwen3 text encoder with the bundled
tokenizer, a 16-channel TAESD-shaped VAE): PSO Target Images (batch) -> PSO Sample References with the
family's preset ``zimage_turbo_8`` and the host's sampler -> PSO Build Pairs -> PSO Train (``pso_offline``
and ``pso_full``) -> PSO Save LoRA; a second graph loads the saved file with the stock Load LoRA and
samples the same prompt and noise: it gives the trained model's image, which differs from the base
model's. The other new families cannot run this way here (tests/fixtures/pso_test_fixtures/
tiny_families.py, ``build_clip``: no tiny text encoder the host can build for them); their PSO Train
node runs in-process (tests/integration/test_new_families.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from tools.graphs import pso_training_graph

pytestmark = pytest.mark.server

FAMILY = {"family": "zimage", "schedule": "zimage_turbo_8", "latent": "EmptySD3LatentImage"}
#: pso_full needs the Gaussian policy of a stochastic sampler (ComfyUI's rectified-flow euler_ancestral on
#: a flow model); offline trains from the deterministic euler the model card uses.
SAMPLER = {"pso_offline": "euler", "pso_full": "euler_ancestral"}


def _pixels(server, entry: dict, node: str) -> np.ndarray:
    info = entry["outputs"][node]["images"][0]
    return np.asarray(Image.open(server.output_path(info)).convert("RGB"), dtype=np.int16)


def _sample_graph(graph: dict, model: list, prefix: str) -> dict:
    """The part of ``graph`` that samples the test prompt, with ``model`` and its own save prefix."""
    keep = ("ckpt", "gain1", "sigmas", "sampler", "text", "latent", "noise", "guider", "sample", "decode",
            "save")
    out = {k: {"class_type": graph[k]["class_type"], "inputs": dict(graph[k]["inputs"])} for k in keep}
    out["guider"]["inputs"]["model"] = model
    out["save"]["inputs"]["filename_prefix"] = prefix
    return out


@pytest.mark.parametrize("method", ["pso_offline", "pso_full"])
def test_zimage_trains_through_the_server_and_the_stock_loader_reproduces_it(comfy_server, method):
    prefix = f"zimage_{method}"
    graph = pso_training_graph(FAMILY["family"], prefix=prefix, method=method, schedule=FAMILY["schedule"],
                               sampler=SAMPLER[method], latent=FAMILY["latent"])
    graph["train"]["inputs"]["lora_target"] = "attention_mlp"
    # the compared samples are decoded with gain 1.0 (few clipped pixels: they follow the latent)
    graph["gain1"] = {"class_type": "PSOTestTinyVAE",
                      "inputs": {"seed": 0, "gain": 1.0, "latent_channels": 16}}
    graph["decode"]["inputs"]["vae"] = ["gain1", 0]
    trained = comfy_server.run(graph, timeout=600)  # "save": sampled with the trained LoRA (in memory)
    saved = sorted((comfy_server.base_dir / "models" / "loras" / "pso").glob(f"{prefix}_*.safetensors"))
    assert len(saved) == 1, "PSO Save LoRA wrote no file into the loras folder"
    with safe_open(saved[0], framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    settings = json.loads(meta["pso.settings"])
    assert settings["method"] == method and len(settings["sigmas"]) == 9  # the 8-step preset
    assert settings["sampler_policy"] == ("euler" if method == "pso_offline" else "euler_ancestral_rf")
    assert json.loads(meta["pso.base_fingerprint"])["model_config"] == "ZImage"
    assert meta["modelspec.architecture"] == "z-image-turbo/lora" and meta["pso.key_naming"] == "kohya_ldm"
    assert keys and all(k.startswith("lora_unet_") for k in keys)

    later = _sample_graph(graph, ["stock", 0], f"{prefix}_stock")
    later["stock"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": f"pso/{saved[0].name}",
        "strength_model": 1.0, "strength_clip": 0.0}}
    later["base_guider"] = {"class_type": "BasicGuider", "inputs": {"model": ["ckpt", 0],
                                                                   "conditioning": ["text", 0]}}
    later["base_sample"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        **later["sample"]["inputs"], "guider": ["base_guider", 0]}}
    later["base_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["base_sample", 0],
                                                                 "vae": ["gain1", 0]}}
    later["base_save"] = {"class_type": "SaveImage", "inputs": {"images": ["base_decode", 0],
                                                               "filename_prefix": f"{prefix}_base"}}
    stock = comfy_server.run(later, timeout=300)
    with_file, in_memory = _pixels(comfy_server, stock, "save"), _pixels(comfy_server, trained, "save")
    base = _pixels(comfy_server, stock, "base_save")
    gap = int(np.abs(in_memory - base).max())
    print(f"\nZImage {method}: trained vs base {gap}, stock LoraLoader vs trained "
          f"{int(np.abs(with_file - in_memory).max())} (pixel levels of 255)")
    assert gap > 2, "training changed the sample by less than 2 pixel levels"
    assert np.abs(with_file - in_memory).max() <= 1, "the saved file must give the trained model's image"
