"""peft LoRA adapters on a diffusers UNet, and the file PSO Save LoRA writes from them.

The adapter targets the modules :data:`pso.lora.TARGETS` selects (the same presets as the ComfyUI
nodes). The saved file uses kohya's diffusers naming (``lora_unet_<diffusers module path with
'_'>``, ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``), which ComfyUI's LoraLoader maps for
every UNet family, and the metadata of :func:`pso.lora_format.build_metadata`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import lora_format
from ..lora import TARGETS
from .model import require

logger = logging.getLogger(__name__)

ADAPTER = "pso"
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
    """Add a peft LoRA (B = 0, A from peft's default init seeded with ``seed``) and return its
    parameters in module order (the optimizer's order on every process)."""
    peft = require("peft")
    names = target_modules(unet, target)
    config = peft.LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha), target_modules=names,
                             init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=ADAPTER)
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


def kohya_tensors(adapter: Mapping[str, torch.Tensor], alpha: float
                  ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """``(file tensors, modules)``: peft adapter tensors renamed ``lora_unet_<path>.lora_down.weight``,
    ``.lora_up.weight`` and ``.alpha``; ``modules`` groups them by module for the metadata."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.items():
        suffix = next((s for s in _PEFT_TO_KOHYA if key.endswith("." + s)), None)
        if suffix is None:
            raise ValueError(f"unexpected peft adapter tensor {key!r}: only lora_A / lora_B are saved.")
        path = key[:-len(suffix) - 1]
        modules.setdefault(path, {})[_PEFT_TO_KOHYA[suffix]] = tensor.contiguous()
    for parts in modules.values():
        parts["alpha"] = torch.tensor(float(alpha))
    tensors = {f"{lora_format.kohya_name(p, 'kohya_diffusers')}.{s}": t
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
                   settings: Mapping[str, Any]) -> Path:
    """Write ``folder/stem_NNNNN.safetensors`` (never overwriting) with PSO Save LoRA's metadata."""
    tensors, modules = kohya_tensors(adapter, alpha)
    spec = lora_format.family_spec(family, lora_format.FAMILIES, prediction == "v")
    fingerprint = base_fingerprint(family, latent_channels, prediction, ldm_shapes)

    def metadata_for(path: Path) -> dict[str, str]:
        return lora_format.build_metadata(modules, spec, title=path.stem, settings=settings,
                                          naming="kohya_diffusers", base_fingerprint=fingerprint,
                                          prediction=prediction)

    return lora_format.save_new_file(tensors, folder, stem, metadata_for)
