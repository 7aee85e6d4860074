"""peft LoRA adapters on a diffusers UNet, and the file PSO Save LoRA writes from them.

The adapter targets the modules :data:`pso.lora.TARGETS` selects (the same presets as the ComfyUI
nodes). The saved file uses the key names PSO Save LoRA writes for the family (the family table's
naming, :mod:`pso.families`): kohya's diffusers names for SD1.x / SD2.x (``lora_unet_<diffusers module
path with '_'>``), kohya's original-module names for SDXL (``lora_unet_input_blocks_4_1_...``, from
:func:`ldm_module_path`), with ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` and the
metadata of :func:`pso.lora_format.build_metadata`. So a LoRA trained headless and one saved from
ComfyUI are the same kind of file, and every layer is one A1111, Forge and diffusers read (with
diffusers names an SDXL file would lose ``add_embedding`` there, and an upsampler conv in A1111).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import lora_format
from ..lora import TARGETS
from .model import require

logger = logging.getLogger(__name__)

ADAPTER = "pso"
#: What is lost when an SDXL LoRA keeps diffusers names.
NAMING_WITHOUT_CONFIG = "A1111 and diffusers drop add_embedding, A1111 an upsampler conv"
#: peft's key suffix -> kohya's.
_PEFT_TO_KOHYA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


def target_modules(unet: nn.Module, target: str) -> list[str]:
    """Module paths of ``unet`` the preset ``target`` adapts (Linear, Conv2d with groups=1)."""
    preset = TARGETS[target]
    names = [p for p, m in unet.named_modules()
             if p and preset.matches(p, m) and (isinstance(m, nn.Linear)
                                                or (isinstance(m, nn.Conv2d) and m.groups == 1))]
    if not names:
        raise ValueError(f"LoRA target {target!r} ({preset.description}) matched no module of the UNet; "
                         f"choose another target from {sorted(TARGETS)}.")
    return names


def add_lora(unet: nn.Module, rank: int, alpha: float | None, target: str, seed: int) -> list[nn.Parameter]:
    """Add a peft LoRA and return its parameters in module order (the optimizer's order on every
    process). B = 0; A is drawn, module by module, from an explicit generator seeded with ``seed``
    with peft's default init (kaiming-uniform, a = sqrt(5), as :data:`pso.lora.INITS` "kaiming"):
    the same adapter on every process and in every run, and the global RNG is left as it was."""
    peft = require("peft")
    names = target_modules(unet, target)
    config = peft.LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha), target_modules=names,
                             init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):  # peft's own init draws from the global RNG: discarded below
        unet.add_adapter(config, adapter_name=ADAPTER)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if name.endswith(f".lora_A.{ADAPTER}.weight"):
                fresh = torch.empty(param.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
                param.copy_(fresh)
    params = [p for n, p in unet.named_parameters() if ".lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def adapter_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """peft's adapter tensors (``<module path>.lora_A.weight`` ...) as CPU float32 copies."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    return {k: v.detach().float().cpu().clone() for k, v in sd.items()}


def load_adapter_state(unet: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy checkpointed adapter tensors into the model's peft adapter (names must match exactly)."""
    from peft.utils import set_peft_model_state_dict

    own = adapter_state(unet)
    if set(own) != set(tensors) or any(own[k].shape != tensors[k].shape for k in own):
        raise ValueError(f"the checkpoint's adapter ({len(tensors)} tensors) does not fit this run's LoRA "
                         f"({len(own)} tensors): rank and target must be the ones the run started with.")
    result = set_peft_model_state_dict(unet, dict(tensors), adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"peft did not use checkpoint tensors {unexpected[:5]}.")


#: diffusers ResnetBlock2D layer -> the original (ldm / sgm) ResBlock layer.
_RESNET_LAYERS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
#: diffusers top-level layers -> original ones.
_TOP_LAYERS = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _per_level(value: int | Sequence[int], levels: int) -> list[int]:
    return [int(value)] * levels if isinstance(value, int) else [int(v) for v in value]


def ldm_module_path(path: str, unet_config: Mapping[str, Any]) -> str:
    """The original (ldm / sgm) module path of a diffusers ``UNet2DConditionModel`` module path, as a
    single-file checkpoint (and ComfyUI) names the layer.

    The UNet's levels follow ``unet_config`` (diffusers' config: ``block_out_channels``,
    ``layers_per_block``, ``up_block_types``): level i of the down path holds layers_per_block[i]
    (resnet, attention) pairs and a downsampler, each its own ``input_blocks`` entry after conv_in;
    an up level holds one pair more, the last with the upsampler after the pair. Raises ValueError
    for a path outside that structure.
    """
    levels = len(unet_config["block_out_channels"])
    down = _per_level(unet_config.get("layers_per_block", 2), levels)
    up = [n + 1 for n in reversed(down)]
    up_types = list(unet_config.get("up_block_types", ()))
    for old, new in _TOP_LAYERS.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    m = (re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                      r"\.(\d+)(?:\.(.*))?", path)
         or re.fullmatch(r"(mid_block)\.(resnets|attentions)\.(\d+)(?:\.(.*))?", path))
    mid = {("resnets", 0): "0", ("attentions", 0): "1", ("resnets", 1): "2"}
    if m is None or (m.group(1) == "mid_block" and (m.group(2), int(m.group(3))) not in mid):
        raise ValueError(f"{path!r} is not a layer of a diffusers UNet2DConditionModel that has an original "
                         "module name")
    if m.group(1) == "mid_block":
        kind, j, rest = m.group(2), int(m.group(3)), m.group(4)
        block = "middle_block." + mid[(kind, j)]
    else:
        side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down_blocks":
            start = 1 + sum(n + 1 for n in down[:i])
            if kind == "downsamplers":
                block = f"input_blocks.{start + down[i]}.0"
                rest = "op" + rest[len("conv"):] if rest and rest.startswith("conv") else rest
            else:
                block = f"input_blocks.{start + j}.{0 if kind == 'resnets' else 1}"
        else:
            start = sum(up[:i])
            if kind == "upsamplers":
                has_attention = i < len(up_types) and "CrossAttn" in up_types[i]
                block = f"output_blocks.{start + up[i] - 1}.{2 if has_attention else 1}"
            else:
                block = f"output_blocks.{start + j}.{0 if kind == 'resnets' else 1}"
    if kind == "resnets" and rest:
        head, _, tail = rest.partition(".")
        rest = _RESNET_LAYERS.get(head, head) + ("." + tail if tail else "")
    return block + ("." + rest if rest else "")


def kohya_tensors(adapter: Mapping[str, torch.Tensor], alpha: float, naming: str = "kohya_diffusers",
                  unet_config: Mapping[str, Any] | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """``(file tensors, modules)``: peft adapter tensors renamed ``lora_unet_<path>.lora_down.weight``,
    ``.lora_up.weight`` and ``.alpha``; ``modules`` groups them by module for the metadata.

    naming "kohya_diffusers": the diffusers module path; "kohya_ldm": its original module path
    (:func:`ldm_module_path`, needs ``unet_config``)."""
    if naming not in ("kohya_diffusers", "kohya_ldm"):
        raise ValueError(f"the headless trainer writes kohya_diffusers or kohya_ldm names, not {naming!r}.")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.items():
        suffix = next((s for s in _PEFT_TO_KOHYA if key.endswith("." + s)), None)
        if suffix is None:
            raise ValueError(f"unexpected peft adapter tensor {key!r}: only lora_A / lora_B are saved.")
        path = key[:-len(suffix) - 1]
        modules.setdefault(path, {})[_PEFT_TO_KOHYA[suffix]] = tensor.contiguous()
    for parts in modules.values():
        parts["alpha"] = torch.tensor(float(alpha))
    if naming == "kohya_ldm":
        if unet_config is None:
            raise ValueError("kohya_ldm names need the UNet's config (its levels and layers per block).")
        paths = {p: ldm_module_path(p, unet_config) for p in modules}
    else:
        paths = {p: p for p in modules}
    tensors = {f"{lora_format.kohya_name(paths[p], naming)}.{s}": t
               for p, parts in modules.items() for s, t in parts.items()}
    return tensors, modules


def base_fingerprint(family: str, latent_channels: int, prediction: str,
                     ldm_shapes: Mapping[str, tuple[int, ...]] | None) -> dict[str, Any]:
    """The ``pso.base_fingerprint`` the ComfyUI loader compares: family fields, plus the structure
    hash of the UNet in ComfyUI's module paths when the base model was a single-file checkpoint
    (a diffusers folder has no ldm paths to hash; the PSO loader then warns that it cannot compare)."""
    spec = lora_format.family_spec(family, lora_format.FAMILIES, prediction == "v")
    model_class = lora_format.MODEL_CLASSES.get(family, family)
    fp: dict[str, Any] = {"model_config": family, "model_class": model_class,
                          "latent_channels": int(latent_channels), "architecture": spec.architecture}
    if ldm_shapes:
        fp["unet_structure_sha256"] = lora_format.structure_sha256(ldm_shapes)
    return fp


def save_lora_file(adapter: Mapping[str, torch.Tensor], alpha: float, folder: Path, stem: str, *, family: str,
                   prediction: str, latent_channels: int, ldm_shapes: Mapping[str, tuple[int, ...]] | None,
                   settings: Mapping[str, Any], unet_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``folder/stem_NNNNN.safetensors`` (never overwriting) with PSO Save LoRA's names (the
    family's naming; SDXL's original module names need ``unet_config``, the diffusers UNet's config)
    and metadata."""
    spec = lora_format.family_spec(family, lora_format.FAMILIES, prediction == "v")
    naming = spec.naming
    if naming == "kohya_ldm" and unet_config is None:
        logger.warning("no UNet config given: the %s LoRA is saved with diffusers names, which some readers "
                       "skip in part (%s)", family, NAMING_WITHOUT_CONFIG)
        naming = "kohya_diffusers"
    tensors, modules = kohya_tensors(adapter, alpha, naming, unet_config)
    fingerprint = base_fingerprint(family, latent_channels, prediction, ldm_shapes)

    def metadata_for(path: Path) -> dict[str, str]:
        return lora_format.build_metadata(modules, spec, title=path.stem, settings=settings,
                                          naming=naming, base_fingerprint=fingerprint,
                                          prediction=prediction)

    return lora_format.save_new_file(tensors, folder, stem, metadata_for)
