"""The LoRA pso-train trains on a diffusers UNet: a :class:`pso.lora.LoRANetwork` in hook mode (the
ComfyUI side's adapter), on the modules a :data:`pso.lora.TARGETS` preset selects (the nodes' presets),
started as the peft-based trainer started it for the same seed; and the conversion of that trainer's
checkpointed adapters. The file written from it is :func:`pso.lora_format.save_lora_file`'s.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from torch import nn

from ..lora import LoRAConfig, LoRANetwork

logger = logging.getLogger(__name__)

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


