"""What PSO knows about each model family, in one table (pure data and small lookups; no host import).

A row of :data:`FAMILIES` is keyed by the host's model config class name (ComfyUI's
``comfy.supported_models`` class, ``type(model.model.model_config).__name__``: the most specific
class the host has, so FLUX.1-dev and -schnell, or SD1.x and SD2.x, are different rows) and holds:

- ``model_class``: the host's model class (``comfy.model_base``) of that config;
- ``attention`` / ``mlp``: the LoRA target modules, as module-path suffixes in the host's module names
  (:data:`pso.lora.TARGETS` matches against the union over all rows, plus diffusers' names);
- ``in_place_residual``: whether the host's blocks add residuals in place after a norm saved the tensor
  (autograd rejects that; the training node then copies saved activations);
- ``checkpoint_blocks``: a regular expression for the top-level blocks gradient checkpointing wraps;
- ``schedules``: few-step schedule presets (:class:`SchedulePreset`) with where each comes from;
- ``base_model_version`` / ``architecture`` / ``ldm_implementation`` / ``resolution``: how LoRA files
  for the family are described (kohya's ``ss_base_model_version``, modelspec's ``architecture``
  without the ``/lora`` suffix, the modelspec ``implementation`` of files whose keys follow the
  original module names (``kohya_ldm``), the native resolution for ``modelspec.resolution``);
- ``naming``: the default key naming of a saved file (a key of :data:`pso.lora_format.NAMINGS`),
  and ``bad_namings``: namings that common readers of this family cannot read, with the reason;
- ``readers``: which tools load the default file, and how that is known ("tested" here, or "code":
  read from the tool's source).

Adding a family: one row here and a tiny fixture built through the host's own classes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

#: Implementations (modelspec.implementation) as kohya sd-scripts writes them (library/sai_model_spec.py).
IMPL_DIFFUSERS = "diffusers"
IMPL_STABILITY = "https://github.com/Stability-AI/generative-models"
IMPL_COMFYUI = "https://github.com/comfyanonymous/ComfyUI"
IMPL_FLUX = "https://github.com/black-forest-labs/flux"
IMPL_LUMINA = "https://github.com/Alpha-VLLM/Lumina-Image-2.0"


@dataclass(frozen=True)
class SchedulePreset:
    """A few-step sampling schedule a distilled model (or distillation LoRA) was made for.

    kind "timesteps": the discrete timesteps in ``values`` (``pso.schedules.FEW_STEP_TIMESTEPS``
    holds them by ``name``); kind "flow": ``steps`` steps of ComfyUI's "simple" scheduler through the
    model's own (shifted) flow sampling. source: where the numbers come from.
    """

    name: str
    kind: str
    steps: int
    source: str


@dataclass(frozen=True)
class Family:
    model_class: str
    base_model_version: str
    architecture: str
    ldm_implementation: str
    naming: str
    resolution: str
    attention: tuple[tuple[str, ...], ...] = ()
    mlp: tuple[tuple[str, ...], ...] = ()
    in_place_residual: bool = False
    checkpoint_blocks: str = ""
    schedules: tuple[SchedulePreset, ...] = ()
    bad_namings: dict[str, str] = field(default_factory=dict)
    readers: dict[str, str] = field(default_factory=dict)
    latent_dims: int = 4  # dimensions of a latent batch: 4 (B, C, H, W) for images, 5 for video
    headless: str = ""  # how the headless trainer conditions it; "" = trained in ComfyUI only
    # whether gradient checkpointing of checkpoint_blocks trains: with in-place residuals (saved
    # activations copied by a saved-tensor hook) torch's recomputation check fails (CheckpointError;
    # tests/integration/test_new_families.py), so the training node refuses it there up front
    checkpointing: bool = True
    # why PSO Train refuses MODELs of this class, naming the fix ("" = it trains them)
    refuse: str = ""


# ---- module names -----------------------------------------------------------------------------
# ComfyUI's ldm UNet and diffusers' UNets share the attention names (to_q, to_k, to_v, to_out =
# [Linear, Dropout]); Transformer2D proj_in / proj_out (1x1 Conv2d in SD1.5, Linear in SDXL) and the
# GEGLU feed-forward (ff.net.0.proj, ff.net.2).
_UNET_ATTENTION = (("to_q",), ("to_k",), ("to_v",), ("to_out", "0"))
_UNET_MLP = (("ff", "net", "0", "proj"), ("ff", "net", "2"), ("proj_in",), ("proj_out",))
# ComfyUI's Flux: fused qkv and proj per stream; MLPs img_mlp / txt_mlp = [Linear, GELU, Linear];
# single blocks' linear1 holds qkv and the MLP input together, linear2 their output.
_FLUX_ATTENTION = (("img_attn", "qkv"), ("img_attn", "proj"), ("txt_attn", "qkv"), ("txt_attn", "proj"))
_FLUX_MLP = (("img_mlp", "0"), ("img_mlp", "2"), ("txt_mlp", "0"), ("txt_mlp", "2"), ("linear1",),
             ("linear2",))
# diffusers' joint attention (its Flux and SD3 transformers, read by the headless trainer): the
# context-stream projections and FeedForward of the context stream, proj_mlp of single blocks.
_DIFFUSERS_JOINT_ATTENTION = (("add_q_proj",), ("add_k_proj",), ("add_v_proj",), ("to_add_out",))
_DIFFUSERS_JOINT_MLP = (("ff_context", "net", "0", "proj"), ("ff_context", "net", "2"), ("proj_mlp",))

_READERS_SD = {"ComfyUI LoraLoader": "tested", "diffusers load_lora_weights": "tested",
               "A1111 / Forge": "code", "kohya sd-scripts": "code"}
_READERS_FLUX = {
    "ComfyUI LoraLoader": "tested", "diffusers lora_state_dict (kohya FLUX conversion)": "tested",
                 "Forge": "code", "kohya sd-scripts": "code"}

_SD_SCHEDULES = (
    SchedulePreset("dmd2", "timesteps", 4, "DMD2 README: LCMScheduler timesteps [999, 749, 499, 249]"),
    SchedulePreset("dmd2_1", "timesteps", 1, "DMD2 README: 1-step timestep [399]"),
    SchedulePreset("lcm_4", "timesteps", 4, "diffusers LCMScheduler, original_inference_steps=50"),
    SchedulePreset("turbo_4", "timesteps", 4, "ComfyUI SDTurboScheduler, 4 steps"),
    SchedulePreset("turbo_1", "timesteps", 1, "ComfyUI SDTurboScheduler, 1 step"),
    SchedulePreset("lightning_4", "timesteps", 4, "SDXL-Lightning model card: trailing timesteps"),
    SchedulePreset("hyper_4", "timesteps", 4, "Hyper-SD model card: DDIM/TCD trailing spacing"),
    SchedulePreset("lightning_2", "timesteps", 2, "SDXL-Lightning model card: trailing timesteps"),
)
_SD_BAD_NAMINGS = {
    "kohya_ldm": "kohya sd-scripts and diffusers name SD1.x/SD2.x UNet layers by diffusers module paths "
                 "(lora_unet_down_blocks_...); original ldm names (lora_unet_input_blocks_...) are "
                 "skipped there",
    "comfyui": "diffusion_model.* names are ComfyUI's own: A1111, Forge, kohya and diffusers skip them",
}

_UNET_BLOCKS = r"(input|output)_blocks\.\d+|middle_block"
_FLUX_BLOCKS = r"(double|single)_blocks\.\d+"

#: The model families PSO knows, keyed by the host's model config class name.
FAMILIES: dict[str, Family] = {
    "SD15": Family(
        "BaseModel", "sd_v1", "stable-diffusion-v1", IMPL_STABILITY, "kohya_diffusers", "512x512",
        _UNET_ATTENTION, _UNET_MLP, checkpoint_blocks=_UNET_BLOCKS, schedules=_SD_SCHEDULES,
        bad_namings=_SD_BAD_NAMINGS, readers=_READERS_SD,
        headless="SD 1.x UNet, one CLIP text encoder (hidden states of the last layer)"),
    "SD20": Family(
        "BaseModel", "sd_v2", "stable-diffusion-v2-512", IMPL_STABILITY, "kohya_diffusers", "512x512",
        _UNET_ATTENTION, _UNET_MLP, checkpoint_blocks=_UNET_BLOCKS, schedules=_SD_SCHEDULES,
        bad_namings=_SD_BAD_NAMINGS, readers=_READERS_SD,
        headless="SD 2.x UNet, one OpenCLIP text encoder (hidden states of the penultimate layer)"),
    "SDXL": Family(
        "SDXL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", IMPL_STABILITY, "kohya_ldm", "1024x1024",
        _UNET_ATTENTION, _UNET_MLP, checkpoint_blocks=_UNET_BLOCKS, schedules=_SD_SCHEDULES,
        bad_namings={"comfyui": _SD_BAD_NAMINGS["comfyui"]}, readers=_READERS_SD,
        headless="SDXL UNet, two text encoders (penultimate hidden states, pooled projection, size ids)"),
    "Flux": Family(
        "Flux", "flux1", "flux-1-dev", IMPL_FLUX, "kohya_ldm", "1024x1024",
        _FLUX_ATTENTION, _FLUX_MLP, in_place_residual=True, checkpoint_blocks=_FLUX_BLOCKS,
        bad_namings={"kohya_diffusers": "FLUX has no diffusers UNet names (its transformer is not a UNet)",
                     "comfyui": "kohya sd-scripts cuts a key at its first '.', so it cannot read "
                                "diffusion_model.* FLUX names"},
        checkpointing=False, readers=_READERS_FLUX),
    "FluxSchnell": Family(
        "Flux", "flux1", "flux-1-schnell", IMPL_FLUX, "kohya_ldm", "1024x1024",
        _FLUX_ATTENTION, _FLUX_MLP, in_place_residual=True, checkpoint_blocks=_FLUX_BLOCKS,
        schedules=(SchedulePreset("schnell_4", "flow", 4, "FLUX.1-schnell model card: 4 steps, "
                                  "ComfyUI's example: simple scheduler, shift 1.0"),),
        bad_namings={"kohya_diffusers": "FLUX has no diffusers UNet names (its transformer is not a UNet)",
                     "comfyui": "kohya sd-scripts cuts a key at its first '.', so it cannot read "
                                "diffusion_model.* FLUX names"},
        checkpointing=False, readers=_READERS_FLUX),
}

# ---- the newer few-step families (module names of ComfyUI's implementations) -----------------
_NEW_READERS = {"ComfyUI LoraLoader": "tested"}
_COMFYUI_ONLY = "kohya sd-scripts cuts a key at its first '.', so it cannot read diffusion_model.* names"
_FLOW_NOTE = "steps of ComfyUI's simple scheduler on the MODEL's own flow sampling (its shift)"

FAMILIES.update({
    # Z-Image-Turbo: Lumina2-style NextDiT (layers, noise_refiner and context_refiner blocks share names).
    "ZImage": Family(
        "Lumina2", "z_image", "z-image-turbo", IMPL_COMFYUI, "kohya_ldm", "1024x1024",
        (("attention", "qkv"), ("attention", "out")),
        (("feed_forward", "w1"), ("feed_forward", "w2"), ("feed_forward", "w3")),
        checkpoint_blocks=r"(layers|noise_refiner|context_refiner)\.\d+",
        schedules=(SchedulePreset("zimage_turbo_8", "flow", 8, "Z-Image-Turbo model card: 8 NFEs, no CFG; "
                                  f"{_FLOW_NOTE} (ComfyUI's ZImage shift 3.0)"),),
        bad_namings={"kohya_diffusers": "Z-Image is not a UNet", "comfyui": _COMFYUI_ONLY},
        readers=_NEW_READERS),
    # Qwen-Image: MMDiT whose ComfyUI module names are diffusers' (attn.to_q, img_mlp.net.0.proj ...).
    "QwenImage": Family(
        "QwenImage", "qwen_image", "qwen-image", IMPL_COMFYUI, "kohya_ldm", "1328x1328",
        (("attn", "to_q"), ("attn", "to_k"), ("attn", "to_v"), ("attn", "to_out", "0"),
         ("attn", "add_q_proj"), ("attn", "add_k_proj"), ("attn", "add_v_proj"), ("attn", "to_add_out")),
        (("img_mlp", "net", "0", "proj"), ("img_mlp", "net", "2"), ("txt_mlp", "net", "0", "proj"),
         ("txt_mlp", "net", "2")),
        checkpoint_blocks=r"transformer_blocks\.\d+",
        schedules=(SchedulePreset("qwen_lightning_4", "flow", 4, "Qwen-Image-Lightning (lightx2v) 4-step "
                                  f"LoRA, CFG 1; {_FLOW_NOTE}"),
                   SchedulePreset("qwen_lightning_8", "flow", 8, "Qwen-Image-Lightning (lightx2v) 8-step "
                                  f"LoRA, CFG 1; {_FLOW_NOTE}")),
        bad_namings={"kohya_diffusers": "Qwen-Image is not a UNet", "comfyui": _COMFYUI_ONLY},
        readers=_NEW_READERS, latent_dims=5),
    # SD3 / SD3.5 (Large Turbo is this class): MMDiT joint blocks, kohya's SD3 names are these.
    "SD3": Family(
        "SD3", "sd3", "stable-diffusion-3", IMPL_STABILITY, "kohya_ldm", "1024x1024",
        (("attn", "qkv"), ("attn", "proj")), (("mlp", "fc1"), ("mlp", "fc2")),
        checkpoint_blocks=r"joint_blocks\.\d+",
        schedules=(SchedulePreset("sd35_turbo_4", "flow", 4, "SD3.5 Large Turbo model card: 4 steps, "
                                  f"guidance 0; {_FLOW_NOTE} (ComfyUI's SD3 shift 3.0)"),),
        bad_namings={"kohya_diffusers": "SD3 is not a UNet", "comfyui": _COMFYUI_ONLY},
        readers=_NEW_READERS),
    # Wan 2.2 TI2V-5B (ComfyUI's WAN22_T2V): 5-D video latents, Conv3d patch embedding (not adapted).
    "WAN22_T2V": Family(
        "WAN22", "wan2.2", "wan-2.2-ti2v-5b", IMPL_COMFYUI, "kohya_ldm", "1280x704",
        (("self_attn", "q"), ("self_attn", "k"), ("self_attn", "v"), ("self_attn", "o"),
         ("cross_attn", "q"), ("cross_attn", "k"), ("cross_attn", "v"), ("cross_attn", "o")),
        (("ffn", "0"), ("ffn", "2")),
        checkpoint_blocks=r"blocks\.\d+",
        schedules=(SchedulePreset("wan_lightning_4", "flow", 4, "Wan2.2-TI2V-5B-Turbo (quanhaol; as a LoRA: "
                                  "Kijai's Wan22_TI2V_5B_Turbo_lora_rank_64), 4 steps, CFG 1 (lightx2v's "
                                  f"Lightning LoRAs are for A14B); {_FLOW_NOTE}"),),
        bad_namings={"kohya_diffusers": "Wan is not a UNet", "comfyui": _COMFYUI_ONLY},
        readers=_NEW_READERS, latent_dims=5),
    # Wan 2.1 T2V and BOTH experts of Wan 2.2 A14B (high-noise, low-noise): the host detects all of them as
    # WAN21_T2V (same WanModel, same keys; comfy/model_detection.py), so PSO cannot tell them apart. An A14B
    # expert runs only its part of the schedule (the sampler hands over at sigma 0.875 for T2V: Wan's
    # "boundary"; ComfyUI's templates: two KSamplerAdvanced, steps 0-2 high, 2-4 low, a lightx2v LoRA
    # each). PSO Train on one expert would sample references with that expert alone over the whole schedule
    # (never what the two-expert sampler makes) and train it on levels it never runs: PSO Sample References,
    # PSO Train and PSO Online Train refuse it, naming the supported Wan 2.2 model. Module names and file
    # conventions are WAN22_T2V's (same WanModel).
    "WAN21_T2V": Family(
        "WAN21", "wan2.1", "wan-2.1-t2v", IMPL_COMFYUI, "kohya_ldm", "1280x720",
        (("self_attn", "q"), ("self_attn", "k"), ("self_attn", "v"), ("self_attn", "o"),
         ("cross_attn", "q"), ("cross_attn", "k"), ("cross_attn", "v"), ("cross_attn", "o")),
        (("ffn", "0"), ("ffn", "2")),
        checkpoint_blocks=r"blocks\.\d+",
        bad_namings={"kohya_diffusers": "Wan is not a UNet", "comfyui": _COMFYUI_ONLY},
        readers=_NEW_READERS, latent_dims=5,
        refuse="ComfyUI loads Wan 2.1 T2V and each expert of Wan 2.2 A14B (high-noise and low-noise) as "
               "WAN21_T2V, and PSO cannot tell them apart. An A14B expert runs only part of the schedule, "
               "so training it alone would learn from references your two-expert sampler never makes and on "
               "noise levels that expert never runs. PSO does not train this class yet: for Wan 2.2 train "
               "TI2V-5B (wan2.2_ti2v_5B_fp16.safetensors, example pso_wan22_video)"),
    # FLUX.2: Flux's double / single streams (same module names) with global modulation.
    "Flux2": Family(
        "Flux2", "flux2", "flux-2", "https://github.com/black-forest-labs/flux2", "kohya_ldm", "1024x1024",
        _FLUX_ATTENTION, _FLUX_MLP, in_place_residual=True, checkpoint_blocks=_FLUX_BLOCKS,
        bad_namings={"kohya_diffusers": "FLUX.2 is not a UNet", "comfyui": _COMFYUI_ONLY},
        checkpointing=False, readers=_NEW_READERS),
})

#: Host model classes whose blocks add residuals in place but that have no row (no LoRA file
#: convention known here); training them still needs the copies.
_OTHER_IN_PLACE_RESIDUAL_MODELS = frozenset({"FluxInpaint", "Chroma", "HunyuanVideo"})


# ---- lookups ----------------------------------------------------------------------------------

def family(config: str) -> Family | None:
    """The row of a host model config class name, or None for a family PSO has no row for."""
    return FAMILIES.get(config)


def model_classes() -> dict[str, str]:
    """config class name -> the host's model class name, for every row."""
    return {name: f.model_class for name, f in FAMILIES.items()}


def in_place_residual(model_class: str) -> bool:
    """Whether models of the host model class ``model_class`` modify saved activations in place."""
    return model_class in _OTHER_IN_PLACE_RESIDUAL_MODELS or any(
        f.in_place_residual and f.model_class == model_class for f in FAMILIES.values())


def _union(parts: tuple[tuple[tuple[str, ...], ...], ...]) -> tuple[tuple[str, ...], ...]:
    return tuple(dict.fromkeys(s for p in parts for s in p))


def attention_suffixes() -> tuple[tuple[str, ...], ...]:
    """Attention-projection suffixes of every family, plus diffusers' joint-attention names."""
    return _union(tuple(f.attention for f in FAMILIES.values()) + (_DIFFUSERS_JOINT_ATTENTION,))


def mlp_suffixes() -> tuple[tuple[str, ...], ...]:
    """Feed-forward / projection suffixes of every family, plus diffusers' joint-transformer names."""
    return _union(tuple(f.mlp for f in FAMILIES.values()) + (_DIFFUSERS_JOINT_MLP,))


@lru_cache(maxsize=1)
def _blocks_pattern() -> re.Pattern:
    patterns = dict.fromkeys(f.checkpoint_blocks for f in FAMILIES.values() if f.checkpoint_blocks)
    return re.compile("|".join(f"(?:{p})" for p in patterns))


def is_checkpoint_block(path: str) -> bool:
    """Whether the module at ``path`` (relative to the diffusion model) is a top-level block of some
    family, the unit gradient checkpointing recomputes."""
    return bool(_blocks_pattern().fullmatch(path))


def headless_families() -> dict[str, str]:
    """config class name -> how the headless trainer conditions it, for the rows it trains."""
    return {name: f.headless for name, f in FAMILIES.items() if f.headless}


def flow_presets() -> dict[str, tuple[SchedulePreset, tuple[str, ...]]]:
    """Flow-model schedule presets by name: ``(preset, the config class names that list it)``."""
    out: dict[str, tuple[SchedulePreset, tuple[str, ...]]] = {}
    for name, row in FAMILIES.items():
        for preset in row.schedules:
            if preset.kind == "flow":
                known = out.get(preset.name, (preset, ()))
                out[preset.name] = (known[0], known[1] + (name,))
    return out


def checkpointing_works(config: str) -> bool:
    """Whether gradient checkpointing trains family ``config`` (unknown families: tried)."""
    row = FAMILIES.get(config)
    return True if row is None else row.checkpointing


def naming_problem(config: str, naming: str) -> str | None:
    """Why files of family ``config`` written with ``naming`` break common readers, or None."""
    row = FAMILIES.get(config)
    return None if row is None else row.bad_namings.get(naming)


def training_refusal(config: str) -> str | None:
    """Why PSO Train refuses MODELs of host config class ``config`` (the row's ``refuse``), or None."""
    row = FAMILIES.get(config)
    return (row.refuse or None) if row is not None else None
