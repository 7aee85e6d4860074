"""The LoRA file format both the ComfyUI save node and the headless trainer write (pure, no host).

Key namings (:data:`NAMINGS`), the model families' kohya / modelspec descriptions (:data:`FAMILIES`),
the metadata fields (:func:`build_metadata`) and the never-overwrite atomic publication
(:func:`save_new_file`) live here so that a LoRA trained headless and one saved from ComfyUI are the
same kind of file. ``nodes/lora_files.py`` adds what needs the host (module paths read from a
ComfyUI model, its base-model fingerprint).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
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
