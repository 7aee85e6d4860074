"""Human preference pairs in the Pick-a-Pic layout, read row by row for offline PSO (Eq. 6).

Two sources (both read lazily, one row at a time, so a 500 MB parquet shard is never held twice):

- **parquet** in the Pick-a-Pic v1/v2 layout (Kirstain et al. 2023, ``yuvalkirstain/pickapic_v2``):
  columns ``caption`` (the prompt), ``jpg_0`` and ``jpg_1`` (encoded image bytes), ``label_0`` and
  ``label_1`` (1 / 0 for a preference, 0.5 / 0.5 for a tie), optional ``has_label``,
  ``image_0_uid`` / ``image_1_uid`` (kept as source names). pyarrow reads it.
- **a table file** ``*.jsonl`` or ``*.csv`` with the same column names, where ``image_0`` /
  ``image_1`` are image paths relative to the table's folder (``prompt`` is accepted for
  ``caption``; ``label_1`` defaults to ``1 - label_0``). Example JSONL row::

      {"caption": "a red fox in snow", "image_0": "imgs/fox_a.png", "image_1": "imgs/fox_b.png",
       "label_0": 1, "label_1": 0}

:func:`classify` decides each row: kept (with its winner), a tie, unlabelled, a bad label, or a
missing image. Nothing is dropped silently: every skipped row is counted and listed by index in the
:class:`ImportReport` (rows whose image bytes cannot be decoded are added by the caller, who decodes).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .limits import MAX_PROMPT_CHARS, LimitError, loads_json

__all__ = ["TABLE_SUFFIXES", "ImportReport", "PreferenceImportError", "PreferenceRow", "classify",
           "read_rows"]

#: Files the importer reads: parquet (image bytes inside) or a table of image paths.
TABLE_SUFFIXES = (".parquet", ".jsonl", ".csv")
_PARQUET_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
_OPTIONAL_COLUMNS = ("has_label", "image_0_uid", "image_1_uid")
_SHOWN = 20  # row indices listed per category in the report


class PreferenceImportError(ValueError):
    """A preference file a user has to fix (missing columns, bad paths); the message says how."""


@dataclass
class PreferenceRow:
    """One row of a preference file.

    image_0 / image_1: encoded bytes (parquet), a Path (table files) or None when absent.
    label_0 / label_1: the preference of image 0 / image 1 (None when absent or not a number).
    """

    index: int
    prompt: Any  # text; anything else (a JSON object caption) is classified as a bad row
    image_0: bytes | Path | None
    image_1: bytes | Path | None
    label_0: float | None
    label_1: float | None
    has_label: bool = True
    source_0: str = ""
    source_1: str = ""


@dataclass
class ImportReport:
    """What happened to every row read: kept or skipped, by category, with row indices (0-based)."""

    source: str
    rows_read: int = 0
    kept: list[int] = field(default_factory=list)
    ties: list[int] = field(default_factory=list)
    unlabelled: list[int] = field(default_factory=list)
    bad_label: list[tuple[int, str]] = field(default_factory=list)
    missing_image: list[tuple[int, str]] = field(default_factory=list)
    unreadable_image: list[tuple[int, str]] = field(default_factory=list)
    duplicate: list[tuple[int, str]] = field(default_factory=list)
    stopped_at_max: bool = False

    @property
    def skipped(self) -> int:
        return (len(self.ties) + len(self.unlabelled) + len(self.bad_label) + len(self.missing_image)
                + len(self.unreadable_image) + len(self.duplicate))

    def summary(self) -> str:
        """Counts and row indices of every category, one line each (empty categories left out)."""
        lines = [f"{self.source}: {self.rows_read} row(s) read, {len(self.kept)} pair(s) kept, "
                 f"{self.skipped} skipped"]

        def rows(items: list) -> str:
            shown = ", ".join(str(i) if isinstance(i, int) else f"{i[0]} ({i[1]})" for i in items[:_SHOWN])
            return shown + (f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")

        for label, items in (("tie(s) (equal labels) skipped", self.ties),
                             ("unlabelled row(s) (has_label false) skipped", self.unlabelled),
                             ("row(s) with an invalid label skipped", self.bad_label),
                             ("row(s) with a missing image skipped", self.missing_image),
                             ("row(s) with an unreadable image skipped", self.unreadable_image),
                             ("duplicate row(s) (same caption and images as an earlier row) skipped",
                              self.duplicate)):
            if items:
                lines.append(f"- {len(items)} {label}: row {rows(items)}")
        if self.stopped_at_max:
            lines.append("- stopped after max_pairs kept pairs; later rows were not read")
        return "\n".join(lines)


def _label(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def classify(row: PreferenceRow) -> tuple[str, int | None, str]:
    """Decide a row: ("kept", winner 0 or 1, ""), or (category, None, reason) with category one of
    "unlabelled", "bad_label", "tie", "missing_image" (checked in that order)."""
    if not row.has_label:
        return "unlabelled", None, ""
    l0, l1 = row.label_0, row.label_1
    if l0 is None or l1 is None or not (0.0 <= l0 <= 1.0 and 0.0 <= l1 <= 1.0):
        return "bad_label", None, f"label_0={l0}, label_1={l1}"
    if l0 == l1:
        return "tie", None, ""
    for name, image in (("image 0", row.image_0), ("image 1", row.image_1)):
        if image is None or (isinstance(image, bytes | bytearray) and not image):
            return "missing_image", None, f"{name} empty"
        if isinstance(image, Path) and not image.is_file():
            return "missing_image", None, f"{name} {image.name} not found"
    if not isinstance(row.prompt, str):
        return "bad_label", None, f"caption is a {type(row.prompt).__name__}, not text"
    if not row.prompt.strip():
        return "bad_label", None, "empty caption"
    if len(row.prompt) > MAX_PROMPT_CHARS:
        return "bad_label", None, f"caption of {len(row.prompt):,} characters (at most {MAX_PROMPT_CHARS:,})"
    return "kept", 0 if l0 > l1 else 1, ""


def row_key(row: PreferenceRow) -> tuple[str, str, str]:
    """What makes two rows the same pair: the caption and both images (bytes hashed, paths as given),
    so a duplicated row is reported instead of being trained on twice."""

    def image_key(image: bytes | Path | None) -> str:
        if isinstance(image, bytes | bytearray):
            return hashlib.sha256(image).hexdigest()
        return str(image)

    return str(row.prompt), image_key(row.image_0), image_key(row.image_1)


def _parquet_rows(path: Path) -> Iterator[PreferenceRow]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise PreferenceImportError(f"reading {path.name} needs pyarrow: pip install pyarrow (with the "
                                    "Python "
                                    f"that runs ComfyUI) ({exc})") from exc
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(str(path))
    except (pa.ArrowException, OSError) as exc:
        raise PreferenceImportError(f"{path.name} is not a readable parquet file ({exc}); export the "
                                    "Pick-a-Pic shard again, or use a .jsonl/.csv table") from exc
    names = set(pf.schema_arrow.names)
    missing = [c for c in _PARQUET_COLUMNS if c not in names]
    if missing:
        raise PreferenceImportError(f"{path.name} lacks the Pick-a-Pic column(s) {missing} (it has "
                                    f"{sorted(names)[:12]}); expected {list(_PARQUET_COLUMNS)}")
    columns = [*_PARQUET_COLUMNS, *(c for c in _OPTIONAL_COLUMNS if c in names)]
    index = 0
    try:
        for batch in pf.iter_batches(batch_size=64, columns=columns):
            yield from _parquet_batch(batch.to_pylist(), index)
            index += batch.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise PreferenceImportError(f"{path.name} row {index} onwards cannot be read ({exc}): the file is "
                                    "damaged; export the shard again") from exc


def _parquet_batch(records: list[dict[str, Any]], index: int) -> Iterator[PreferenceRow]:
    for rec in records:
        has = rec.get("has_label")
        yield PreferenceRow(
            index=index, prompt=rec.get("caption") or "", image_0=rec.get("jpg_0") or None,
            image_1=rec.get("jpg_1") or None, label_0=_label(rec.get("label_0")),
            label_1=_label(rec.get("label_1")), has_label=True if has is None else bool(has),
            source_0=str(rec.get("image_0_uid") or f"row {index} jpg_0"),
            source_1=str(rec.get("image_1_uid") or f"row {index} jpg_1"))
        index += 1


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _table_records(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = loads_json(line, f"{path.name} line {n}")
                except LimitError as exc:
                    raise PreferenceImportError(str(exc)) from None
                except json.JSONDecodeError as exc:
                    raise PreferenceImportError(f"{path.name} line {n} is not JSON ({exc.msg}); write one "
                                                "JSON "
                                                "object per line") from exc
                if not isinstance(rec, dict):
                    raise PreferenceImportError(f"{path.name} line {n} is a {type(rec).__name__}, not an "
                                                "object")
                yield rec
    else:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            try:
                yield from reader
            except csv.Error as exc:
                raise PreferenceImportError(
                    f"{path.name} line {reader.line_num + 1}: not a readable CSV row ({exc}); fields "
                    f"may hold at most {csv.field_size_limit():,} characters (a caption at most "
                    f"{MAX_PROMPT_CHARS:,}): fix that row") from exc


def _table_rows(path: Path, root: Path) -> Iterator[PreferenceRow]:
    folder = path.parent
    root = root.resolve()
    for index, rec in enumerate(_table_records(path)):
        if index == 0:
            lacking = [c for c in ("image_0", "image_1", "label_0") if c not in rec]
            if "caption" not in rec and "prompt" not in rec:
                lacking.insert(0, "caption")
            if lacking:
                raise PreferenceImportError(
                    f"{path.name} lacks the column(s) {lacking} (it has {sorted(rec)}); each row needs "
                    "caption "
                    "(or prompt), image_0, image_1, label_0 and optionally label_1 (default 1 - label_0)")
        images = []
        for key in ("image_0", "image_1"):
            name = str(rec.get(key) or "").strip()
            if not name:
                images.append(None)
                continue
            if os.path.isabs(name) or ".." in Path(name).parts:
                raise PreferenceImportError(f"{path.name} row {index}: {key} {name!r} must be a path "
                                            "relative to "
                                            f"{folder} without '..'; copy the images next to the table")
            p = (folder / name).resolve()
            if not _inside(p, root):
                raise PreferenceImportError(f"{path.name} row {index}: {key} {name!r} resolves to {p}, "
                                            "outside "
                                            f"{root}; copy the image into that folder")
            images.append(p)
        l0 = _label(rec.get("label_0"))
        raw1 = rec.get("label_1")
        l1 = _label(raw1) if raw1 not in (None, "") else (None if l0 is None else 1.0 - l0)
        has = rec.get("has_label")
        has_label = True if has in (None, "") else str(has).strip().lower() not in ("0", "false", "no")
        yield PreferenceRow(index=index, prompt=rec.get("caption") or rec.get("prompt") or "",
                            image_0=images[0], image_1=images[1], label_0=l0, label_1=l1, has_label=has_label,
                            source_0=str(rec.get("image_0") or ""), source_1=str(rec.get("image_1") or ""))


def read_rows(path: str | os.PathLike, root: str | os.PathLike) -> Iterator[PreferenceRow]:
    """The rows of a preference file (parquet, jsonl or csv; see the module docstring).

    ``root``: the folder every image path of a table file must stay inside (ComfyUI's input folder).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise PreferenceImportError(f"{path.name}: unknown preference file type {suffix!r}; use one of "
                                    f"{list(TABLE_SUFFIXES)}")
    rows = _parquet_rows(path) if suffix == ".parquet" else _table_rows(path, Path(root))
    return _text_errors(rows, path)


def _text_errors(rows: Iterator[PreferenceRow], path: Path) -> Iterator[PreferenceRow]:
    """``rows``, with a table that is not UTF-8 text (random bytes, a renamed binary file) reported
    as such instead of a bare UnicodeDecodeError."""
    try:
        yield from rows
    except UnicodeDecodeError as exc:
        raise PreferenceImportError(f"{path.name} is not UTF-8 text (byte {exc.start}: {exc.reason}): a "
                                    f"{path.suffix} table must be UTF-8; save it as UTF-8 or check that "
                                    "it is the file you meant") from exc
