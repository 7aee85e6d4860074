"""The demo model: a small SD1.5-class text-to-image model of handwritten digits, shipped with the pack.

It is built through ComfyUI's own classes, so every stock node works on it as on a user's
checkpoint: the diffusion model is ``comfy.supported_models.SD15`` with a shrunken UNet (eps
prediction, SD's scaled-linear 1000-step schedule, latent scale 0.18215) wrapped in a
``ModelPatcher``; the text encoder is ComfyUI's SD1 CLIP (``SD1ClipModel`` with the bundled CLIP-L
tokenizer, 3 layers of width 32); the VAE is a TAESD-shaped autoencoder loaded by ``comfy.sd.VAE``
(8x down-sampling: 32x32 RGB images <-> 4x4x4 latents). CLIPTextEncode, KSampler,
SamplerCustomAdvanced, VAEEncode/VAEDecode and LoraLoader take it like any SD1.5 checkpoint.

The weights (``demo_model/pso_demo_digits.safetensors``, fp16) are trained by
``python -m tools.train_demo_model`` on scikit-learn's digits (see that script): prompts are
``"a handwritten digit 3"``; the diffusion model is a 4-step student distilled for DMD2's
timesteps 999/749/499/249 with the ``lcm`` sampler (PSO Few-Step Sigmas ``dmd2``), run without
classifier-free guidance (CFG 1, BasicGuider).

This module only uses absolute imports, and imports the host inside functions, so the training
script can load it by file path outside a running ComfyUI.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

#: The shipped weights.
WEIGHTS_PATH = Path(__file__).resolve().parent.parent / "demo_model" / "pso_demo_digits.safetensors"
#: The second shipped model: coloured shapes ("a red circle"), same architecture and schedule.
SHAPES_WEIGHTS_PATH = WEIGHTS_PATH.parent / "pso_demo_shapes.safetensors"
#: Image side in pixels (latents are IMAGE_SIZE / 8).
IMAGE_SIZE = 32
#: ComfyUI SD1 CLIP text encoder, shrunken (the real CLIP-L is 12 layers x 768).
TEXT_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "projection_dim": 32,
}
#: SD1.5's UNet config (``comfy.supported_models.SD15``), shrunken: 2 levels of 32/64 channels.
UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "adm_in_channels": None,
    "use_linear_in_transformer": False,
    "context_dim": TEXT_CONFIG["hidden_size"],
    "num_heads": -1,
    "num_head_channels": 16,
}
#: Prefixes of the three parts in the weights file.
PARTS = ("model.", "clip.", "vae.")


def prompt(digit: int, style: str = "") -> str:
    """The caption the demo model was trained on, e.g. ``"a handwritten digit 3"``."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be 0..9, got {digit!r}")
    return f"a {style + ' ' if style else ''}handwritten digit {int(digit)}"


def shape_prompt(colour: str, shape: str, style: str = "") -> str:
    """The shapes model's caption, e.g. ``"a red circle"`` (``style`` goes before the shape)."""
    return f"a {colour} {style + ' ' if style else ''}{shape}"


def init_module_(module: torch.nn.Module, seed: int, gain: float = 1.0) -> None:
    """Seeded init for modules built with ``comfy.ops.disable_weight_init`` (which skips it).

    Weights uniform(-b, b), b = gain * sqrt(3 / fan_in); biases 0; 1-D scales 1 (norm weights, whose
    names such as ``in_layers.0.weight`` do not all contain "norm"; TAESD's ``vae_scale``).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim <= 1:
                p.zero_() if name.endswith("bias") or name.endswith("vae_shift") else p.fill_(1.0)
                continue
            bound = gain * math.sqrt(3.0 / max(p[0].numel(), 1))
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)


def build_model(state: dict | None = None, seed: int = 0):
    """A ``ModelPatcher`` around the SD1.5-class UNet; ``state`` keys are ``diffusion_model.*``."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    cfg = comfy.supported_models.SD15(dict(UNET_CONFIG))
    cfg.unet_config.update(num_heads=-1, num_head_channels=UNET_CONFIG["num_head_channels"])
    model = cfg.get_model({}, "", device=None)
    model.diffusion_model.to(torch.float32)
    if state is None:
        init_module_(model.diffusion_model, seed)
    else:
        _load_exact(model.diffusion_model, state, "diffusion_model.", "the demo UNet")
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def build_clip(state: dict | None = None, seed: int = 1):
    """ComfyUI's SD1 CLIP with the shrunken text encoder and the bundled tokenizer."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": dict(TEXT_CONFIG),
                                                 "dtype": torch.float32})
    if state is None:
        init_module_(clip.cond_stage_model, seed)
    else:
        _load_exact(clip.cond_stage_model, state, "", "the demo text encoder")
    return clip


def build_taesd(seed: int = 2):
    """A fresh TAESD-shaped autoencoder (the host's ``comfy.taesd.taesd.TAESD``, 4 latent channels)."""
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    init_module_(taesd, seed, gain=math.sqrt(2.0))  # ReLU network: He gain
    with torch.no_grad():  # residual branches start at zero, so the 30-block stack starts tame
        for block in taesd.modules():
            if isinstance(block, comfy.taesd.taesd.Block):
                block.conv[-1].weight.zero_()
    return taesd


def build_vae(state: dict):
    """``comfy.sd.VAE`` from a TAESD state dict (``taesd_encoder.*``, ``taesd_decoder.*``, scale, shift)."""
    import comfy.sd

    return comfy.sd.VAE(sd=state)


def _load_exact(module: torch.nn.Module, state: dict, prefix: str, what: str) -> None:
    own = module.state_dict()
    wanted = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, extra = sorted(set(own) - set(wanted)), sorted(set(wanted) - set(own))
    if missing or extra:
        raise ValueError(f"{what}: the weights do not match the architecture (missing {missing[:5]}, "
                         f"unexpected {extra[:5]}); re-create them with `python -m tools.train_demo_model`")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in wanted.items()})


def split_state(flat: dict) -> tuple[dict, dict, dict]:
    """The weights file's ``model.*`` / ``clip.*`` / ``vae.*`` keys -> three state dicts."""
    return tuple({k[len(p):]: v for k, v in flat.items() if k.startswith(p)} for p in PARTS)


def load_bundle(path: Path | str = WEIGHTS_PATH):
    """``(model, clip, vae)`` from the shipped weights file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"the demo model weights {path} are missing; reinstall comfyui-pso or re-create them with "
            "`python -m tools.train_demo_model`"
        )
    model_sd, clip_sd, vae_sd = split_state(load_file(str(path)))
    vae_sd = {k: v.float() for k, v in vae_sd.items()}
    return build_model(model_sd), build_clip(clip_sd), build_vae(vae_sd)


def read_metadata(path: Path | str = WEIGHTS_PATH) -> dict:
    """The training record stored in the weights file's metadata (``pso_demo`` JSON)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("pso_demo", "{}"))
