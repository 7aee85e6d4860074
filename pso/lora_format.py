"""The LoRA file format both the ComfyUI save node and the headless trainer write (pure, no host).

Key namings (:data:`NAMINGS`), the model families' kohya / modelspec descriptions (:data:`FAMILIES`),
the metadata fields (:func:`build_metadata`) and the never-overwrite atomic publication
(:func:`save_new_file`) live here so that a LoRA trained headless and one saved from ComfyUI are the
same kind of file; so does the headless trainer's whole writer (:func:`save_lora_file`: kohya names
from a diffusers UNet's module paths, :func:`ldm_module_path` for the original ones). The one other
module about LoRA files, ``nodes/lora_files.py``, adds only what needs the host (module paths read
from a ComfyUI model, its base-model fingerprint, ComfyUI's loras folders).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import __version__, families
from . import io as pso_io
from .limits import LimitError, loads_json

logger = logging.getLogger(__name__)

LORA_EXTENSION = "safetensors"

#: Key namings of a saved file: the single source of truth (dispatch, metadata, error messages).
NAMINGS: dict[str, str] = {
    "kohya_diffusers": "lora_unet_<diffusers module path with '_'> (kohya sd-scripts SD1.x/2.x, A1111/Forge)",
    "kohya_ldm": "lora_unet_<original module path with '_'> (kohya sd-scripts SDXL and FLUX, A1111/Forge)",
    "comfyui": "diffusion_model.<module path> (ComfyUI's native LoRA names)",
}
#: modelspec.implementation per naming: whose module names the keys follow (as sd-scripts writes it);
#: ``kohya_ldm`` depends on the family (:func:`implementation`), SD/SDXL's is listed.
IMPLEMENTATIONS: dict[str, str] = {
    "kohya_diffusers": families.IMPL_DIFFUSERS,
    "kohya_ldm": families.IMPL_STABILITY,
    "comfyui": families.IMPL_COMFYUI,
}
DEFAULT_COMMENT = f"PSO (Pairwise Sample Optimization, arXiv 2410.03190) LoRA, comfyui-pso {__version__}"
#: The tensors of one LoRA module (kohya layout); anything else is refused.
LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
#: The fields of a base-model fingerprint that must match for a LoRA to fit at all.
FAMILY_FIELDS = ("model_config", "model_class", "latent_channels")
#: modelspec.prediction_type per parameterisation (none for rectified flow).
PREDICTION_TYPES = {"eps": "epsilon", "v": "v"}


@dataclass(frozen=True)
class FamilySpec:
    """How files for one model family are named and described.

    base_model_version: kohya's ``ss_base_model_version``. architecture: modelspec architecture id
    (without the ``/lora`` adapter suffix). naming: a key of :data:`NAMINGS`. ldm_implementation:
    modelspec ``implementation`` of files whose keys follow the original module names (``kohya_ldm``).
    resolution: ``modelspec.resolution`` ("WxH"; empty: not written).
    """

    base_model_version: str
    architecture: str
    naming: str
    ldm_implementation: str = families.IMPL_STABILITY
    resolution: str = ""


#: Keyed by ComfyUI's model config class name (``comfy.supported_models``), matched exactly so a
#: derived family (SSD-1B, Vega, ...) is never mistaken for its parent; read from the one family table
#: (:data:`pso.families.FAMILIES`). v-prediction variants of the SD1/SD2 families: :func:`family_spec`.
FAMILIES: dict[str, FamilySpec] = {
    name: FamilySpec(f.base_model_version, f.architecture, f.naming, f.ldm_implementation, f.resolution)
    for name, f in families.FAMILIES.items()}
#: ComfyUI's model class (``comfy.model_base``) of each family, for base-model fingerprints written
#: outside the host.
MODEL_CLASSES: dict[str, str] = families.model_classes()


def family_spec(config: str, families: Mapping[str, FamilySpec], v_prediction: bool = False) -> FamilySpec:
    """The :class:`FamilySpec` of a model config class name; unknown families get ComfyUI naming.

    v-prediction SD1/SD2 models get kohya's ``_v`` base model version (``sd_v2_v``, ``...-768-v``).
    """
    spec = families.get(config)
    if spec is None:
        return FamilySpec(f"comfyui_{config.lower()}", config.lower(), "comfyui", IMPLEMENTATIONS["comfyui"])
    if config in ("SD15", "SD20") and v_prediction:
        arch = "stable-diffusion-v2-768-v" if config == "SD20" else spec.architecture
        resolution = "768x768" if config == "SD20" else spec.resolution
        spec = replace(spec, base_model_version=spec.base_model_version + "_v", architecture=arch,
                       resolution=resolution)
    return spec


def implementation(spec: FamilySpec, naming: str) -> str:
    """modelspec.implementation of a file: whose module names its keys follow (as sd-scripts writes it):
    diffusers' for ``kohya_diffusers``, ComfyUI's for ``comfyui``, the family's original code for
    ``kohya_ldm`` (Stability's generative-models for SD/SDXL, Black Forest Labs' flux for FLUX)."""
    if naming == "kohya_ldm":
        return spec.ldm_implementation
    return IMPLEMENTATIONS[naming]


def structure_sha256(shapes: Mapping[str, Sequence[int]]) -> str:
    """SHA-256 of a UNet's state-dict keys and shapes (never its weights), in ComfyUI's module paths:
    every fine-tune of one architecture shares it, a differently shaped variant does not."""
    lines = "\n".join(f"{k}:{'x'.join(str(s) for s in shapes[k])}" for k in sorted(shapes))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def kohya_name(path: str, naming: str, unet_prefix: str = "diffusion_model.") -> str:
    """The file key prefix of the LoRA module at ``path`` (a module path in the naming's own
    convention: diffusers paths for ``kohya_diffusers``, ldm paths for the other two)."""
    if naming not in NAMINGS:
        raise ValueError(f"unknown LoRA key naming {naming!r}; choose one of {sorted(NAMINGS)}.")
    if naming == "comfyui":
        return unet_prefix + path
    return "lora_unet_" + path.replace(".", "_")


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------

def parse_settings(text: str | None) -> dict[str, Any]:
    """The training node's JSON summary (a JSON object) as a dict; ``None`` or blank -> ``{}``."""
    if text is None or not text.strip():
        return {}
    try:
        settings = loads_json(text, "settings")
    except LimitError as exc:
        raise ValueError(f"settings must be the JSON summary of a PSO training node: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"settings must be the JSON summary of a PSO training node; it is not valid JSON "
                         f"({exc}): {text[:120]!r}") from exc
    if not isinstance(settings, dict):
        raise ValueError(f"settings must be a JSON object (the training node's summary), got "
                         f"{type(settings).__name__}: {text[:120]!r}")
    return settings


def recommendation(settings: Mapping[str, Any]) -> tuple[str, str]:
    """``(sampler, steps)`` to sample the LoRA with, from the training settings.

    Read from ``settings["sampler"]`` and ``settings["sampling_steps"]`` (or ``len(settings["sigmas"])
    - 1``): PSO trains for the sampler and schedule its references were drawn with. "unknown" when
    the settings do not say.
    """
    sampler = settings.get("sampler")
    steps = settings.get("sampling_steps")
    sigmas = settings.get("sigmas")
    if steps is None and isinstance(sigmas, list) and len(sigmas) > 1:
        steps = len(sigmas) - 1
    return ("unknown" if sampler is None else str(sampler)), ("unknown" if steps is None else str(steps))


def _uniform(values: set, fmt: Callable[[Any], str]) -> str:
    """kohya writes "Dynamic" where modules differ (networks/resize_lora.py)."""
    return fmt(next(iter(values))) if len(values) == 1 else "Dynamic"


def build_metadata(modules: Mapping[str, Mapping[str, torch.Tensor]], spec: FamilySpec, *, title: str,
                   settings: Mapping[str, Any], naming: str, base_fingerprint: Mapping[str, Any],
                   prediction: str | None, created: datetime | None = None) -> dict[str, str]:
    """String-only safetensors metadata for a LoRA file.

    kohya fields: ``ss_network_module`` ("networks.lora"), ``ss_network_dim`` / ``ss_network_alpha``
    (from the tensors; "Dynamic" if modules differ), ``ss_base_model_version``, ``ss_output_name``,
    ``ss_training_comment``. modelspec 1.0.0: ``sai_model_spec``, ``architecture`` ("<id>/lora"),
    ``implementation`` (whose module names the keys use), ``title``, ``date``, and
    ``prediction_type`` for eps / v models (``prediction``: "eps", "v" or None), ``resolution`` (the
    family's native "WxH"); ``ss_v2`` ("True" for SD2.x, which A1111 / Forge detect by it). PSO:
    ``pso.version``, ``pso.key_naming``, ``pso.base_fingerprint`` and ``pso.settings`` (JSON),
    ``pso.recommended_sampler``, ``pso.recommended_steps``; ``ss_steps`` (the optimizer steps the
    adapter actually had) when the settings carry the training node's ``steps_trained``.
    """
    ranks = {int(parts["lora_down.weight"].shape[0]) for parts in modules.values()}
    alphas = {float(parts["alpha"]) if "alpha" in parts else float(parts["lora_down.weight"].shape[0])
              for parts in modules.values()}
    sampler, steps = recommendation(settings)
    created = created or datetime.now(timezone.utc)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _uniform(ranks, str),
        "ss_network_alpha": _uniform(alphas, lambda a: str(float(a))),
        "ss_base_model_version": spec.base_model_version,
        "ss_output_name": title,
        "ss_training_comment": str(settings.get("comment", DEFAULT_COMMENT)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{spec.architecture}/lora",
        "modelspec.implementation": implementation(spec, naming),
        "modelspec.title": title,
        # A1111 and Forge tell SD2 from SD1 only by ss_v2 (sd-scripts writes it for every model)
        "ss_v2": str(spec.base_model_version.startswith("sd_v2")),
        "modelspec.date": created.isoformat(timespec="seconds"),
        "pso.version": __version__,
        "pso.key_naming": naming,
        "pso.base_fingerprint": json.dumps(dict(base_fingerprint), sort_keys=True),
        "pso.settings": json.dumps(dict(settings), sort_keys=True),
        "pso.recommended_sampler": sampler,
        "pso.recommended_steps": steps,
    }
    if spec.resolution:
        meta["modelspec.resolution"] = spec.resolution
    if prediction in PREDICTION_TYPES:
        meta["modelspec.prediction_type"] = PREDICTION_TYPES[prediction]
    trained = settings.get("steps_trained")  # what the adapter had, not what was asked for
    if isinstance(trained, int) and not isinstance(trained, bool):
        meta["ss_steps"] = str(trained)
    return meta


# --------------------------------------------------------------------------------------------
# Writing without ever overwriting
# --------------------------------------------------------------------------------------------

def save_new_file(tensors: Mapping[str, torch.Tensor], folder: Path, stem: str,
                  metadata_for: Callable[[Path], dict[str, str]], attempts: int = 100) -> Path:
    """Write ``folder/stem_NNNNN.safetensors`` (next free counter) and return its path.

    The file is written atomically to a hidden temporary name (``pso.io``) and published with a hard
    link, which fails instead of replacing a file that appeared in between: an existing file is never
    overwritten, even by a second process saving at the same moment. metadata_for(path) gives the
    file's metadata (its title is the final name).
    """
    folder.mkdir(parents=True, exist_ok=True)
    pso_io.sweep_stale_temps(folder)
    for _ in range(attempts):
        final = pso_io.unique_path(folder, stem, LORA_EXTENSION)
        tmp = folder / f".{stem}.{uuid.uuid4().hex}.partial"
        try:
            pso_io.atomic_save_safetensors(tensors, tmp, metadata_for(final))
            if _publish(tmp, final):
                return final
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    raise FileExistsError(f"could not find a free file name for {folder / stem}_NNNNN.{LORA_EXTENSION} "
                          f"in {attempts} attempts; another process keeps taking them.")


def _publish(tmp: Path, final: Path) -> bool:
    """Give ``tmp`` the name ``final`` unless that exists; False if it does."""
    try:
        os.link(tmp, final)
        return True
    except FileExistsError:
        return False
    except OSError:  # file systems without hard links (FAT, some network shares)
        if final.exists():
            return False
        os.rename(tmp, final)  # Windows refuses an existing target; POSIX: checked just above
        return True


# --------------------------------------------------------------------------------------------
# Files of a diffusers UNet's LoRA (the headless trainer, pso-train)
# --------------------------------------------------------------------------------------------

#: What is lost when an SDXL LoRA keeps diffusers names.
NAMING_WITHOUT_CONFIG = "A1111 and diffusers drop add_embedding, A1111 an upsampler conv"

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
        suffix = next((s for s in LORA_SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            raise ValueError(f"unexpected LoRA tensor {key!r}: only lora_down / lora_up / alpha are saved.")
        modules.setdefault(key[:-len(suffix) - 1], {})[suffix] = tensor.contiguous()
    if naming == "kohya_ldm":
        if unet_config is None:
            raise ValueError("kohya_ldm names need the UNet's config (its levels and layers per block).")
        paths = {p: ldm_module_path(p, unet_config) for p in modules}
    else:
        paths = {p: p for p in modules}
    tensors = {f"{kohya_name(paths[p], naming)}.{s}": t
               for p, parts in modules.items() for s, t in parts.items()}
    return tensors, modules


def base_fingerprint(family: str, latent_channels: int, prediction: str,
                     ldm_shapes: Mapping[str, tuple[int, ...]] | None) -> dict[str, Any]:
    """The ``pso.base_fingerprint`` the ComfyUI loader compares: family fields, plus the structure
    hash of the UNet in ComfyUI's module paths when the base model was a single-file checkpoint
    (a diffusers folder has no ldm paths to hash; the PSO loader then warns that it cannot compare)."""
    spec = family_spec(family, FAMILIES, prediction == "v")
    model_class = MODEL_CLASSES.get(family, family)
    fp: dict[str, Any] = {"model_config": family, "model_class": model_class,
                          "latent_channels": int(latent_channels), "architecture": spec.architecture}
    if ldm_shapes:
        fp["unet_structure_sha256"] = structure_sha256(ldm_shapes)
    return fp


def save_lora_file(lora: Mapping[str, torch.Tensor], folder: Path, stem: str, *, family: str, prediction: str,
                   latent_channels: int, ldm_shapes: Mapping[str, tuple[int, ...]] | None,
                   settings: Mapping[str, Any], unet_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``folder/stem_NNNNN.safetensors`` (never overwriting) with PSO Save LoRA's names (the
    family's naming; SDXL's original module names need ``unet_config``, the diffusers UNet's config)
    and metadata. ``lora``: :meth:`pso.lora.LoRANetwork.lora_state_dict`."""
    spec = family_spec(family, FAMILIES, prediction == "v")
    naming = spec.naming
    if naming == "kohya_ldm" and unet_config is None:
        logger.warning("no UNet config given: the %s LoRA is saved with diffusers names, which some readers "
                       "skip in part (%s)", family, NAMING_WITHOUT_CONFIG)
        naming = "kohya_diffusers"
    tensors, modules = kohya_tensors(lora, naming, unet_config)
    fingerprint = base_fingerprint(family, latent_channels, prediction, ldm_shapes)

    def metadata_for(path: Path) -> dict[str, str]:
        return build_metadata(modules, spec, title=path.stem, settings=settings,
                                          naming=naming, base_fingerprint=fingerprint,
                                          prediction=prediction)

    return save_new_file(tensors, folder, stem, metadata_for)
