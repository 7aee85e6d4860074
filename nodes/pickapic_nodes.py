"""Import human preference pairs (Pick-a-Pic layout) as offline PSO pairs (Eq. 6).

Row logic and file reading are :mod:`pso.preference_import`; this node decodes the images with
Pillow, VAE-encodes them in chunks (so memory holds latents, not every decoded image), builds the
same pairs as PSO Preference Pairs and optionally saves them as a pair dataset.
"""

from __future__ import annotations

import io as _io
import logging
import os
from pathlib import Path

import folder_paths
import numpy as np
import torch
from comfy_api.v0_0_2 import io
from PIL import Image, ImageOps

from ..pso import images as target_images
from ..pso import preference_import as pref
from . import dataset_nodes
from .preference_nodes import preference_pair_set
from .target_nodes import encode_targets, load_rgb
from .types import PAIRS_TYPE

logger = logging.getLogger(__name__)

CHUNK = 8  # pairs decoded and VAE-encoded together
_DEPTH = 3


def _list(root: str, suffix: str) -> list[str]:
    base = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        rel = Path(dirpath).relative_to(base)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and len(rel.parts) < _DEPTH)
        found += [(rel / f).as_posix() + suffix for f in sorted(filenames)
                  if Path(f).suffix.lower() in pref.TABLE_SUFFIXES]
    return found


def list_sources() -> list[str]:
    """Preference files under ComfyUI's input folder, then under its output folder ("... [output]")."""
    files = _list(folder_paths.get_input_directory(), "") + _list(folder_paths.get_output_directory(),
                                                                  " [output]")
    return files or ["(no .parquet/.jsonl/.csv file in the input folder)"]


def resolve_source(name: str) -> tuple[Path, Path]:
    """(file, the ComfyUI folder it lives in) for a combo value; anything outside input/output refused."""
    rel, base = folder_paths.annotated_filepath(name)
    root = Path(base or folder_paths.get_input_directory()).resolve()
    allowed = "ComfyUI's input folder (or its output folder, with the ' [output]' suffix)"
    if not rel.strip() or rel.startswith("("):
        raise pref.PreferenceImportError(f"no preference file chosen ({name!r}): put a Pick-a-Pic "
                                         ".parquet, or "
                                         f"a .jsonl/.csv pair table, into {allowed} and refresh (press R)")
    if os.path.isabs(rel) or ".." in Path(rel).parts:
        raise pref.PreferenceImportError(f"source {name!r} must be a path inside {allowed}, without '..'")
    path = (root / rel).resolve()
    if root not in path.parents:
        raise pref.PreferenceImportError(f"source {name!r} resolves to {path}, outside {root}: copy the file "
                                         f"into {allowed}")
    if not path.is_file():
        raise pref.PreferenceImportError(f"source {name!r} not found in {root}; refresh the list (press R)")
    return path, root


def decode(image: bytes | Path) -> torch.Tensor:
    """(H, W, 3) float32 in [0, 1] from encoded bytes or a file (EXIF-rotated, RGB)."""
    if isinstance(image, Path):
        return load_rgb(image)
    with Image.open(_io.BytesIO(image)) as img:
        img = ImageOps.exif_transpose(img)
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)


def _count(path: Path) -> int | None:
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            return None
        return int(pq.ParquetFile(str(path)).metadata.num_rows)
    with path.open("rb") as f:
        lines = sum(1 for line in f if line.strip())
    return lines - 1 if path.suffix.lower() == ".csv" else lines


def import_pairs(source: str, vae, size: int, max_pairs: int):
    """Read, classify, decode and VAE-encode; returns (winners, losers, prompts, sources, report).

    Shapes: winners, losers (P, C, H / f, W / f) outer latents on the CPU; prompts P strings.
    """
    import comfy.model_management
    import comfy.utils

    target_images.check_size(size)
    if size == 0:
        raise pref.PreferenceImportError("size must be above 0: preference images come in many sizes and are "
                                         "resized and centre-cropped to size x size")
    path, root = resolve_source(source)
    report = pref.ImportReport(source=source)
    total = _count(path)
    pbar = comfy.utils.ProgressBar(total or 1)
    winners, losers, prompts, sources, pending = [], [], [], [], []
    seen: dict[tuple[str, str, str], int] = {}  # row_key -> first row index
    fix = "Choose a size that is a multiple of the VAE's factor (8 for SD/SDXL, 16 for Flux)."

    def flush():
        if pending:
            winners.append(encode_targets(vae, torch.stack([p[0] for p in pending]), fix))
            losers.append(encode_targets(vae, torch.stack([p[1] for p in pending]), fix))
            pending.clear()

    for row in pref.read_rows(path, root):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if max_pairs and len(report.kept) >= max_pairs:
            report.stopped_at_max = True
            break
        report.rows_read += 1
        pbar.update_absolute(report.rows_read, total or report.rows_read)
        category, winner, reason = pref.classify(row)
        if category == "tie":
            report.ties.append(row.index)
        elif category == "unlabelled":
            report.unlabelled.append(row.index)
        elif category in ("bad_label", "missing_image"):
            getattr(report, category).append((row.index, reason))
        elif (first := seen.setdefault(pref.row_key(row), row.index)) != row.index:
            report.duplicate.append((row.index, f"same as row {first}"))
        else:
            pair = (row.image_0, row.image_1) if winner == 0 else (row.image_1, row.image_0)
            names = (row.source_0, row.source_1) if winner == 0 else (row.source_1, row.source_0)
            try:
                pixels = [target_images.resize_center_crop(decode(img), size) for img in pair]
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                report.unreadable_image.append((row.index, f"{type(exc).__name__}: {exc}"[:120]))
                continue
            pending.append(pixels)
            report.kept.append(row.index)
            prompts.append(row.prompt.strip())
            sources.append(names)
            if len(pending) >= CHUNK:
                flush()
    flush()
    if not report.kept:
        raise pref.PreferenceImportError(f"no usable pair in {source}:\n{report.summary()}")
    return torch.cat(winners), torch.cat(losers), prompts, sources, report


class PSOImportPreferencePairs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PSOImportPreferencePairs",
            display_name="PSO Import Preference Pairs (Pick-a-Pic)",
            category="PSO/data",
            description=(
                "Offline preference tuning (PSO Eq. 6) from human preference data: reads a Pick-a-Pic "
                "parquet shard (columns caption, jpg_0, jpg_1, label_0, label_1) or a .jsonl/.csv table "
                "(caption, image_0, image_1 as paths next to the table, label_0, label_1) from ComfyUI's "
                "input folder. The preferred image of each row becomes the target, the other the reference. "
                "Ties (equal labels), unlabelled rows and rows with missing or unreadable images are "
                "skipped and listed in the report. Train with pso_offline and reference_refresh_every 0."
            ),
            inputs=[
                io.Combo.Input("source", options=list_sources(), tooltip=(
                    "The preference file in ComfyUI's input folder (files in the output folder are listed "
                    "with ' [output]'). Press R after adding one.")),
                io.Model.Input("model", tooltip="The distilled model to fine-tune (converts the latents into "
                               "its latent space and fingerprints the pairs)."),
                io.Clip.Input("clip", tooltip="Text encoder that encodes the captions of the kept pairs."),
                io.Vae.Input("vae", tooltip="The model's VAE: encodes both images of every kept pair, once."),
                io.Sigmas.Input("sigmas", tooltip="The few-step SIGMAS you sample with (PSO Few-Step "
                                "Sigmas): training noise levels come from them."),
                io.Int.Input("size", default=512, min=8, max=4096, step=8, tooltip=(
                    "Every image is resized (shorter side) and centre-cropped to size x size: 512 for "
                    "SDXL-Turbo, 1024 for DMD2 / SDXL.")),
                io.Int.Input("max_pairs", default=0, min=0, max=10_000_000, tooltip=(
                    "Stop after this many kept pairs (0: read the whole file).")),
                io.String.Input("dataset_name", default="", tooltip=(
                    f"Also save the pairs to output/{dataset_nodes.DATASET_ROOT}/<name> (for PSO Load Pairs "
                    "and the headless trainer); empty: do not save. An existing dataset is never "
                    "overwritten.")),
            ],
            outputs=[
                PAIRS_TYPE.Output(display_name="pairs", tooltip=(
                    "Preferred/rejected pairs for PSO Train (method pso_offline).")),
                io.String.Output(display_name="report", tooltip=(
                    "Rows read, pairs kept, and every skipped row by category and index.")),
            ],
        )

    @classmethod
    def validate_inputs(cls, source=None) -> bool | str:
        """At queue time (the host's input validation): the preference file exists inside ComfyUI."""
        if source is None:  # from a link: execute() checks it
            return True
        try:
            resolve_source(source)
        except pref.PreferenceImportError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, source, **kwargs):
        try:
            path, _ = resolve_source(source)
        except pref.PreferenceImportError:
            return None
        st = path.stat()
        return (st.st_mtime_ns, st.st_size, path.parent.stat().st_mtime_ns)

    @classmethod
    def execute(cls, source, model, clip, vae, sigmas, size, max_pairs, dataset_name) -> io.NodeOutput:
        if dataset_name.strip():  # before the file is decoded and encoded, not after
            dataset_nodes.check_new_dataset(dataset_name.strip())
        winners, losers, prompts, sources, report = import_pairs(source, vae, size, max_pairs)
        pairs = preference_pair_set(model, clip, winners, losers, prompts, sigmas)
        text = report.summary()
        if dataset_name.strip():
            path, n = dataset_nodes.save_pairs(pairs, dataset_name.strip(), append=False, sources=sources)
            text += f"\nsaved {n} pairs to {path}"
        (logger.warning if report.skipped else logger.info)("PSO Import Preference Pairs: %s", text)
        return io.NodeOutput(pairs, text, ui={"text": [text]})
