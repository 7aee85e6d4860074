"""Save a trained PSO LoRA as a file other tools read, and load one with its base model checked."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator

import folder_paths
import torch
from comfy_api.v0_0_2 import io, ui

from ..pso.limits import LimitError, loads_json
from . import lora_files
from .types import LORA_MODEL_TYPE

logger = logging.getLogger(__name__)

#: Messages the host logs for LoRA tensors it did not use (comfy/lora.py, comfy/sd.py).
HOST_NOT_LOADED = ("lora key not loaded: ", "NOT LOADED ")


class PSOSaveLoRA(io.ComfyNode):
    """Write a LORA_MODEL into ComfyUI's loras folder with kohya names and metadata."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PSOSaveLoRA",
            display_name="PSO Save LoRA",
            category="PSO/lora",
            description=(
                "Saves a trained LoRA as .safetensors into ComfyUI's first 'loras' folder, named the way "
                "kohya / A1111 / Forge name LoRAs for this model family, with kohya and modelspec metadata "
                "plus the base model's fingerprint and the training settings. Never overwrites a file: a "
                "counter is appended to the name. Load it with PSO LoRA Loader or the stock Load LoRA."
            ),
            is_output_node=True,
            inputs=[
                LORA_MODEL_TYPE.Input(
                    "lora", tooltip="The trained LoRA (LORA_MODEL output of a training node)."),
                io.Model.Input(
                    "model",
                    tooltip="The base model the LoRA was trained on: picks the key names and is "
                    "fingerprinted so loaders can refuse a model of another family.",
                ),
                io.String.Input(
                    "filename_prefix",
                    default="pso/pso_lora",
                    tooltip="Subfolder and file name inside the loras folder; '_00001' and so on is "
                    "appended. No absolute paths and no '..'.",
                ),
                io.String.Input(
                    "settings",
                    optional=True,
                    force_input=True,
                    tooltip="Optional JSON summary of the training run (from the training node), stored in "
                    "the file's pso.settings metadata.",
                ),
            ],
            outputs=[
                io.String.Output(
                    display_name="lora_name",
                    tooltip="The saved file's name relative to the loras folder, as LoRA loaders list it.",
                )
            ],
        )

    @classmethod
    def execute(cls, lora, model, filename_prefix, settings=None) -> io.NodeOutput:
        roots = folder_paths.get_folder_paths("loras")
        folder, stem = lora_files.save_location(filename_prefix, roots)
        parsed = lora_files.parse_settings(settings)
        tensors, naming, modules = lora_files.to_file_state_dict(lora, model)
        if bad := nonfinite_tensors(tensors):
            raise ValueError(
                f"PSO Save LoRA: {len(bad)} of the LoRA's {len(tensors)} tensors hold NaN or infinite values "
                f"(first {bad[0]}); a model with it would sample NaN. Nothing was saved: train again with a "
                "lower learning_rate (the training node's summary says at which step it diverged).")

        def metadata_for(path):
            return lora_files.build_metadata(modules, model, title=path.stem, settings=parsed, naming=naming)

        path = lora_files.save_new_file(tensors, folder, stem, metadata_for)
        name = os.path.relpath(path, roots[0])
        logger.info("Saved %s in %s: %d LoRA modules, %s key names.", name, roots[0], len(modules), naming)
        # shown in the node (web/pso_results.js): the name Load LoRA lists, first
        text = f"saved {name} (loras folder; {len(modules)} LoRA modules, {naming} key names)"
        if problem := lora_files.naming_problem(model, naming):
            text += f"\nWarning: other tools may not read this file: {problem}."
            logger.warning("%s: other tools may not read this file: %s.", name, problem)
        return io.NodeOutput(name, ui=ui.PreviewText(text))


@contextlib.contextmanager
def host_not_loaded_messages() -> Iterator[list[str]]:
    """Collect the host's "lora key not loaded" warnings (logged on the root logger) in the block."""
    found: list[str] = []

    class Collector(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            for prefix in HOST_NOT_LOADED:
                if message.startswith(prefix):
                    found.append(message[len(prefix):])

    handler = Collector(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield found
    finally:
        root.removeHandler(handler)


def check_base_model(metadata: dict[str, str], model, lora_name: str) -> list[str]:
    """Raise ValueError if the file's fingerprint names another model family; return warnings."""
    current = lora_files.fingerprint(model)
    text = metadata.get("pso.base_fingerprint")
    if text is None:
        warnings = ["no pso.base_fingerprint: not saved by PSO Save LoRA, so its base model is not checked"]
        arch = metadata.get("modelspec.architecture", "").split("/")[0]
        if arch and arch != current["architecture"]:
            warnings.append(
                f"its modelspec.architecture is {arch!r} but the MODEL is {current['architecture']!r}")
        return warnings
    try:
        saved = loads_json(text, f"{lora_name!r}'s pso.base_fingerprint")
    except (json.JSONDecodeError, LimitError) as exc:
        raise ValueError(f"PSO LoRA Loader: {lora_name!r} has a damaged pso.base_fingerprint ({exc}): "
                         f"{text[:120]!r}. Remove that metadata field or re-save the LoRA.") from exc
    if not isinstance(saved, dict):
        raise ValueError(f"PSO LoRA Loader: {lora_name!r} has a damaged pso.base_fingerprint: a JSON "
                         f"{type(saved).__name__}, not the object PSO Save LoRA writes ({text[:120]!r}). "
                         "Remove that metadata field or re-save the LoRA.")
    error, warning = lora_files.compare_fingerprints(saved, current)
    if error:
        raise ValueError(
            f"PSO LoRA Loader: refusing {lora_name!r}: {error}. Connect a {saved.get('model_config')} model, "
            f"or choose a LoRA trained on {current['model_config']}.")
    return [warning] if warning else []


def _adapter_shape_problem(model_key: str, adapter, weight_shape: tuple[int, ...]) -> str | None:
    """Why a parsed LoRA patch cannot be applied to a weight of ``weight_shape`` (None if it can or
    if its kind is not one this check knows)."""
    weights = getattr(adapter, "weights", None)
    if type(adapter).__name__ == "LoRAAdapter" and isinstance(weights, tuple) and len(weights) >= 4:
        up, down, _, mid = weights[:4]
        if mid is not None or len(weights) > 5 and weights[5] is not None:
            return None  # LoCon mid / reshaped LoRAs: left to the host
        rows, inner = up.shape[0], math.prod(down.shape[1:])
        fits = (up.ndim >= 2 and down.ndim >= 2 and up.shape[1] == down.shape[0] and len(weight_shape) >= 1
                and rows == weight_shape[0] and inner == math.prod(weight_shape[1:]))
        if not fits:
            return (f"{model_key}: up {tuple(up.shape)} x down {tuple(down.shape)} cannot make the model's "
                    f"weight {weight_shape}")
        return None
    if isinstance(adapter, tuple) and len(adapter) == 2 and adapter[0] == "diff":
        diff = adapter[1][0]
        if tuple(diff.shape) != weight_shape:
            return f"{model_key}: a diff of {tuple(diff.shape)} for the model's weight {weight_shape}"
    return None


def check_shapes(tensors: dict, model, lora_name: str) -> None:
    """Refuse a LoRA whose tensors do not fit the MODEL's weights, naming the first mismatch.

    The host applies patches lazily: a wrong-shaped LoRA loads "successfully" and fails (or is
    skipped with a log line) only when sampling patches the weights, so the sampler runs without it.
    The file is parsed with the host's own key map and adapter classes, and every LoRA / diff
    patch's shape is compared with the weight it targets before anything is applied.
    """
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(tensors, key_map, log_missing=False)
    state = model.model.state_dict()
    problems = []
    for model_key, adapter in patches.items():
        if not isinstance(model_key, str) or model_key not in state:
            continue
        problem = _adapter_shape_problem(model_key, adapter, tuple(state[model_key].shape))
        if problem:
            problems.append(problem)
    if problems:
        raise ValueError(
            f"PSO LoRA Loader: refusing {lora_name!r}: {len(problems)} of its {len(patches)} layers do not "
            f"fit this MODEL, first {problems[0]}. It was made for a differently shaped model (another "
            "family or variant): connect the model it was trained on, or choose a LoRA made for this one.")


def nonfinite_tensors(tensors: dict) -> list[str]:
    """Keys of the floating-point tensors holding NaN or infinite values."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


class PSOLoraLoader(io.ComfyNode):
    """Apply a .safetensors LoRA to a MODEL as the stock loader does, after checking its base model."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PSOLoraLoader",
            display_name="PSO LoRA Loader",
            category="PSO/lora",
            description=(
                "Applies a .safetensors LoRA from the loras folders to the diffusion model exactly as the "
                "stock LoRA loader does, and shows its metadata. Refuses pickle files (.ckpt, .pt) and a PSO "
                "LoRA trained on another model family; reports LoRA keys the model did not use."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to apply the LoRA to."),
                io.Combo.Input(
                    "lora_name",
                    options=folder_paths.get_filename_list("loras"),
                    tooltip="A LoRA file from the loras folders; only .safetensors files are read.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-4.0,
                    max=4.0,
                    step=0.01,
                    tooltip="How strongly the LoRA changes the model: 1 as trained, 0 off, negative "
                    "inverts it.",
                ),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the LoRA applied (the input model is not changed)."),
                io.String.Output(
                    display_name="info",
                    tooltip="The file's metadata (training settings, base model) and any warnings, as text.",
                ),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, **kwargs):
        """Re-run when the file changes (the host only passes widget values here)."""
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            return float("nan")  # never equal: execute() reports the missing file
        stat = os.stat(path)
        return (path, stat.st_mtime_ns, stat.st_size)

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        import comfy.sd

        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        tensors, metadata = lora_files.read_lora_file(path, lora_name)
        warnings = check_base_model(metadata, model, lora_name)
        check_shapes(tensors, model, lora_name)
        if bad := nonfinite_tensors(tensors):
            warnings.append(f"{len(bad)} tensors hold NaN or infinite values ({', '.join(bad[:5])}): the "
                            "model will sample NaN (black or noise images) wherever they apply; retrain it")
            logger.warning("PSO LoRA Loader: %s has non-finite tensors: %s", lora_name, bad[:5])
        if strength == 0:
            patched, unused = model, []
            warnings.append("strength is 0: the LoRA is not applied")
        else:
            with host_not_loaded_messages() as unused:
                patched, _ = comfy.sd.load_lora_for_models(model, None, tensors, strength, 0)
        if unused:
            logger.warning("PSO LoRA Loader: %d keys of %s were not used by the model: %s", len(unused),
                           lora_name, unused[:5])
            warnings.append(f"{len(unused)} keys were not used by this model: " + ", ".join(unused[:20])
                            + (" ..." if len(unused) > 20 else ""))
        return io.NodeOutput(patched, report(lora_name, strength, tensors, metadata, warnings))


def report(lora_name: str, strength: float, tensors: dict, metadata: dict[str, str],
           warnings: list[str]) -> str:
    """The loader's text output: a summary line, the recommendation, warnings, pretty metadata."""
    modules = sum(k.endswith((".lora_up.weight", ".lora_B.weight")) for k in tensors)
    lines = [
        f"LoRA {lora_name} at strength {strength}: {len(tensors)} tensors, {modules} LoRA modules, "
        f"{metadata.get('pso.key_naming', 'unknown')} key names.",
        f"Recommended sampling: sampler {metadata.get('pso.recommended_sampler', 'unknown')}, "
        f"{metadata.get('pso.recommended_steps', 'unknown')} steps.",
    ]
    lines += ["Warnings:", *(f"- {w}" for w in warnings)] if warnings else ["Warnings: none"]
    lines += ["Metadata:", lora_files.pretty_metadata(metadata) if metadata else "(none)"]
    return "\n".join(lines)
