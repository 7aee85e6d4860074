"""Save pair sets to disk and load them back (the format of ``pso.dataset``, docs/pair-dataset-format.md)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from comfy_api.v0_0_2 import io

from ..pso import dataset as pso_dataset
from ..pso.limits import check_name
from . import pairing
from .types import PAIRS_TYPE, PairSet

logger = logging.getLogger(__name__)

DATASET_ROOT = "pso_pairs"  # under ComfyUI's output folder
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.+-]*(/[A-Za-z0-9][A-Za-z0-9 _.+-]*)*")


def dataset_root() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory()) / DATASET_ROOT


def dataset_path(name: str) -> Path:
    """``<output>/pso_pairs/<name>``; refuses absolute names, ``..`` and anything resolving outside."""
    root = dataset_root()
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name.split("/"):
        raise ValueError(
            f"dataset name {name!r} is not allowed: use letters, digits, spaces and _ . + - with optional "
            f"sub-folders separated by '/', no '..' and no absolute path (datasets live in {root})"
        )
    for part in name.split("/"):
        check_name(part, "dataset name")
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"dataset name {name!r} resolves outside {root} (a symlink?); pick another name")
    return path


def check_new_dataset(name: str) -> Path:
    """The folder of a dataset that is about to be created; refuses (before any work is done) a bad
    name and a folder that exists and is not empty, which the writer would refuse at the end."""
    path = dataset_path(name)
    if path.is_dir() and any(path.iterdir()):
        raise ValueError(f"dataset {name!r} already exists and is not empty ({path}): choose a new "
                         "dataset_name, or leave it empty and save with PSO Save Pairs (append) instead")
    if path.exists() and not path.is_dir():
        raise ValueError(f"dataset name {name!r}: {path} is a file, not a folder; choose another name")
    return path


def list_datasets() -> list[str]:
    root = dataset_root()
    if not root.is_dir():
        return []
    found = [p.parent.relative_to(root).as_posix() for p in root.rglob("manifest.json")]
    return sorted(found)


def fingerprint_of(pairs: PairSet) -> pso_dataset.DatasetFingerprint:
    fp = pairs.fingerprint
    return pso_dataset.DatasetFingerprint(
        model_family=fp["model_family"],
        latent_channels=fp["latent_channels"],
        latent_height=fp["latent_height"],
        latent_width=fp["latent_width"],
        latent_format=fp["latent_format"],
        sigmas=pairs.sigmas,
        sampler=pairs.policy,
    )


def save_pairs(pairs: PairSet, name: str, append: bool,
               sources: list[tuple[str, str]] | None = None) -> tuple[Path, int]:
    """Write (or extend) a dataset; returns its folder and its size.

    sources: optional (target_source, reference_source) per pair, recorded in the manifest's items.
    """
    path = dataset_path(name)
    with (
        torch.inference_mode(False),
        pso_dataset.PairDatasetWriter(path, fingerprint_of(pairs), append=append) as writer,
    ):
        for i in range(len(pairs)):
            traj = None if pairs.reference_traj is None else pairs.reference_traj.select([i]).detach()
            writer.add(
                pairs.target[i].clone(),
                pairs.reference[i].clone(),
                pairs.prompts[int(pairs.prompt_index[i])],
                reference_traj=traj,
                target_source=None if sources is None else sources[i][0],
                reference_source=None if sources is None else sources[i][1],
            )
        size = len(writer)
    return path, size


#: Shards a streamed dataset keeps in memory (pso.dataset.PairDataset's LRU cache).
STREAM_CACHED_SHARDS = 4


def load_pairs(name: str, model, clip) -> tuple[PairSet, list[str]]:
    """Load a dataset for ``model``: refuse another family or resolution; return pairs and warnings.

    Pairs without trajectories (preference pairs, offline PSO) are streamed: the PairSet's target and
    reference are :class:`pso.dataset.LatentColumn` views that read the shards a batch needs, so memory
    stays flat in the dataset's size; every shard's SHA-256 is checked here first (one pass over the
    files, a chunk at a time). Pairs with trajectories (full PSO) are read into memory as before.
    """
    path = dataset_path(name)
    ds = pso_dataset.PairDataset.open(path, max_cached_shards=STREAM_CACHED_SHARDS)
    latent_shape = (ds.fingerprint.latent_channels, ds.fingerprint.latent_height, ds.fingerprint.latent_width)
    own = pairing.model_fingerprint(model, latent_shape)
    model_fp = pso_dataset.DatasetFingerprint(
        model_family=own["model_family"],
        latent_channels=own["latent_channels"],
        latent_height=own["latent_height"],
        latent_width=own["latent_width"],
        latent_format=own["latent_format"],
        sigmas=ds.fingerprint.sigmas,
        sampler=ds.fingerprint.sampler,
    )
    warnings = ds.fingerprint.check_compatible(model_fp)
    if not len(ds):
        ds.get([])  # raises the empty-dataset message
    if ds.trajectory_policies:
        items = ds.get(list(range(len(ds))))
        target, reference = items["target"].float(), items["reference"].float()
        item_prompts, traj = items["prompts"], items.get("reference_traj")
    else:
        ds.verify()
        target = pso_dataset.LatentColumn(ds, "target")
        reference = pso_dataset.LatentColumn(ds, "reference")
        item_prompts, traj = list(ds.prompts), None
    prompts = pairing.unique_in_order(item_prompts)
    index = {p: i for i, p in enumerate(prompts)}
    pairs = PairSet(
        target=target,
        reference=reference,
        reference_traj=traj,
        prompt_index=torch.tensor([index[p] for p in item_prompts]),
        prompts=prompts,
        conds=[pairing.encode_prompt(clip, p) for p in prompts],
        sigmas=torch.tensor(ds.fingerprint.sigmas, dtype=torch.float32),
        policy=ds.fingerprint.sampler,
        fingerprint=own,
    )
    return pairs, warnings


class PSOSavePairs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PSOSavePairs",
            display_name="PSO Save Pairs",
            category="PSO/data",
            description=f"Saves pairs as a reusable dataset in output/{DATASET_ROOT}/<name> (safetensors "
            "shards and a manifest; docs/pair-dataset-format.md), to reload, extend or share.",
            is_output_node=True,
            inputs=[
                PAIRS_TYPE.Input("pairs", tooltip="The pairs to save (from PSO Build Pairs)."),
                io.String.Input(
                    "name",
                    default="my_pairs",
                    tooltip=f"Dataset folder under output/{DATASET_ROOT}; '/' makes sub-folders.",
                ),
                io.Boolean.Input(
                    "append",
                    default=False,
                    tooltip="Add to an existing dataset of the same model and schedule instead of "
                    "refusing to touch it.",
                ),
            ],
            outputs=[
                io.String.Output(display_name="dataset", tooltip="The dataset name, for PSO Load Pairs.")
            ],
        )

    @classmethod
    def execute(cls, pairs, name, append) -> io.NodeOutput:
        path, size = save_pairs(pairs, name, append)
        logger.info("PSO Save Pairs: %d pairs in %s", size, path)
        # shown in the node (web/pso_results.js)
        return io.NodeOutput(name, ui={"text": [f"saved: output/{DATASET_ROOT}/{name} holds {size} pairs"]})


class PSOLoadPairs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PSOLoadPairs",
            display_name="PSO Load Pairs",
            category="PSO/data",
            description="Loads a pair dataset saved by PSO Save Pairs for this model; a dataset built for "
            "another model family or resolution is refused.",
            inputs=[
                io.Combo.Input(
                    "dataset",
                    options=list_datasets() or ["(none saved yet)"],
                    tooltip=f"A dataset in output/{DATASET_ROOT}.",
                ),
                io.Model.Input(
                    "model", tooltip="The model to train (must match the dataset's family and size)."
                ),
                io.Clip.Input("clip", tooltip="Text encoder for the dataset's prompts (stored as text)."),
            ],
            outputs=[
                PAIRS_TYPE.Output(display_name="pairs", tooltip="The loaded pairs, for PSO Train LoRA.")
            ],
        )

    @classmethod
    def validate_inputs(cls, dataset=None) -> bool | str:
        """At queue time (the host's input validation): the dataset exists and has a manifest."""
        if dataset is None:  # from a link: execute() checks it
            return True
        try:
            path = dataset_path(dataset)
        except ValueError as exc:
            return str(exc)
        if not (path / "manifest.json").is_file():
            saved = list_datasets()
            return (f"dataset {dataset!r} not found in {dataset_root()} (no manifest.json there): save one "
                    "with PSO Save Pairs, PSO Pick Pairs or PSO Import Preference Pairs first, then refresh "
                    f"(press R); saved datasets: {saved or 'none'}")
        return True

    @classmethod
    def fingerprint_inputs(cls, dataset, **kwargs):
        manifest = dataset_path(dataset) / "manifest.json"
        return os.stat(manifest).st_mtime_ns if manifest.exists() else None

    @classmethod
    def execute(cls, dataset, model, clip) -> io.NodeOutput:
        pairs, warnings = load_pairs(dataset, model, clip)
        for w in warnings:
            logger.warning("PSO Load Pairs: %s", w)
        return io.NodeOutput(pairs)
