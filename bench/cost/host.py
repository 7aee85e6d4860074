"""The ComfyUI host in this process, the project's modules loaded as ComfyUI loads them, and the
models, conditioning and latents every measurement shares.

Tiny models are the test fixtures (``tests/fixtures/pso_test_fixtures/tiny_models.py``: the host's
own SD1.5 / SDXL classes, shrunken, seeded random weights). ``real_size=True`` builds the full
SD1.5 / SDXL UNet (ComfyUI's ``model_detection`` configs: 860 M / 2.6 G parameters) with random
weights, and random text embeddings of the real widths instead of a text encoder (encoding a prompt
is not part of a training step).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("sd15", "sdxl")

# ComfyUI 0.3.75 comfy/model_detection.py (SD15, SDXL): the architectures of real checkpoints.
REAL_UNET = {
    "sd15": {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "in_channels": 4,
        "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": False,
        "context_dim": 768,
        "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    },
    "sdxl": {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "num_classes": "sequential",
        "adm_in_channels": 2816,
        "in_channels": 4,
        "model_channels": 320,
        "num_res_blocks": [2, 2, 2],
        "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4],
        "transformer_depth_middle": 10,
        "use_linear_in_transformer": True,
        "context_dim": 2048,
        "num_head_channels": 64,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    },
}
# Real text-encoder widths: context (tokens x width) and SDXL's pooled CLIP-G vector.
REAL_TEXT = {"sd15": (77, 768, None), "sdxl": (77, 2048, 1280)}


def import_host(device: str = "cpu") -> SimpleNamespace:
    """Import ComfyUI in this process (CPU mode unless ``device == "cuda"``) and this repository as the
    custom-node package ``comfyui-pso``; return the modules the benchmark uses."""
    from tools.comfy_host import host_sys_path

    for entry in reversed(
        [*host_sys_path(), str(REPO_ROOT / "tests" / "fixtures"), str(REPO_ROOT / "tests")]
    ):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    import comfy.cli_args

    comfy.cli_args.args.cpu = device != "cuda"  # before comfy.model_management is imported
    import comfy.model_management  # noqa: F401
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm bars between timed steps
    from extension_loader import load_package

    load_package()

    def mod(name: str):
        return importlib.import_module(name)

    return SimpleNamespace(
        mm=mod("comfy.model_management"),
        ncs=mod("comfy_extras.nodes_custom_sampler"),
        nodes_train=mod("comfy_extras.nodes_train"),
        tiny=mod("pso_test_fixtures.tiny_models"),
        host_training=mod("comfyui-pso.nodes.host_training"),
        host_sampling=mod("comfyui-pso.nodes.host_sampling"),
        training_run=mod("comfyui-pso.nodes.training_run"),
        online_settings=mod("comfyui-pso.pso.online_settings"),
        methods=mod("comfyui-pso.pso.methods"),
        batches=mod("comfyui-pso.pso.batches"),
        references=mod("comfyui-pso.pso.references"),
        trainer=mod("comfyui-pso.pso.trainer"),
        lora=mod("comfyui-pso.pso.lora"),
        schedules=mod("comfyui-pso.pso.schedules"),
        dataset=mod("comfyui-pso.pso.dataset"),
    )


@dataclass
class Setup:
    """One family's model, its prompt's CONDITIONING, and the two training images' latents."""

    family: str
    real_size: bool
    model: object  # ModelPatcher
    positive: list  # CONDITIONING of one prompt: [[context, {...}]]
    latents: torch.Tensor  # (2, 4, H, W): the two images every training step uses
    sigmas: torch.Tensor  # (5,) the DMD2 4-step schedule (999/749/499/249 -> 0)

    @property
    def model_sampling(self):
        return self.model.get_model_object("model_sampling")

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.model.diffusion_model.parameters())


def _real_model(h: SimpleNamespace, family: str, seed: int):
    """Full-size SD1.5 / SDXL UNet with random weights, built as a checkpoint of it loads."""
    import comfy.model_patcher
    import comfy.supported_models

    cls = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[family]
    cfg = cls(dict(REAL_UNET[family]))
    model = cfg.get_model({}, "", device=None)
    model.diffusion_model.to(torch.float32)
    h.tiny._init_module_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=h.mm.get_torch_device(), offload_device=h.mm.unet_offload_device()
    )


def _real_conditioning(family: str, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    tokens, width, pooled = REAL_TEXT[family]
    extra = {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=g)}
    return [[torch.randn(1, tokens, width, generator=g), extra]]


def build_setup(
    h: SimpleNamespace, family: str, latent_size: int, real_size: bool = False, seed: int = 0
) -> Setup:
    """The model, one prompt's conditioning and two random training latents (2, 4, S, S)."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is unknown; choose from {FAMILIES}")
    if real_size:
        model, positive = _real_model(h, family, seed), _real_conditioning(family, seed + 1)
    else:
        model = h.tiny.build_model(family, seed)
        clip = h.tiny.build_clip(family, seed)
        with torch.inference_mode(False), torch.no_grad():
            positive = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle on green grass"))
        del clip
    g = torch.Generator().manual_seed(seed + 2)
    latents = torch.randn(2, 4, latent_size, latent_size, generator=g)
    sigmas = h.schedules.few_step_sigmas(model.get_model_object("model_sampling"), "dmd2")
    return Setup(family, real_size, model, positive, latents, sigmas)


def machine_info(device: str) -> dict:
    """CPU model, cores, threads, torch version (and the GPU when one is used)."""
    import platform

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }
    with contextlib.suppress(OSError):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def machine_line(info: dict) -> str:
    line = (
        f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['torch_threads']} torch "
        f"thread(s), OMP_NUM_THREADS={info['omp_num_threads']}, Python {info['python']}"
    )
    if "gpu" in info:
        line += f", GPU {info['gpu']} (CUDA {info['cuda']})"
    if "load_avg_1m" in info:
        line += f", load average {info['load_avg_1m']} at start"
    return line
