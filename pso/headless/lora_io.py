"""The LoRA of a diffusers UNet (a :class:`pso.lora.LoRANetwork` in hook mode, as the ComfyUI side's
adapter), and the file PSO Save LoRA writes from it.

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
from ..lora import LoRAConfig, LoRANetwork

logger = logging.getLogger(__name__)

#: What is lost when an SDXL LoRA keeps diffusers names.
NAMING_WITHOUT_CONFIG = "A1111 and diffusers drop add_embedding, A1111 an upsampler conv"
#: peft's key suffix -> kohya's (adapters in checkpoints of the peft-based trainer, before issue 18).
_PEFT_TO_KOHYA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


def add_lora(unet: nn.Module, rank: int, alpha: float | None, target: str, seed: int) -> LoRANetwork:
    """A :class:`pso.lora.LoRANetwork` on the UNet's modules that the preset ``target`` selects, attached
    through forward hooks (the UNet's parameters and state-dict keys are untouched). B = 0; A is
    kaiming-uniform (a = sqrt(5), peft's and nn.Linear's default) from an explicit generator seeded with
    ``seed``, drawn as the peft-based trainer drew it (:func:`_peft_draws`), so a seed starts from the
    adapter it started from before. The adapter is on the CPU: move it with ``.to(device)``."""
    net = LoRANetwork.for_module(unet, LoRAConfig(rank=rank, alpha=alpha, target=target), torch.Generator())
    _peft_draws(net, torch.Generator().manual_seed(seed))
    net.attach(unet)
    return net


def _peft_draws(net: LoRANetwork, generator: torch.Generator) -> None:
    """Fill every ``down`` with the numbers peft's LoRA init takes from the random stream: per module,
    in module order, it builds the lora_A and lora_B layers (each draws its default kaiming-uniform
    weight) and then draws lora_A again, which is kept (B is zeroed). pso-train up to issue 18 ran
    that on the global RNG seeded with the same seed; this draws it from ``generator``."""
    with torch.no_grad():
        for path in net.paths:
            down = net.lora_down(path)
            scratch_a, scratch_b = torch.empty(down.shape), torch.empty(net.lora_up(path).shape)
            for t in (scratch_a, scratch_b, scratch_a):
                nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
            down.copy_(scratch_a)


def adapter_from_peft(tensors: Mapping[str, torch.Tensor], net: LoRANetwork, alpha: float
                      ) -> dict[str, torch.Tensor]:
    """``net.state_dict()`` from an adapter checkpointed by the peft-based trainer: ``<path>.lora_A.weight``
    / ``.lora_B.weight`` (named by module path) or the Trainer's ``param_NNNN`` (per module in module
    order: lora_A, lora_B). Raises ValueError when the tensors do not fit ``net``."""
    ups, downs = {}, {}
    if all(k.startswith("param_") for k in tensors):
        order = [(p, kind) for p in net.paths for kind in ("down", "up")]
        if len(tensors) != len(order):
            raise ValueError(f"the checkpoint holds {len(tensors)} adapter tensors, this run's LoRA has "
                             f"{len(order)}: rank and target must be the ones the run started with.")
        for i, (path, kind) in enumerate(order):
            (downs if kind == "down" else ups)[path] = tensors[f"param_{i:04d}"]
    else:
        for key, tensor in tensors.items():
            suffix = next((s for s in _PEFT_TO_KOHYA if key.endswith("." + s)), None)
            if suffix is None:
                raise ValueError(f"unexpected adapter tensor {key!r} in a peft-based checkpoint.")
            (downs if suffix == "lora_A.weight" else ups)[key[:-len(suffix) - 1]] = tensor
    if set(downs) != set(net.paths) or set(ups) != set(net.paths):
        raise ValueError(f"the checkpoint's adapter ({len(downs)} modules) does not fit this run's LoRA "
                         f"({len(net.paths)} modules): rank and target must be the ones the run started "
                         "with.")
    sd = {"alphas": torch.full((len(net.paths),), float(alpha))}
    for path in net.paths:
        key = path.replace(".", "/")
        sd[f"down.{key}"], sd[f"up.{key}"] = downs[path], ups[path]
    return sd


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


def kohya_tensors(lora: Mapping[str, torch.Tensor], naming: str = "kohya_diffusers",
                  unet_config: Mapping[str, Any] | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """``(file tensors, modules)``: an adapter's ``<module path>.lora_down.weight`` / ``.lora_up.weight`` /
    ``.alpha`` (:meth:`pso.lora.LoRANetwork.lora_state_dict`) renamed ``lora_unet_<path>.<suffix>``;
    ``modules`` groups them by module for the metadata.

    naming "kohya_diffusers": the diffusers module path; "kohya_ldm": its original module path
    (:func:`ldm_module_path`, needs ``unet_config``)."""
    if naming not in ("kohya_diffusers", "kohya_ldm"):
        raise ValueError(f"the headless trainer writes kohya_diffusers or kohya_ldm names, not {naming!r}.")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora.items():
        suffix = next((s for s in lora_format.LORA_SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            raise ValueError(f"unexpected LoRA tensor {key!r}: only lora_down / lora_up / alpha are saved.")
        modules.setdefault(key[:-len(suffix) - 1], {})[suffix] = tensor.contiguous()
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


def save_lora_file(lora: Mapping[str, torch.Tensor], folder: Path, stem: str, *, family: str, prediction: str,
                   latent_channels: int, ldm_shapes: Mapping[str, tuple[int, ...]] | None,
                   settings: Mapping[str, Any], unet_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``folder/stem_NNNNN.safetensors`` (never overwriting) with PSO Save LoRA's names (the
    family's naming; SDXL's original module names need ``unet_config``, the diffusers UNet's config)
    and metadata. ``lora``: :meth:`pso.lora.LoRANetwork.lora_state_dict`."""
    spec = lora_format.family_spec(family, lora_format.FAMILIES, prediction == "v")
    naming = spec.naming
    if naming == "kohya_ldm" and unet_config is None:
        logger.warning("no UNet config given: the %s LoRA is saved with diffusers names, which some readers "
                       "skip in part (%s)", family, NAMING_WITHOUT_CONFIG)
        naming = "kohya_diffusers"
    tensors, modules = kohya_tensors(lora, naming, unet_config)
    fingerprint = base_fingerprint(family, latent_channels, prediction, ldm_shapes)

    def metadata_for(path: Path) -> dict[str, str]:
        return lora_format.build_metadata(modules, spec, title=path.stem, settings=settings,
                                          naming=naming, base_fingerprint=fingerprint,
                                          prediction=prediction)

    return lora_format.save_new_file(tensors, folder, stem, metadata_for)
