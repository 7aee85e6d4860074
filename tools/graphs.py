"""API-format graphs used by the demo and the server tests (the shipped UI workflows live in
example_workflows/)."""

from __future__ import annotations

#: Inputs that newer ComfyUI versions added to stock nodes as *required*, with the value that keeps
#: the meaning the graphs here were written for (the older hosts' behaviour). :func:`adapt_to_host`
#: adds one only where the running host's ``/object_info`` declares it, so the same graph runs on
#: 0.3.75 (which does not know the input) and on 0.33 (which refuses a graph that leaves a required
#: input out, with ``node_errors``).
ADDED_INPUTS: dict[str, dict[str, object]] = {
    # ComfyUI v0.11.1: Load LoRA Model can apply the LoRA in bypass mode (forward hooks); off = the
    # weights are patched, as before.
    "LoraModelLoader": {"bypass": False},
}


def adapt_to_host(graph: dict, object_info: dict) -> dict:
    """A copy of an API-format ``graph`` with the inputs of :data:`ADDED_INPUTS` that this host's
    ``object_info`` declares and the graph leaves out.

    Raises:
        ValueError: a node's class_type is not on this host (names it and the host's missing list).
    """
    missing = sorted({n["class_type"] for n in graph.values()} - set(object_info))
    if missing:
        raise ValueError(f"the graph uses node types this ComfyUI does not have: {missing}; is the "
                         "extension (or the test fixtures package) loaded? See the server log.")
    out = {}
    for node_id, node in graph.items():
        node = {**node, "inputs": dict(node["inputs"])}
        declared = object_info[node["class_type"]].get("input", {})
        names = {*declared.get("required", {}), *declared.get("optional", {})}
        for name, value in ADDED_INPUTS.get(node["class_type"], {}).items():
            if name in names and name not in node["inputs"]:
                node["inputs"][name] = value
        out[node_id] = node
    return out


def flow_variant(graph: dict) -> dict:
    """The same graph on a rectified-flow (CONST) parameterisation: ComfyUI's ModelSamplingSD3 node
    patches the model's sampling, and the schedule comes from BasicScheduler "simple" (flow models
    have no DDPM timesteps); euler_ancestral then runs ComfyUI's rectified-flow variant."""
    g = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in graph.items()}
    for node in g.values():
        for name, value in node["inputs"].items():
            if value == ["ckpt", 0]:
                node["inputs"][name] = ["flow", 0]
    g["flow"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["ckpt", 0], "shift": 3.0}}
    g["sigmas"] = {"class_type": "BasicScheduler",
                   "inputs": {"model": ["flow", 0], "scheduler": "simple", "steps": 4, "denoise": 1.0}}
    g["sampler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}}
    return g


def pso_training_graph(
    family: str = "sd15",
    steps: int = 3,
    method: str = "pso_offline",
    prefix: str = "pso_graph",
    seed: int = 0,
    checkpoint_every: int = 0,
    prediction: str = "eps",
    schedule: str = "dmd2",
    sampler: str = "lcm",
    latent: str = "EmptyLatentImage",
) -> dict:
    """Tiny checkpoint -> target batch -> references -> pairs -> PSO Train -> native Save LoRA /
    Plot Loss Graph -> Load LoRA Model -> sample with the LoRA -> save.

    ``schedule`` (a PSO Few-Step Sigmas preset), ``sampler`` and ``latent`` (the empty-latent node's
    class) fit the graph to a family: e.g. "zimage_turbo_8", "euler", "EmptySD3LatentImage"."""
    return {
        "ckpt": {
            "class_type": "PSOTestTinyCheckpoint",
            "inputs": {"family": family, "seed": 0, "prediction": prediction},
        },
        "image": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0xE03020},
        },
        "targets": {
            "class_type": "PSOTargetImagesFromBatch",
            "inputs": {"images": ["image", 0], "vae": ["ckpt", 2], "prompt": "a red square"},
        },
        "sigmas": {"class_type": "PSOFewStepSigmas", "inputs": {"model": ["ckpt", 0], "schedule": schedule}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}},
        "refs": {
            "class_type": "PSOSampleReferences",
            "inputs": {
                "model": ["ckpt", 0],
                "clip": ["ckpt", 1],
                "targets": ["targets", 0],
                "sampler": ["sampler", 0],
                "sigmas": ["sigmas", 0],
                "seed": seed,
                "references_per_target": 1,
            },
        },
        "pairs": {
            "class_type": "PSOBuildPairs",
            "inputs": {"model": ["ckpt", 0], "targets": ["targets", 0], "references": ["refs", 0]},
        },
        "train": {
            "class_type": "PSOTrain",
            "inputs": {
                "model": ["ckpt", 0],
                "pairs": ["pairs", 0],
                "method": method,
                "steps": steps,
                "learning_rate": 1e-2,
                "beta": 10.0,
                "lora_rank": 4,
                "batch_size": 2,
                "grad_accumulation": 1,
                "seed": seed,
                "reference_refresh_every": 2,
                "training_dtype": "float32",
                "gradient_checkpointing": False,
                "checkpoint_every": checkpoint_every,
                "preview_every": 1,
                "lora_target": "attention",
                "vae": ["ckpt", 2],
            },
        },
        "save_lora": {
            "class_type": "SaveLoRA",
            "inputs": {"lora": ["train", 1], "prefix": f"loras/{prefix}"},
        },
        "pso_save": {
            "class_type": "PSOSaveLoRA",
            "inputs": {"lora": ["train", 1], "model": ["ckpt", 0], "filename_prefix": f"pso/{prefix}",
                       "settings": ["train", 3]},
        },
        "plot": {"class_type": "LossGraphNode", "inputs": {"loss": ["train", 2], "filename_prefix": prefix}},
        "load_lora": {
            "class_type": "LoraModelLoader",
            "inputs": {"model": ["ckpt", 0], "lora": ["train", 1], "strength_model": 1.0},
        },
        "text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a red square"}},
        "latent": {"class_type": latent, "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "guider": {
            "class_type": "BasicGuider",
            "inputs": {"model": ["load_lora", 0], "conditioning": ["text", 0]},
        },
        "sample": {
            "class_type": "SamplerCustomAdvanced",
            "inputs": {
                "noise": ["noise", 0],
                "guider": ["guider", 0],
                "sampler": ["sampler", 0],
                "sigmas": ["sigmas", 0],
                "latent_image": ["latent", 0],
            },
        },
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }


def pso_online_graph(
    rounds: int = 8,
    prefix: str = "pso_online",
    seed: int = 0,
    sampler: str = "lcm",
    checkpoint_every: int = 0,
    learning_rate: float = 2e-2,
    reward: dict | None = None,
) -> dict:
    """Tiny sd15 checkpoint -> PSO Online Train (brightness reward, the tiny VAE with gain 1.0, whose
    decoded brightness follows the latent) -> native Save LoRA / Plot Loss Graph (loss and rewards) ->
    PSO Save LoRA. ``reward`` replaces the reward node (default: PSOTestBrightnessReward)."""
    prompts = "a red square\na blue circle"
    return {
        "ckpt": {"class_type": "PSOTestTinyCheckpoint",
                 "inputs": {"family": "sd15", "seed": 0, "prediction": "eps"}},
        "vae": {"class_type": "PSOTestTinyVAE", "inputs": {"seed": 0, "gain": 1.0, "latent_channels": 4}},
        "reward": reward or {"class_type": "PSOTestBrightnessReward", "inputs": {}},
        "sigmas": {"class_type": "PSOFewStepSigmas", "inputs": {"model": ["ckpt", 0], "schedule": "dmd2"}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "train": {
            "class_type": "PSOOnlineTrain",
            "inputs": {
                "model": ["ckpt", 0], "clip": ["ckpt", 1], "prompts": prompts, "vae": ["vae", 0],
                "reward": ["reward", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
                "latent": ["latent", 0], "rounds": rounds, "prompts_per_round": 128, "samples_per_prompt": 4,
                "tie_margin": 0.0, "method": "pso_online", "beta": 5.0, "learning_rate": learning_rate,
                "lora_rank": 4, "steps_per_round": 1, "batch_size": 2, "seed": seed,
                "checkpoint_every": checkpoint_every, "preview_every": 1, "lora_target": "all",
            },
        },
        "save_lora": {"class_type": "SaveLoRA",
                      "inputs": {"lora": ["train", 1], "prefix": f"loras/{prefix}"}},
        "pso_save": {
            "class_type": "PSOSaveLoRA",
            "inputs": {"lora": ["train", 1], "model": ["ckpt", 0], "filename_prefix": f"pso/{prefix}",
                       "settings": ["train", 4]},
        },
        "plot_loss": {"class_type": "LossGraphNode",
                      "inputs": {"loss": ["train", 2], "filename_prefix": prefix}},
        "plot_rewards": {"class_type": "LossGraphNode",
                         "inputs": {"loss": ["train", 3], "filename_prefix": f"{prefix}_rewards"}},
    }


def tiny_sampling_graph(family: str = "sd15", seed: int = 7, prefix: str = "pso_smoke") -> dict:
    """Tiny checkpoint -> prompt -> PSO few-step sigmas -> SamplerCustomAdvanced -> decode -> save."""
    return {
        "ckpt": {"class_type": "PSOTestTinyCheckpoint",
                 "inputs": {"family": family, "seed": 0, "prediction": "eps"}},
        "text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a red circle"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "sigmas": {"class_type": "PSOFewStepSigmas", "inputs": {"model": ["ckpt", 0], "schedule": "dmd2"}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "lcm"}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        # Distilled models run without classifier-free guidance (CFG 1): BasicGuider.
        "guider": {"class_type": "BasicGuider",
                   "inputs": {"model": ["ckpt", 0], "conditioning": ["text", 0]}},
        "sample": {"class_type": "SamplerCustomAdvanced",
                   "inputs": {"noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0],
                              "sigmas": ["sigmas", 0], "latent_image": ["latent", 0]}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }
