"""LoRA files other tools read: kohya key names, kohya / modelspec metadata, a base-model fingerprint.

The LoRA leaves ComfyUI as a ``.safetensors`` file in the kohya layout (``{name}.lora_down.weight``,
``{name}.lora_up.weight``, ``{name}.alpha``), named the way the model family's usual trainer names it,
so ComfyUI's LoraLoader, A1111/Forge and kohya's tools all read it:

- ``kohya_diffusers``: ``lora_unet_<diffusers module path, '.' -> '_'>`` (kohya sd-scripts for SD1.x
  and SD2.x, whose UNet has diffusers module names), e.g.
  ``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q``. The diffusers path is the
  inverse of the host's own ``comfy.utils.unet_to_diffusers(unet_config)``, the table ComfyUI uses to
  read such files back, so every name written is one the host maps to the layer it came from;
- ``kohya_ldm``: ``lora_unet_<original (ldm / sgm / flux) module path, '.' -> '_'>`` (kohya
  sd-scripts for SDXL and FLUX, whose networks keep the original module names, and which records
  Stability's generative-models, or Black Forest Labs' flux, as the modelspec implementation), e.g.
  ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` or
  ``lora_unet_double_blocks_0_img_attn_qkv``. The host maps this form for every model from its own
  state-dict keys; kohya sd-scripts, Forge and diffusers read it for FLUX too;
- ``comfyui``: ``diffusion_model.<module path>`` (ComfyUI's native LORA_MODEL names, read by the stock
  LoraLoader for every model family): the fallback for families with no kohya convention known here.

Each family's default naming and the namings that break its common readers are rows of the one family
table (:mod:`pso.families`); a file written with such a naming is saved with a warning that says so.

Metadata values are strings, as every trainer writes them: kohya's ``ss_*`` fields, Stability's
modelspec (``modelspec.*``) and ``pso.*`` fields (see :func:`build_metadata`).

Host modules (``comfy``) are imported inside functions; the pure helpers (paths, settings) need none.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from ..pso import (
    __version__,  # noqa: F401 (written into the metadata; re-exported)
    families,
    lora_format,
)
from ..pso import io as pso_io  # noqa: F401 (tests patch pso_io through this module)
from ..pso.limits import LimitError, check_name, loads_json
from ..pso.lora_format import (  # noqa: F401 (the format's names, re-exported for the nodes)
    DEFAULT_COMMENT,
    FAMILIES,
    FAMILY_FIELDS,
    IMPLEMENTATIONS,
    LORA_EXTENSION,
    LORA_SUFFIXES,
    NAMINGS,
    FamilySpec,
    parse_settings,
    recommendation,
    save_new_file,
)
from .host_training import UNET_PREFIX

logger = logging.getLogger(__name__)

#: What the loader accepts: safetensors under its usual extension and ComfyUI's short alias.
READ_EXTENSIONS = (".safetensors", ".sft")



def family_of(model) -> tuple[str, FamilySpec]:
    """``(config class name, FamilySpec)`` of a ModelPatcher; unknown families get ComfyUI naming."""
    import comfy.model_base

    config = type(model.model.model_config).__name__
    v_pred = model.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    return config, lora_format.family_spec(config, FAMILIES, v_pred)


# --------------------------------------------------------------------------------------------
# Base-model fingerprint
# --------------------------------------------------------------------------------------------

def fingerprint(model) -> dict[str, Any]:
    """What a LoRA needs its base model to be: family fields plus a hash of the UNet's structure.

    ``unet_structure_sha256`` hashes the diffusion model's state-dict keys and shapes, never its
    weights: every fine-tune of one architecture shares it, a differently shaped variant does not.
    """
    _, spec = family_of(model)
    sd = model.model.diffusion_model.state_dict()
    return {
        "model_config": type(model.model.model_config).__name__,
        "model_class": type(model.model).__name__,
        "latent_channels": int(model.model.latent_format.latent_channels),
        "architecture": spec.architecture,
        "unet_structure_sha256": lora_format.structure_sha256({k: tuple(v.shape) for k, v in sd.items()}),
    }


def describe_fingerprint(fp: Mapping[str, Any]) -> str:
    return (f"{fp.get('model_config', '?')} (model class {fp.get('model_class', '?')}, "
            f"{fp.get('latent_channels', '?')} latent channels)")


def compare_fingerprints(saved: Mapping[str, Any], current: Mapping[str, Any]
                         ) -> tuple[str | None, str | None]:
    """``(error, warning)``: an error when the model family differs (the LoRA cannot fit), a warning
    when only the UNet structure hash does (same family, differently shaped variant: e.g. an
    inpainting UNet, whose attention layers still match)."""
    if any(saved.get(k) != current.get(k) for k in FAMILY_FIELDS):
        return (f"it was trained on {describe_fingerprint(saved)} but the MODEL is "
                f"{describe_fingerprint(current)}"), None
    if saved.get("unet_structure_sha256") != current.get("unet_structure_sha256"):
        return None, (f"the base UNet's layer shapes differ from the ones it was trained on (same family "
                      f"{saved.get('model_config')}); layers whose shapes differ will not be patched")
    return None, None


# --------------------------------------------------------------------------------------------
# Key names
# --------------------------------------------------------------------------------------------

def lora_modules(lora: Mapping[str, torch.Tensor], model) -> dict[str, dict[str, torch.Tensor]]:
    """Group a LORA_MODEL dict by module: ``{ldm path: {"lora_down.weight": .., "lora_up.weight": ..,
    "alpha": ..}}`` (alpha optional), checked against ``model``'s UNet.

    Raises ValueError for a key that is not ``diffusion_model.<path>.<lora suffix>``, a path that is
    not a layer of this UNet, a module missing its down or up matrix, or shapes that do not fit.
    """
    unet = model.model.diffusion_model
    layers = dict(unet.named_modules())
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora.items():
        suffix = next((s for s in LORA_SUFFIXES if key.endswith("." + s)), None)
        if not key.startswith(UNET_PREFIX) or suffix is None:
            raise ValueError(
                f"LoRA key {key!r} is not a UNet LoRA tensor ('{UNET_PREFIX}<layer>.' followed by one of "
                f"{list(LORA_SUFFIXES)}); PSO Save LoRA writes plain LoRA adapters only. Save other adapter "
                "types (LoHa, LoKr, OFT) with the native 'Save LoRA Weights' node.")
        path = key[len(UNET_PREFIX):-len(suffix) - 1]
        if getattr(layers.get(path), "weight", None) is None:
            raise ValueError(
                f"LoRA key {key!r} names no layer of this MODEL's UNet ({type(model.model).__name__}); "
                "connect the model the LoRA was trained on to the 'model' input.")
        modules.setdefault(path, {})[suffix] = tensor
    for path, parts in modules.items():
        missing = [s for s in LORA_SUFFIXES[:2] if s not in parts]
        if missing:
            raise ValueError(f"LoRA module {path!r} lacks {missing}; the LORA_MODEL is incomplete.")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        weight = layers[path].weight
        if (up.shape[0] != weight.shape[0] or down.shape[1] != weight.shape[1]
                or down.shape[0] != up.shape[1]):
            raise ValueError(
                f"LoRA module {path!r} has down {tuple(down.shape)} and up {tuple(up.shape)}, which do not "
                f"fit the MODEL's weight {tuple(weight.shape)}; connect the model the LoRA was trained on.")
    if not modules:
        raise ValueError("the LORA_MODEL holds no tensors; connect the LoRA output of a training node.")
    return modules


def _diffusers_paths(model) -> dict[str, str]:
    """ldm module path -> diffusers module path, inverted from ``comfy.utils.unet_to_diffusers``.

    The host's table maps both ``class_embedding.*`` and ``add_embedding.*`` to ``label_emb.0.*``;
    the host reads either name, and the sorted-first one (``add_embedding``, diffusers' name in SDXL)
    is used so the choice does not depend on set order.
    """
    import comfy.utils

    table = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    inverse: dict[str, str] = {}
    for diffusers_key in sorted(table):
        if diffusers_key.endswith(".weight"):
            inverse.setdefault(table[diffusers_key][:-len(".weight")], diffusers_key[:-len(".weight")])
    return inverse


def file_names(paths: list[str], model, naming: str) -> tuple[dict[str, str], str]:
    """``({ldm path: file key prefix}, naming used)`` for the LoRA modules at ``paths``.

    ``kohya_diffusers`` falls back to ``kohya_ldm`` (logged) when a path has no diffusers name in the
    host's table; the naming actually used is returned and belongs in the file's metadata.
    """
    if naming not in NAMINGS:
        raise ValueError(f"unknown LoRA key naming {naming!r}; choose one of {sorted(NAMINGS)}.")
    if naming == "kohya_diffusers":
        table = _diffusers_paths(model)
        unmapped = [p for p in paths if p not in table]
        if not unmapped:
            return {p: "lora_unet_" + table[p].replace(".", "_") for p in paths}, naming
        logger.warning("%d LoRA layers have no diffusers name in the host's table (e.g. %s); writing kohya "
                       "names with the original module paths instead", len(unmapped), unmapped[:3])
        naming = "kohya_ldm"
    if naming == "kohya_ldm":
        names = {p: "lora_unet_" + p.replace(".", "_") for p in paths}
    else:
        names = {p: UNET_PREFIX + p for p in paths}
    if len(set(names.values())) != len(names):
        raise ValueError(f"two LoRA layers get the same {naming} name; save with another naming "
                         f"({sorted(NAMINGS)}).")
    return names, naming


def naming_problem(model, naming: str) -> str | None:
    """Why a file of ``model``'s family written with ``naming`` breaks common readers (the family
    table's ``bad_namings``), or None."""
    return families.naming_problem(family_of(model)[0], naming)


def to_file_state_dict(lora: Mapping[str, torch.Tensor], model, naming: str | None = None
                       ) -> tuple[dict[str, torch.Tensor], str, dict[str, dict[str, torch.Tensor]]]:
    """A LORA_MODEL dict renamed for a file: ``(tensors, naming used, modules)``.

    naming: a key of :data:`NAMINGS`; default: the family's (:data:`FAMILIES`). Tensors are the
    same objects, renamed (``{name}.lora_down.weight``, ``{name}.lora_up.weight``, ``{name}.alpha``).
    """
    modules = lora_modules(lora, model)
    names, used = file_names(list(modules), model, naming or family_of(model)[1].naming)
    if problem := naming_problem(model, used):
        logger.warning("LoRA saved with %s key names: %s", used, problem)
    tensors = {f"{names[p]}.{suffix}": t for p, parts in modules.items() for suffix, t in parts.items()}
    return tensors, used, modules


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------

def build_metadata(modules: Mapping[str, Mapping[str, torch.Tensor]], model, *, title: str,
                   settings: Mapping[str, Any], naming: str, created: datetime | None = None
                   ) -> dict[str, str]:
    """String-only safetensors metadata for a LoRA saved from ``model``
    (:func:`pso.lora_format.build_metadata` with the host model's family, fingerprint and prediction)."""
    import comfy.model_base

    _, spec = family_of(model)
    prediction = {comfy.model_base.ModelType.EPS: "eps",
                  comfy.model_base.ModelType.V_PREDICTION: "v"}.get(model.model.model_type)
    return lora_format.build_metadata(modules, spec, title=title, settings=settings, naming=naming,
                                      base_fingerprint=fingerprint(model), prediction=prediction,
                                      created=created)


# --------------------------------------------------------------------------------------------
# Where files go, and how they are written and read
# --------------------------------------------------------------------------------------------

def _inside(path: str, roots: list[str]) -> bool:
    """Whether ``path`` is one of ``roots`` or below one (all absolute, same normalisation)."""
    for root in roots:
        with contextlib.suppress(ValueError):  # Windows: different drives have no common path
            if os.path.commonpath([path, root]) == root:
                return True
    return False


def save_location(prefix: str, roots: list[str]) -> tuple[Path, str]:
    """``(folder, stem)`` for a file prefix like ``"pso/pso_lora"`` under ``roots[0]``.

    Refuses (ValueError) an empty prefix, an absolute one, any ``..`` component, and a folder whose
    real path (symlinks resolved) lies outside every folder in ``roots`` (all configured ``loras``
    folders count as inside). Both '/' and '\\' separate folders. A trailing ``.safetensors`` is
    dropped from the stem. Nothing is created.
    """
    if not roots:
        raise ValueError("ComfyUI has no 'loras' folder configured; add one (extra_model_paths.yaml).")
    text = prefix.strip()
    parts = [p for p in re.split(r"[\\/]", text) if p not in ("", ".")]
    if (not text or os.path.isabs(text) or text[0] in "/\\" or re.match(r"^[A-Za-z]:", text)
            or ".." in parts or "\0" in text):
        raise ValueError(
            f"filename_prefix {prefix!r} must be a relative path inside the loras folder (like "
            "'pso/pso_lora'): no absolute path, drive letter or '..'.")
    if not parts or re.split(r"[\\/]", text)[-1] in ("", "."):
        raise ValueError(f"filename_prefix {prefix!r} must end in a file name (like 'pso/pso_lora').")
    for part in parts:
        check_name(part, "filename_prefix part")
    stem = parts[-1]
    if stem.lower().endswith("." + LORA_EXTENSION):
        stem = stem[: -len(LORA_EXTENSION) - 1]
    folder = Path(roots[0], *parts[:-1])
    real_roots = [os.path.realpath(r) for r in roots]
    if not stem or not _inside(os.path.realpath(folder), real_roots):
        raise ValueError(
            f"filename_prefix {prefix!r} resolves to {os.path.realpath(folder)}, outside the loras folders "
            f"{roots}; choose a subfolder of {roots[0]}.")
    return folder, stem


def read_lora_file(path: str, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` LoRA, on the CPU, read with safetensors only.

    Anything else is refused: pickle-based formats (.ckpt, .pt, .bin, .pth) can run code when they
    are loaded, and this never unpickles.
    """
    ext = os.path.splitext(name)[1].lower()
    if ext not in READ_EXTENSIONS:
        raise ValueError(
            f"{name!r} is a {ext or 'extension-less'} file; PSO only reads .safetensors LoRA files (pickle "
            "formats such as .ckpt, .pt and .bin can run code when loaded). Convert it to .safetensors, "
            "or load it with the stock 'Load LoRA' node if you trust its source.")
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            keys = f.keys()
            tensors = {k: f.get_tensor(k) for k in keys}
    except safetensors.SafetensorError as exc:
        raise ValueError(f"{name!r} is not a readable .safetensors file ({exc}); PSO only reads "
                         "safetensors LoRA files, and never unpickles a file.") from exc
    return tensors, metadata


#: Characters of one metadata value shown in the loader's text (the file keeps all of it): a file can
#: carry megabytes of metadata, which would otherwise be sent to the browser and drawn in the node.
MAX_SHOWN_VALUE = 4000
MAX_SHOWN_KEYS = 200


def pretty_metadata(metadata: Mapping[str, str]) -> str:
    """Metadata as indented JSON, with the JSON-valued fields (``pso.settings``...) expanded; values
    longer than :data:`MAX_SHOWN_VALUE` characters and keys past :data:`MAX_SHOWN_KEYS` are cut, with
    a note of what was left out."""
    shown: dict[str, Any] = {}
    keys = sorted(metadata)
    for key in keys[:MAX_SHOWN_KEYS]:
        value = metadata[key]
        if len(value) > MAX_SHOWN_VALUE:
            value = f"{value[:MAX_SHOWN_VALUE]}... (cut: {len(value):,} characters in the file)"
        elif key.startswith("pso.") and value[:1] in "{[":
            with contextlib.suppress(json.JSONDecodeError, LimitError):
                value = loads_json(value, key)
        shown[key[:200]] = value
    if len(keys) > MAX_SHOWN_KEYS:
        shown["(not shown)"] = f"{len(keys) - MAX_SHOWN_KEYS} more metadata keys"
    return json.dumps(shown, indent=2, sort_keys=True)
