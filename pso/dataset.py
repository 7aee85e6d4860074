"""The on-disk pair dataset: target / reference latent pairs in safetensors shards plus a JSON manifest.

A pair dataset is built once (in a ComfyUI graph or a script), then reloaded, extended and shared;
a headless multi-GPU trainer streams it shard by shard, so memory stays flat in the number of pairs.
The full specification, with an example, is ``docs/pair-dataset-format.md``. In short (version 1)::

    my_pairs/
      manifest.json              format "comfyui-pso.pairs", version 1, fingerprint, columns,
                                 shards (file, rows, bytes, sha256), items (prompt, shard, row, ...)
      shard_00000.safetensors    one row per pair: stacked tensors, string metadata only
      shard_00001.safetensors
      ...

Shard tensors, for the n rows of a shard (all float; shapes are fixed per dataset by its first pair
and recorded in the manifest's ``columns``):

- ``target`` (n, C, H, W), ``reference`` (n, C, H, W): clean latents in the model's inner latent
  space (what the denoiser predicts as x0; ComfyUI's ``process_in`` already applied).
- optional ``reference_traj.<field>`` / ``target_traj.<field>``: a
  :meth:`pso.samplers.Trajectory.state_dict` stacked per pair: ``sigmas`` (n, N+1),
  ``latents`` (n, N+1, C, H, W), ``x0`` / ``noise`` / ``mean`` (n, N, C, H, W), ``std`` (n, N); the
  policy name is in the manifest and the shard metadata. Full and online PSO need them.
- optional ``score_target`` (n,), ``score_reference`` (n,): reward scores (float32).

The manifest (JSON): ``format`` ``"comfyui-pso.pairs"``, ``version`` 1, ``created_by`` (package and
version), ``created`` / ``updated`` (ISO 8601, UTC); ``fingerprint`` (:class:`DatasetFingerprint`:
model family, latent format, channels, latent height / width, the SIGMAS and sampler the references
were sampled with, optional model hash); ``columns`` (per-row dtype and shape of every shard
tensor); ``trajectories`` (policy per stored side); ``shards`` (file, rows, bytes, sha256) and
``items``, one per pair in dataset order (:class:`PairRecord`: prompt, shard, row, optional
target / reference source names and label). Names in the manifest must be plain ``*.safetensors``
file names in the folder; a higher ``version`` is refused.

Prompts are text in the manifest, never embeddings: text encoders differ between hosts, so the
consumer encodes them itself. Only safetensors is read (never pickle). Every shard and every
manifest update is written atomically (:mod:`pso.io`), shards first: the manifest lists only complete
shards, and a listed shard is never rewritten, so a crash at any point leaves a dataset that opens,
and a reader opened before an append keeps a consistent snapshot. One writer at a time per folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors
import torch

from . import __version__
from .io import atomic_save_safetensors, atomic_write_json, sweep_stale_temps
from .limits import LimitError, check_prompt, loads_json
from .methods import PairBatch, required_fields
from .samplers import Trajectory
from .schedules import check_sigmas

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "MANIFEST_FILE",
    "VERSION",
    "DatasetFingerprint",
    "IncompatibleDatasetError",
    "LatentColumn",
    "PairDataset",
    "PairDatasetError",
    "PairDatasetWriter",
    "PairRecord",
    "ShardInfo",
    "check_file_name",
    "to_pair_batch",
]

FORMAT = "comfyui-pso.pairs"
SHARD_FORMAT = "comfyui-pso.pairs.shard"
VERSION = 1
MANIFEST_FILE = "manifest.json"
PACKAGE = "comfyui-pso"
_SHARD_NAME = re.compile(r"^shard_(\d{5,})\.safetensors$")

LATENT_COLUMNS = ("target", "reference")
SCORE_COLUMNS = ("score_target", "score_reference")
TRAJECTORY_SIDES = ("target_traj", "reference_traj")
#: The tensor fields of a Trajectory (its ``state_dict`` minus the strings).
_TRAJ_TENSORS = tuple(f.name for f in fields(Trajectory) if f.name != "policy")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64}
_MODEL_HASH = re.compile(r"^[0-9A-Za-z:_.+-]{1,256}$")


class PairDatasetError(ValueError):
    """A pair dataset folder, manifest, shard or argument is wrong; the message says which and what to do."""


class IncompatibleDatasetError(PairDatasetError):
    """A dataset was built for a different model (family, latent format, channels or resolution)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise PairDatasetError(f"pair dataset tensors must be floating point {sorted(_DTYPES)}, got {dtype}.")


def check_file_name(name: Any, what: str = "shard file") -> str:
    """``name`` if it is a plain ``*.safetensors`` file name inside the dataset folder; raises otherwise.

    Refuses separators, ``..``, drive letters, hidden names and anything else that could point
    outside the folder (a manifest is data from elsewhere, not a path to follow).
    """
    ok = (isinstance(name, str) and name.endswith(".safetensors") and not name.startswith(".")
          and not any(c in name for c in "/\\:\0") and os.path.basename(name) == name
          and name not in (".", ".."))
    if not ok:
        raise PairDatasetError(
            f"{what} {name!r} is not a plain file name inside the dataset folder (no folders, '..' or "
            "drive letters; it must end in .safetensors); the manifest is damaged or was edited by hand: "
            "fix the name or rebuild the dataset."
        )
    return name


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PairDatasetError(f"{name} must be a positive int, got {value!r}.")
    return value


def _non_empty_str(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PairDatasetError(f"{name} must be a non-empty string, got {value!r}.")
    return value


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise PairDatasetError(f"{name} must be a string or None, got {type(value).__name__} {value!r}.")
    return value


# --------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetFingerprint:
    """What the pairs were made with; decides whether a model can train on them.

    Attributes:
        model_family: the model family string (e.g. ComfyUI's model class ``"SDXL"``, ``"sd15"``).
        latent_channels, latent_height, latent_width: C, H, W of every latent.
        latent_format: the latent space's name (e.g. ComfyUI's ``latent_format`` class ``"SDXL"``).
        sigmas: the SIGMAS the references were sampled with, (N+1) floats, strictly decreasing,
            >= 0 (a tensor or list is converted to a tuple of floats).
        sampler: the sampler / policy name the references were sampled with (a
            :data:`pso.samplers.POLICIES` key, or the ComfyUI sampler name when no trajectory is kept).
        model_hash: optional hash of the model weights (any short ``[0-9A-Za-z:_.+-]`` string).
        vae_scale_factor: pixels per latent cell (8 for SD1.x / SDXL / SD3 / FLUX); for messages.

    A different family, latent format, channel count or latent size is an error
    (:meth:`check_compatible` raises); different sigmas, sampler or model hash are warnings.
    """

    model_family: str
    latent_channels: int
    latent_height: int
    latent_width: int
    latent_format: str
    sigmas: tuple[float, ...]
    sampler: str
    model_hash: str | None = None
    vae_scale_factor: int = 8

    def __post_init__(self) -> None:
        _non_empty_str(self.model_family, "model_family")
        _non_empty_str(self.latent_format, "latent_format")
        _non_empty_str(self.sampler, "sampler")
        for name in ("latent_channels", "latent_height", "latent_width", "vae_scale_factor"):
            _positive_int(getattr(self, name), name)
        if self.model_hash is not None and not (isinstance(self.model_hash, str)
                                                and _MODEL_HASH.match(self.model_hash)):
            raise PairDatasetError(f"model_hash must be None or a short hash string [0-9A-Za-z:_.+-], "
                                   f"got {self.model_hash!r}.")
        raw = self.sigmas
        if isinstance(raw, torch.Tensor):
            raw = raw.detach().double().cpu().flatten().tolist()
        try:
            sigmas = tuple(float(s) for s in raw)
        except (TypeError, ValueError) as exc:
            raise PairDatasetError(f"sigmas must be a sequence of numbers, got {self.sigmas!r}.") from exc
        try:
            check_sigmas(torch.tensor(sigmas, dtype=torch.float64),
                         what="sigmas (the SIGMAS the references were sampled with)")
        except ValueError as exc:
            raise PairDatasetError(str(exc)) from None
        object.__setattr__(self, "sigmas", sigmas)

    def describe(self) -> str:
        """``"SDXL at 128x128 latents (1024x1024 px, 4 channels, latent format SDXL)"``."""
        f = self.vae_scale_factor
        return (f"{self.model_family} at {self.latent_height}x{self.latent_width} latents "
                f"({self.latent_height * f}x{self.latent_width * f} px, {self.latent_channels} channels, "
                f"latent format {self.latent_format})")

    def differences(self, other: DatasetFingerprint) -> tuple[list[str], list[str]]:
        """``(errors, warnings)``: human-readable differences that rule training out / that may not."""
        errors, warnings = [], []
        if self.model_family != other.model_family:
            errors.append(f"model family {self.model_family} != {other.model_family}")
        if self.latent_format != other.latent_format:
            errors.append(f"latent format {self.latent_format} != {other.latent_format}")
        if self.latent_channels != other.latent_channels:
            errors.append(f"latent channels {self.latent_channels} != {other.latent_channels}")
        if (self.latent_height, self.latent_width) != (other.latent_height, other.latent_width):
            errors.append(f"latent size {self.latent_height}x{self.latent_width} != "
                          f"{other.latent_height}x{other.latent_width}")
        if not _same_sigmas(self.sigmas, other.sigmas):
            warnings.append(
                f"the references were sampled with sigmas {_fmt(self.sigmas)} but the model uses "
                f"{_fmt(other.sigmas)}: fine for offline PSO on clean latents; full / online PSO score "
                "the recorded transitions, so they need the same SIGMAS"
            )
        if self.sampler != other.sampler:
            warnings.append(f"the references were sampled with {self.sampler!r} but the model samples with "
                            f"{other.sampler!r}")
        if self.model_hash and other.model_hash and self.model_hash != other.model_hash:
            warnings.append(f"the references came from model {self.model_hash} but the model is "
                            f"{other.model_hash}: PSO's references should be the trained model's own samples")
        return errors, warnings

    def check_compatible(self, other: DatasetFingerprint) -> list[str]:
        """Check that a model with fingerprint ``other`` can train on a dataset with this one.

        Raises :class:`IncompatibleDatasetError` for a different model family, latent format,
        channel count or latent size; returns the softer mismatches (sigmas, sampler, model hash) as
        warning strings for the caller to show.
        """
        errors, warnings = self.differences(other)
        if errors:
            raise IncompatibleDatasetError(
                f"this dataset was built for {self.describe()} but the model is {other.describe()} "
                f"({'; '.join(errors)}): build a new pair dataset with this model (its own samples as "
                "references, at this resolution) instead of reusing this one."
            )
        return warnings

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``fingerprint`` object."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["sigmas"] = list(self.sigmas)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> DatasetFingerprint:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise."""
        return _from_json(cls, data, "fingerprint")


def _from_json(cls, data: Any, what: str):
    """Build the dataclass ``cls`` from a manifest JSON object; unknown or missing keys raise,
    naming ``what`` (e.g. "fingerprint", "item") and the known keys."""
    if not isinstance(data, dict):
        raise PairDatasetError(f"a {what} must be a JSON object, got {type(data).__name__}.")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PairDatasetError(f"{what} has unknown keys {unknown} (known: {sorted(known)}).")
    try:
        return cls(**data)
    except TypeError as exc:
        raise PairDatasetError(f"{what} is incomplete: {exc}.") from exc


def _same_sigmas(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-7)
                                    for x, y in zip(a, b, strict=True))


def _fmt(sigmas: Sequence[float]) -> list[float]:
    return [round(float(s), 6) for s in sigmas]


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairRecord:
    """One pair's manifest entry: where its tensors are and what it is.

    Attributes:
        prompt: the prompt text (the consumer encodes it with its own text encoder).
        shard: the shard file name (a plain name in the dataset folder).
        row: its row in that shard's tensors.
        target_source, reference_source: where each side came from (e.g. an image file name).
        label: an optional free-form tag (e.g. a subject or a split name).
    """

    prompt: str
    shard: str
    row: int
    target_source: str | None = None
    reference_source: str | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        try:
            check_prompt(self.prompt, "prompt")
        except LimitError as exc:
            raise PairDatasetError(str(exc)) from None
        check_file_name(self.shard)
        if isinstance(self.row, bool) or not isinstance(self.row, int) or self.row < 0:
            raise PairDatasetError(f"row must be an int >= 0, got {self.row!r}.")
        for name in ("target_source", "reference_source", "label"):
            _optional_str(getattr(self, name), name)

    def to_dict(self) -> dict[str, Any]:
        """The manifest entry (None fields left out)."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    @classmethod
    def from_dict(cls, data: Any) -> PairRecord:
        return _from_json(cls, data, "item")


@dataclass(frozen=True)
class ShardInfo:
    """A shard's manifest entry: file name, row count, size in bytes and SHA-256 of the file."""

    file: str
    rows: int
    bytes: int
    sha256: str

    def __post_init__(self) -> None:
        check_file_name(self.file)
        _positive_int(self.rows, f"rows of {self.file}")
        _positive_int(self.bytes, f"bytes of {self.file}")
        if not (isinstance(self.sha256, str) and re.fullmatch(r"[0-9a-f]{64}", self.sha256)):
            raise PairDatasetError(f"sha256 of {self.file} must be 64 hex digits, got {self.sha256!r}.")


@dataclass(frozen=True)
class _Column:
    dtype: str
    shape: tuple[int, ...]  # per row

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------
@dataclass
class _Manifest:
    fingerprint: DatasetFingerprint
    columns: dict[str, _Column]
    trajectories: dict[str, dict[str, str]]  # side -> {"policy", "format"}
    shards: list[ShardInfo]
    records: list[PairRecord]
    created: str

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "created_by": {"package": PACKAGE, "version": __version__},
            "created": self.created,
            "updated": _now(),
            "fingerprint": self.fingerprint.to_dict(),
            "columns": {k: c.to_dict() for k, c in self.columns.items()},
            "trajectories": self.trajectories,
            "shards": [{"file": s.file, "rows": s.rows, "bytes": s.bytes, "sha256": s.sha256}
                       for s in self.shards],
            "items": [r.to_dict() for r in self.records],
        }


def _parse_columns(data: Any, trajectories: dict[str, dict[str, str]]) -> dict[str, _Column]:
    if not isinstance(data, dict):
        raise PairDatasetError(f"columns must be a JSON object, got {type(data).__name__}.")
    allowed = {*LATENT_COLUMNS, *SCORE_COLUMNS,
               *(f"{s}.{t}" for s in TRAJECTORY_SIDES for t in _TRAJ_TENSORS)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise PairDatasetError(f"unknown columns {unknown}; known ones are {sorted(allowed)}.")
    cols = {}
    for name, spec in data.items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not (isinstance(spec, dict) and spec.get("dtype") in _DTYPES and isinstance(shape, list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
            raise PairDatasetError(f"column {name!r} must be {{'dtype': one of {sorted(_DTYPES)}, 'shape': "
                                   f"[positive ints]}}, got {spec!r}.")
        cols[name] = _Column(spec["dtype"], tuple(spec["shape"]))
    if cols:
        missing = [c for c in LATENT_COLUMNS if c not in cols]
        for side in trajectories:
            missing += [f"{side}.{t}" for t in _TRAJ_TENSORS if f"{side}.{t}" not in cols]
        stray = sorted({c.split(".")[0] for c in cols if "." in c} - set(trajectories))
        if missing or stray:
            raise PairDatasetError(f"columns are inconsistent: missing {missing}, trajectory columns "
                                   f"without a 'trajectories' entry {stray}.")
    return cols


def _read_manifest(folder: Path) -> _Manifest:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise PairDatasetError(
            f"{path} does not exist: {folder} is not a pair dataset (a folder with {MANIFEST_FILE} and "
            "shard_*.safetensors files). Check the folder, or build a dataset there first."
        )
    try:
        data = loads_json(path.read_text(encoding="utf-8"), str(path))
    except (UnicodeDecodeError, json.JSONDecodeError, LimitError) as exc:
        raise PairDatasetError(f"{path} is not valid JSON ({exc}): the manifest is corrupt; restore it from "
                               "a backup or rebuild the dataset.") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise PairDatasetError(f"{path} is not a comfyui-pso pair dataset manifest (format {got!r}, "
                               f"expected {FORMAT!r}).")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PairDatasetError(f"{path} has an invalid version {version!r} (expected an int >= 1).")
    if version > VERSION:
        raise PairDatasetError(
            f"{path} is pair dataset format version {version}, written by "
            f"{data.get('created_by', 'a newer comfyui-pso')}; this comfyui-pso {__version__} reads version "
            f"{VERSION} only: update comfyui-pso to read it."
        )
    try:
        return _parse_manifest(data)
    except PairDatasetError as exc:
        raise PairDatasetError(f"{path}: {exc}") from exc


def _parse_manifest(data: dict[str, Any]) -> _Manifest:
    fingerprint = DatasetFingerprint.from_dict(data.get("fingerprint"))
    trajectories = data.get("trajectories", {})
    if not (isinstance(trajectories, dict) and set(trajectories) <= set(TRAJECTORY_SIDES)
            and all(isinstance(v, dict) and isinstance(v.get("policy"), str) for v in trajectories.values())):
        raise PairDatasetError(f"trajectories must map {list(TRAJECTORY_SIDES)} to {{'policy': name, ...}}, "
                               f"got {trajectories!r}.")
    columns = _parse_columns(data.get("columns", {}), trajectories)
    shards_raw, items_raw = data.get("shards"), data.get("items")
    if not isinstance(shards_raw, list) or not isinstance(items_raw, list):
        raise PairDatasetError("'shards' and 'items' must be JSON lists.")
    shards = []
    for i, s in enumerate(shards_raw):
        if not isinstance(s, dict) or set(s) != {"file", "rows", "bytes", "sha256"}:
            raise PairDatasetError(f"shards[{i}] must be {{file, rows, bytes, sha256}}, got {s!r}.")
        shards.append(ShardInfo(**s))
    rows = {s.file: s.rows for s in shards}
    if len(rows) != len(shards):
        raise PairDatasetError("a shard file is listed twice in 'shards'.")
    if shards and not columns:
        raise PairDatasetError("the manifest lists shards but no columns.")
    records = []
    for i, item in enumerate(items_raw):
        try:
            rec = PairRecord.from_dict(item)
        except PairDatasetError as exc:
            raise PairDatasetError(f"items[{i}]: {exc}") from exc
        if rec.shard not in rows:
            raise PairDatasetError(f"items[{i}] refers to shard {rec.shard!r}, which 'shards' does not list.")
        if rec.row >= rows[rec.shard]:
            raise PairDatasetError(f"items[{i}] refers to row {rec.row} of {rec.shard}, which has "
                                   f"{rows[rec.shard]} rows.")
        records.append(rec)
    created = data.get("created")
    return _Manifest(fingerprint, columns, dict(trajectories), shards, records,
                     created if isinstance(created, str) else _now())


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------
def _as_latent(x: torch.Tensor, name: str, fp: DatasetFingerprint) -> torch.Tensor:
    expected = (fp.latent_channels, fp.latent_height, fp.latent_width)
    if not isinstance(x, torch.Tensor):
        raise PairDatasetError(f"{name} must be a tensor of shape {expected}, got {type(x).__name__}.")
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if tuple(x.shape) != expected:
        raise PairDatasetError(
            f"{name} has shape {tuple(x.shape)}, but the dataset holds {fp.describe()}, i.e. latents of "
            f"shape {expected} (or (1, {expected[0]}, {expected[1]}, {expected[2]})): encode / sample at "
            "the dataset's resolution, or write a new dataset."
        )
    if not x.is_floating_point():
        raise PairDatasetError(f"{name} must be a floating point latent, got {x.dtype}.")
    return x.detach().to("cpu").clone(memory_format=torch.contiguous_format)  # not a view of a batch


def _traj_row(traj: Trajectory, side: str,
              fp: DatasetFingerprint) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One pair's trajectory columns (``side.field`` -> tensor without the batch dimension) and its
    ``{"policy", "format"}`` strings."""
    if not isinstance(traj, Trajectory):
        raise PairDatasetError(f"{side} must be a pso.samplers.Trajectory, got {type(traj).__name__}.")
    if traj.batch_size != 1:
        raise PairDatasetError(f"{side} holds {traj.batch_size} trajectories; add() takes one pair, so pass "
                               "traj.select(i), or use add_batch().")
    latent = (fp.latent_channels, fp.latent_height, fp.latent_width)
    if tuple(traj.latents.shape[2:]) != latent:
        raise PairDatasetError(f"{side} latents are {tuple(traj.latents.shape[2:])}, but the dataset holds "
                               f"{fp.describe()}.")
    if not _same_sigmas(traj.sigmas.detach().double().cpu().tolist(), fp.sigmas):
        raise PairDatasetError(
            f"{side} was sampled with sigmas {_fmt(traj.sigmas.tolist())} but the dataset's fingerprint says "
            f"{_fmt(fp.sigmas)}: every pair must be sampled with the fingerprint's SIGMAS; write pairs from "
            "another schedule to a new dataset."
        )
    sd = traj.state_dict()
    out = {}
    for t in _TRAJ_TENSORS:
        v = sd[t].to("cpu")
        v = v if t in ("sigmas", "std") else v[0]  # per-pair row; a copy, not a view of the batch
        out[f"{side}.{t}"] = v.clone(memory_format=torch.contiguous_format)
    return out, {k: v for k, v in sd.items() if isinstance(v, str)}


def _score(value: Any, name: str) -> torch.Tensor:
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise PairDatasetError(f"{name} must be a number, got {value!r}.") from exc
    if not math.isfinite(v):
        raise PairDatasetError(f"{name} must be finite, got {v}.")
    return torch.tensor(v, dtype=torch.float32)


def _holds_an_empty_dataset(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but the manifest of a dataset without pairs (what a save that
    failed before its first shard leaves, e.g. on a full disk): a new dataset may be written there."""
    if [p.name for p in folder.iterdir()] != [MANIFEST_FILE]:
        return False
    try:
        return not _read_manifest(folder).records
    except PairDatasetError:
        return False


class PairDatasetWriter:
    """Write (or extend) a pair dataset folder.

    ``PairDatasetWriter(folder, fingerprint)`` creates a new dataset and writes its (empty) manifest at
    once; it refuses a folder that exists and is not empty. With ``append=True`` it adds to the
    dataset already in ``folder`` (whose fingerprint must equal ``fingerprint``: same model, latent
    size, sigmas, sampler), or creates one if the folder is empty or missing.

    Pairs are buffered and written ``shard_size`` at a time as a new ``shard_NNNNN.safetensors``;
    the manifest is rewritten after every ``manifest_every`` shards and on :meth:`close` (raise it for
    very large datasets: the manifest holds every prompt, so each rewrite costs O(pairs)). Shards a
    crash leaves unlisted are ignored by readers and replaced by the next append.

    The first pair fixes the dataset's layout (which optional fields every pair has, shapes, dtypes);
    later pairs must match it. Use as a context manager: on leaving, buffered pairs are written.
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: DatasetFingerprint, shard_size: int = 256,
                 *, append: bool = False, latent_dtype: torch.dtype = torch.float32,
                 manifest_every: int = 1) -> None:
        if not isinstance(fingerprint, DatasetFingerprint):
            raise PairDatasetError(f"fingerprint must be a DatasetFingerprint, got "
                                   f"{type(fingerprint).__name__}.")
        self.folder = Path(folder)
        self.shard_size = _positive_int(shard_size, "shard_size")
        self.manifest_every = _positive_int(manifest_every, "manifest_every")
        self.latent_dtype = latent_dtype
        _dtype_name(latent_dtype)
        self._buffer: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] = []
        self._closed = False
        self._unlisted_shards = 0
        if self.folder.exists() and not self.folder.is_dir():
            raise PairDatasetError(f"{self.folder} is a file, not a folder: choose a folder for the dataset.")
        if self.folder.is_dir():
            sweep_stale_temps(self.folder)
        existing = self.folder.is_dir() and any(self.folder.iterdir())
        if existing and not append and _holds_an_empty_dataset(self.folder):
            logger.info("%s holds an empty pair dataset (a save that failed before its first pair); "
                        "writing the new dataset into it", self.folder)
            existing = False
        if existing and not append:
            raise PairDatasetError(
                f"{self.folder} already exists and is not empty: choose a new folder, or pass append=True "
                "to add pairs to the dataset in it."
            )
        if existing:
            self._manifest = _read_manifest(self.folder)
            old = self._manifest.fingerprint
            errors, warnings = old.differences(fingerprint)
            if errors or warnings:
                raise IncompatibleDatasetError(
                    f"cannot append to {self.folder}: it was built for {old.describe()} "
                    f"with sigmas {_fmt(old.sigmas)} and sampler {old.sampler!r}, but the new pairs are "
                    f"{fingerprint.describe()} with sigmas {_fmt(fingerprint.sigmas)} and sampler "
                    f"{fingerprint.sampler!r} ({'; '.join(errors + warnings)}). A dataset's fingerprint "
                    "describes every pair in it: write these pairs to a new folder."
                )
            listed = {s.file for s in self._manifest.shards}
            orphans = sorted(p.name for p in self.folder.iterdir()
                             if _SHARD_NAME.match(p.name) and p.name not in listed)
            if orphans:
                logger.warning("%s holds shard files the manifest does not list (left by an interrupted "
                               "write; readers ignore them, appends replace them): %s", self.folder, orphans)
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._manifest = _Manifest(fingerprint, {}, {}, [], [], _now())
            self._write_manifest()
        self.fingerprint = self._manifest.fingerprint
        indices = [int(m.group(1)) for s in self._manifest.shards if (m := _SHARD_NAME.match(s.file))]
        self._next_shard = max(indices, default=-1) + 1

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self) -> PairDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
            return False
        try:  # keep the complete pairs sampled before the error; let the original error propagate
            self.close()
        except Exception:
            logger.exception("could not write the last pairs to %s while handling another error", self.folder)
        return False

    def __len__(self) -> int:
        """Pairs added so far (written or buffered)."""
        return len(self._manifest.records) + len(self._buffer)

    # -- adding ------------------------------------------------------------------------------
    def add(self, target: torch.Tensor | None, reference: torch.Tensor | None, prompt: str, *,
            reference_traj: Trajectory | None = None, target_traj: Trajectory | None = None,
            score_target: float | None = None, score_reference: float | None = None,
            target_source: str | None = None, reference_source: str | None = None,
            label: str | None = None) -> int:
        """Add one pair; returns its index in the dataset.

        Args:
            target, reference: (C, H, W) or (1, C, H, W) clean latents (inner latent space), cast to
                ``latent_dtype``; None takes the final sample of the matching trajectory.
            prompt: the prompt text.
            reference_traj, target_traj: one recorded trajectory each (batch size 1), sampled with the
                fingerprint's sigmas; kept as they are (float32 / float64: bit-exact transitions).
            score_target, score_reference: reward scores.
            target_source, reference_source, label: free-form strings for people and tools.
        """
        if self._closed:
            raise PairDatasetError(f"the writer for {self.folder} is closed; open a new one with "
                                   "append=True.")
        fp = self.fingerprint
        row: dict[str, torch.Tensor] = {}
        trajectories: dict[str, dict[str, str]] = {}
        for side, traj in (("target_traj", target_traj), ("reference_traj", reference_traj)):
            if traj is not None:
                tensors, trajectories[side] = _traj_row(traj, side, fp)
                row.update(tensors)
        for name, x, traj in (("target", target, target_traj), ("reference", reference, reference_traj)):
            if x is None and traj is None:
                raise PairDatasetError(f"pass {name}, or {name}_traj to take its final sample.")
            row[name] = _as_latent(traj.final if x is None else x, name, fp).to(self.latent_dtype)
        for name, value in (("score_target", score_target), ("score_reference", score_reference)):
            if value is not None:
                row[name] = _score(value, name)
        # validates the strings now; shard and row are filled in when the shard is written
        meta = PairRecord(prompt, "pending.safetensors", 0, target_source, reference_source, label).to_dict()
        self._check_layout(row, trajectories)
        self._buffer.append((row, meta))
        if len(self._buffer) >= self.shard_size:
            self.flush()
        return len(self) - 1

    def add_batch(self, targets: torch.Tensor | None, references: torch.Tensor | None, prompts: Sequence[str],
                  *, reference_traj: Trajectory | None = None, target_traj: Trajectory | None = None,
                  scores_target: Sequence[float] | torch.Tensor | None = None,
                  scores_reference: Sequence[float] | torch.Tensor | None = None,
                  target_sources: Sequence[str | None] | None = None,
                  reference_sources: Sequence[str | None] | None = None,
                  labels: Sequence[str | None] | None = None) -> list[int]:
        """Add B pairs: targets / references (B, C, H, W), B prompts, trajectories of batch size B,
        per-pair sequences for the rest. Returns their indices."""
        if isinstance(prompts, str):
            raise PairDatasetError("prompts must be a list of B strings, got one string; use add() for "
                                   "one pair.")
        b = len(prompts)
        per_pair = {"targets": targets, "references": references, "scores_target": scores_target,
                    "scores_reference": scores_reference, "target_sources": target_sources,
                    "reference_sources": reference_sources, "labels": labels}
        sizes = {k: len(v) for k, v in per_pair.items() if v is not None}
        sizes.update({k: t.batch_size for k, t in (("target_traj", target_traj),
                                                   ("reference_traj", reference_traj)) if t is not None})
        wrong = {k: n for k, n in sizes.items() if n != b}
        if wrong:
            raise PairDatasetError(f"add_batch got {b} prompts but these batch sizes differ: {wrong}.")

        def pick(v, i):
            return None if v is None else v[i]

        return [self.add(pick(targets, i), pick(references, i), prompts[i],
                         reference_traj=None if reference_traj is None else reference_traj.select(i),
                         target_traj=None if target_traj is None else target_traj.select(i),
                         score_target=pick(scores_target, i), score_reference=pick(scores_reference, i),
                         target_source=pick(target_sources, i), reference_source=pick(reference_sources, i),
                         label=pick(labels, i)) for i in range(b)]

    def _check_layout(self, row: dict[str, torch.Tensor], trajectories: dict[str, dict[str, str]]) -> None:
        m = self._manifest
        layout = {k: _Column(_dtype_name(v.dtype), tuple(v.shape)) for k, v in row.items()}
        if not m.columns:  # the first pair fixes the layout
            m.columns, m.trajectories = layout, trajectories
            return
        problems = []
        for k in sorted(set(m.columns) | set(layout)):
            have, want = layout.get(k), m.columns.get(k)
            if want is None:
                problems.append(f"this pair has {k} but the dataset's pairs have none")
            elif have is None:
                problems.append(f"the dataset stores {k} for every pair but this pair has none")
            elif have != want:
                problems.append(f"{k} is {have.dtype} {have.shape} but the dataset stores {want.dtype} "
                                f"{want.shape}")
        for side, info in trajectories.items():
            want = m.trajectories.get(side)
            if want is not None and want != info:
                problems.append(f"{side} is {info} but the dataset's are {want}")
        if problems:
            raise PairDatasetError(
                f"pair {len(self)} does not match the layout of {self.folder} (fixed by its first pair): "
                f"{'; '.join(sorted(set(problems)))}. Give every pair the same fields, or write a new "
                "dataset."
            )

    # -- writing -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Write the buffered pairs as one new shard (then the manifest, when due)."""
        if self._buffer:
            self._write_shard()
        if self._unlisted_shards >= self.manifest_every:
            self._write_manifest()

    def close(self) -> None:
        """Write the buffered pairs and the final manifest. Idempotent."""
        if self._closed:
            return
        try:
            if self._buffer:
                self._write_shard()
        finally:  # list the shards already complete on disk even if the last one failed
            if self._unlisted_shards:
                self._write_manifest()
        self._closed = True
        logger.info("pair dataset %s: %d pairs in %d shards", self.folder, len(self._manifest.records),
                    len(self._manifest.shards))

    def _write_shard(self) -> None:
        m = self._manifest
        name = f"shard_{self._next_shard:05d}.safetensors"
        tensors = {k: torch.stack([row[k] for row, _ in self._buffer]) for k in m.columns}
        metadata = {"format": SHARD_FORMAT, "version": str(VERSION), "rows": str(len(self._buffer))}
        for side, info in m.trajectories.items():
            metadata.update({f"{side}.{k}": v for k, v in info.items()})
        path = self.folder / name
        atomic_save_safetensors(tensors, path, metadata)
        info = ShardInfo(name, len(self._buffer), path.stat().st_size, _sha256(path))
        # the shard is complete on disk: only now does it enter the writer's state
        m.shards.append(info)
        m.records.extend(PairRecord(**{**meta, "shard": name, "row": r})
                         for r, (_, meta) in enumerate(self._buffer))
        self._buffer.clear()
        self._next_shard += 1
        self._unlisted_shards += 1

    def _write_manifest(self) -> None:
        atomic_write_json(self.folder / MANIFEST_FILE, self._manifest.to_json())
        self._unlisted_shards = 0


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------
class PairDataset:
    """A pair dataset opened for reading (:meth:`open`).

    ``len(ds)``, ``ds.prompts``, ``ds.records``, ``ds.fingerprint``; :meth:`get` returns stacked
    tensors for any indices, loading only the shards it needs and keeping at most
    ``max_cached_shards`` of them in memory (least recently used first out), so memory stays flat in
    the dataset's size; :meth:`iter_shards` streams one shard's pairs at a time.
    ``shard_loads`` counts the shard files read so far.
    """

    def __init__(self, folder: str | os.PathLike, *, max_cached_shards: int = 2, verify: bool = True) -> None:
        self.folder = Path(folder)
        self.max_cached_shards = _positive_int(max_cached_shards, "max_cached_shards")
        self.verify_hashes = bool(verify)
        self._verified: set[str] = set()  # shards whose SHA-256 matched the manifest (hashed once)
        m = _read_manifest(self.folder)
        self._m = m
        self._shards = {s.file: s for s in m.shards}
        for s in m.shards:
            path = self.folder / s.file
            if not path.is_file():
                raise PairDatasetError(f"shard {path} listed in {self.folder / MANIFEST_FILE} is missing: "
                                       "copy the whole dataset folder, or rebuild the dataset.")
            size = path.stat().st_size
            if size != s.bytes:
                raise PairDatasetError(f"shard {path} is {size} bytes but the manifest recorded {s.bytes}: "
                                       "it was truncated or replaced; restore it or rebuild the dataset.")
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.shard_loads = 0
        self._records = tuple(m.records)
        self.prompts: tuple[str, ...] = tuple(r.prompt for r in m.records)

    @classmethod
    def open(cls, folder: str | os.PathLike, *, max_cached_shards: int = 2,
             verify: bool = True) -> PairDataset:
        """Open the dataset in ``folder``: reads and checks the manifest, checks every shard exists
        with its recorded size; tensors are loaded lazily by :meth:`get`. With ``verify`` (the
        default) each shard's SHA-256 is compared with the manifest the first time it is loaded, so a
        shard whose bytes changed (same size: disk or copy corruption, an edit) is refused instead of
        trained on; the hash costs one extra read of the shard, once per opened dataset."""
        return cls(folder, max_cached_shards=max_cached_shards, verify=verify)

    def __len__(self) -> int:
        return len(self._m.records)

    def __repr__(self) -> str:
        return f"PairDataset({str(self.folder)!r}, {len(self)} pairs, {self.fingerprint.describe()})"

    @property
    def fingerprint(self) -> DatasetFingerprint:
        return self._m.fingerprint

    @property
    def records(self) -> tuple[PairRecord, ...]:
        return self._records

    @property
    def shards(self) -> tuple[ShardInfo, ...]:
        return tuple(self._m.shards)

    @property
    def trajectory_policies(self) -> dict[str, str]:
        """``{"reference_traj": policy, ...}`` for the trajectories the pairs carry."""
        return {side: info["policy"] for side, info in self._m.trajectories.items()}

    @property
    def pair_fields(self) -> tuple[str, ...]:
        """The :class:`pso.methods.PairBatch` fields this dataset can fill."""
        if not len(self):
            return ()
        return (*LATENT_COLUMNS, *(s for s in TRAJECTORY_SIDES if s in self._m.trajectories))

    @property
    def cached_shards(self) -> tuple[str, ...]:
        """Shard files held in memory now, least recently used first."""
        return tuple(self._cache)

    def check_loss(self, loss: str) -> None:
        """Raise a clear error if the :mod:`pso.losses` loss ``loss`` needs fields this dataset lacks."""
        missing = [f for f in required_fields(loss) if f not in self.pair_fields]
        if missing:
            raise PairDatasetError(
                f"loss {loss!r} needs {missing} but the dataset {self.folder} has only "
                f"{list(self.pair_fields)}: full / online PSO need recorded trajectories; rebuild the "
                "dataset with a stochastic sampler (trajectories kept), or train with 'pso_offline', which "
                "needs clean latents only."
            )

    # -- loading -----------------------------------------------------------------------------
    def _load_shard(self, name: str) -> dict[str, torch.Tensor]:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        info, path = self._shards[name], self.folder / name
        while len(self._cache) >= self.max_cached_shards:  # make room first: never one shard over
            self._cache.popitem(last=False)
        if self.verify_hashes and name not in self._verified:
            try:
                digest = _sha256(path)
            except OSError as exc:
                raise PairDatasetError(f"shard {path} cannot be read ({exc}); restore it or rebuild the "
                                       "dataset.") from exc
            if digest != info.sha256:
                raise PairDatasetError(
                    f"shard {path} does not match the SHA-256 recorded in {self.folder / MANIFEST_FILE} "
                    f"(file {digest[:16]}..., manifest {info.sha256[:16]}...): its bytes changed since "
                    "it was written (disk or copy corruption, or an edit), so its pairs cannot be trusted. "
                    "Restore the shard from a backup or rebuild the dataset.")
            self._verified.add(name)
        try:
            with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except (safetensors.SafetensorError, OSError) as exc:
            raise PairDatasetError(f"shard {path} cannot be read ({exc}): it is corrupt; restore it or "
                                   "rebuild the dataset.") from exc
        self.shard_loads += 1
        problems = []
        if meta.get("format") != SHARD_FORMAT or meta.get("rows") != str(info.rows):
            problems.append(f"metadata {meta!r} is not that of a {SHARD_FORMAT} shard of {info.rows} rows")
        if set(tensors) != set(self._m.columns):
            problems.append(f"tensors {sorted(tensors)} are not the dataset's columns "
                            f"{sorted(self._m.columns)}")
        for k, col in self._m.columns.items():
            t = tensors.get(k)
            want = (info.rows, *col.shape)
            if t is not None and (tuple(t.shape) != want or t.dtype != _DTYPES[col.dtype]):
                problems.append(f"{k} is {t.dtype} {tuple(t.shape)}, expected {col.dtype} {want}")
        if problems:
            raise PairDatasetError(f"shard {path} does not match the manifest: {'; '.join(problems)}. "
                                   "Restore it or rebuild the dataset.")
        self._cache[name] = tensors
        return tensors

    def _normalize(self, indices: int | slice | Sequence[int] | torch.Tensor) -> list[int]:
        n = len(self)
        if isinstance(indices, slice):
            return list(range(n)[indices])
        if isinstance(indices, torch.Tensor):
            indices = indices.flatten().tolist()
        elif isinstance(indices, int) and not isinstance(indices, bool):
            indices = [indices]
        out = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
                raise IndexError(f"pair index {i!r} is out of range for a dataset of {n} pairs.")
            out.append(i % n)
        return out

    def get(self, indices: int | slice | Sequence[int] | torch.Tensor) -> dict[str, Any]:
        """The pairs at ``indices`` (an int gives a batch of one), in the order asked.

        Returns a dict: ``indices`` (list[int]), ``prompts`` (list[str]), ``target`` and
        ``reference`` (k, C, H, W), and, when stored, ``score_target`` / ``score_reference`` (k,)
        and ``reference_traj`` / ``target_traj`` (:class:`~pso.samplers.Trajectory` of k samples).
        Tensors are fresh CPU copies (changing them does not change the cache).
        """
        idx = self._normalize(indices)
        if not idx:
            if not len(self):
                raise PairDatasetError(f"the pair dataset {self.folder} is empty (its manifest lists no "
                                       "pairs; an interrupted first save leaves it so): add pairs to it "
                                       "(PSO Save Pairs with append) or delete the folder.")
            raise PairDatasetError(f"get() needs at least one pair index, got {indices!r}.")
        recs = [self._records[i] for i in idx]
        cols = self._m.columns
        out_t = {k: torch.empty((len(idx), *c.shape), dtype=_DTYPES[c.dtype]) for k, c in cols.items()}
        by_shard: dict[str, tuple[list[int], list[int]]] = {}
        for pos, r in enumerate(recs):
            positions, rows = by_shard.setdefault(r.shard, ([], []))
            positions.append(pos)
            rows.append(r.row)
        for name, (positions, rows) in by_shard.items():
            tensors = self._load_shard(name)
            p, rws = torch.tensor(positions), torch.tensor(rows)
            for k in cols:
                out_t[k][p] = tensors[k][rws]
        out: dict[str, Any] = {"indices": idx, "prompts": [r.prompt for r in recs]}
        out.update({k: v for k, v in out_t.items() if "." not in k})
        for side, info in self._m.trajectories.items():
            out[side] = self._trajectory(side, info, {t: out_t[f"{side}.{t}"] for t in _TRAJ_TENSORS}, idx)
        return out

    def _trajectory(self, side: str, info: dict[str, str], t: dict[str, torch.Tensor],
                    idx: list[int]) -> Trajectory:
        for shared in ("sigmas", "std"):
            v = t[shared]
            if not bool((v == v[:1]).all()):
                rows = [idx[i] for i in range(v.shape[0]) if not torch.equal(v[i], v[0])]
                raise PairDatasetError(
                    f"{side} of pairs {idx[:1]} and {rows[:5]} have different {shared}; a Trajectory batch "
                    "needs one schedule: get() those pairs in separate batches."
                )
        return Trajectory.from_state_dict({**t, "sigmas": t["sigmas"][0], "std": t["std"][0], **info})

    def iter_shards(self, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, Any]]:
        """Yield :meth:`get` of the pairs of one shard at a time, shards in manifest order.

        With ``world_size`` > 1, rank ``r`` gets shards ``r, r + world_size, ...`` (for data-parallel
        trainers: each rank reads only its own shards).
        """
        _positive_int(world_size, "world_size")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise PairDatasetError(f"rank must be in [0, {world_size}), got {rank!r}.")
        by_shard: dict[str, list[int]] = {s.file: [] for s in self._m.shards}
        for i, r in enumerate(self._m.records):
            by_shard[r.shard].append(i)
        for j, items in enumerate(by_shard.values()):
            if j % world_size == rank and items:
                yield self.get(items)

    def pair_batch(self, indices: int | slice | Sequence[int] | torch.Tensor,
                   cond: torch.Tensor | None = None, device: torch.device | str | None = None) -> PairBatch:
        """:func:`to_pair_batch` of :meth:`get` ``(indices)``."""
        return to_pair_batch(self.get(indices), cond, device)

    def verify(self) -> None:
        """Re-hash every shard and compare with the manifest's SHA-256 (reads the whole dataset, one
        chunk at a time: memory stays flat). Verified shards are not hashed again on load."""
        bad = [s.file for s in self._m.shards if _sha256(self.folder / s.file) != s.sha256]
        if bad:
            raise PairDatasetError(f"shards {bad} in {self.folder} do not match their recorded SHA-256: "
                                   "they are corrupt; restore them or rebuild the dataset.")
        self._verified.update(s.file for s in self._m.shards)

    def digest(self) -> str:
        """SHA-256 of what the dataset holds (its shards' recorded hashes and every item's prompt, shard
        and row): equal for the same pairs in the same order, without reading a shard."""
        h = hashlib.sha256()
        h.update(json.dumps([[s.file, s.sha256] for s in self._m.shards]).encode("utf-8"))
        h.update(json.dumps([[r.prompt, r.shard, r.row] for r in self._records]).encode("utf-8"))
        return h.hexdigest()


class LatentColumn:
    """The (P, C, H, W) ``target`` or ``reference`` latents of an opened :class:`PairDataset`, read on
    demand: indexing it with pair indices reads only the shards those pairs are in (the dataset keeps
    at most ``max_cached_shards`` in memory), so a trainer that draws batches from it holds a few
    shards, not the dataset. Read-only: ``clone()`` / ``detach()`` / ``cpu()`` / ``float()`` return it.

    ``column[i]`` gives (C, H, W); ``column[indices]`` (a list, 1-D tensor or slice) gives (k, C, H, W),
    in ``dtype`` (float32 by default), on the CPU.
    """

    def __init__(self, dataset: PairDataset, column: str, dtype: torch.dtype = torch.float32) -> None:
        if column not in LATENT_COLUMNS:
            raise PairDatasetError(f"column {column!r} is not one of {list(LATENT_COLUMNS)}.")
        self.dataset, self.column, self.dtype = dataset, column, dtype
        fp = dataset.fingerprint
        self.shape = torch.Size((len(dataset), fp.latent_channels, fp.latent_height, fp.latent_width))

    device = torch.device("cpu")
    ndim = 4

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LatentColumn({self.column!r}, {tuple(self.shape)}, {self.dataset.folder})"

    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(index, int) and not isinstance(index, bool):
            return self.dataset.get([index])[self.column][0].to(self.dtype)
        if isinstance(index, torch.Tensor) and index.ndim == 0:
            return self[int(index)]
        return self.dataset.get(index)[self.column].to(self.dtype)

    def clone(self) -> LatentColumn:
        return self

    detach = cpu = float = clone

    def to(self, *args: Any, **kwargs: Any) -> LatentColumn:
        device = kwargs.get("device", args[0] if args else None)
        if device is not None and torch.device(device).type != "cpu":
            raise PairDatasetError(f"a {self!r} stays on the CPU; index it and move the batch instead.")
        return self

    def materialize(self) -> torch.Tensor:
        """Every pair's latents as one tensor (memory grows with the dataset)."""
        return self[list(range(len(self)))] if len(self) else torch.empty(self.shape, dtype=self.dtype)


def to_pair_batch(items: dict[str, Any], cond: torch.Tensor | None = None,
                  device: torch.device | str | None = None) -> PairBatch:
    """A :class:`pso.methods.PairBatch` from :meth:`PairDataset.get` output.

    cond: (k, ...) batch-aligned conditioning (class labels, or indices into the host's encoded
    prompts) or None. device: where to move the tensors (default: leave them on the CPU).
    """
    k = len(items["indices"])
    if cond is not None and (not isinstance(cond, torch.Tensor) or cond.ndim == 0 or cond.shape[0] != k):
        got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
        raise PairDatasetError(f"cond must be a tensor with {k} rows (one per pair), got {got}.")

    def mv(x):
        return x if x is None or device is None else x.to(device)

    return PairBatch(target=mv(items.get("target")), reference=mv(items.get("reference")),
                     target_traj=mv(items.get("target_traj")), reference_traj=mv(items.get("reference_traj")),
                     cond=mv(cond))
