"""Atomic files and training checkpoints.

Every file is written to a temporary file in the destination folder, flushed to disk (fsync) and
renamed over the destination with ``os.replace``: a crash or an exception leaves either the old
file or the new one, never a torn file, and no temporary file behind. Files carry metadata naming
what produced them (:data:`PRODUCER`).

A checkpoint is a folder ``step_000123/`` (the state after 123 completed optimizer steps) holding
``adapter.safetensors`` (trainable tensors), ``state.pt`` (optimizer, scheduler, generator states,
histories; tensors and plain containers only, read back with ``torch.load(weights_only=True)``)
and ``meta.json`` (JSON, for people and tools). It is written to a hidden temporary folder that is
renamed into place, so a crash leaves either the old checkpoints or the new one as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import safetensors
import safetensors.torch
import torch

from . import __version__
from .limits import loads_json

logger = logging.getLogger(__name__)

PRODUCER = f"comfyui-pso {__version__}"
CHECKPOINT_FORMAT = "pso-checkpoint"
CHECKPOINT_VERSION = 1
ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or holds something other than tensors and containers."""


# --------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------

def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; Windows cannot open a folder for fsync)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Temporary files and folders a killed writer can leave (names this module and the LoRA writer make).
_TEMP_NAMES = re.compile(r"^\.(.+\.[a-z0-9_]{8,32}\.(tmp|partial)|(tmp|old)_step_\d+_.+)$")
#: A temporary file older than this is a leftover (no write here takes minutes), not one in progress.
STALE_TEMP_AGE_S = 600.0


def _new_temp_file(folder: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """``(fd, path)`` of a new empty file in ``folder`` created with mode 0o666 minus the umask (as
    ``open()`` creates files; ``tempfile.mkstemp`` would make it 0600, unreadable by a second user or a
    service account that shares the output folder)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        path = folder / f"{prefix}{uuid.uuid4().hex[:12]}{suffix}"
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file {prefix}*{suffix} in {folder}")


def new_temp_dir(folder: Path, prefix: str) -> Path:
    """A new empty folder in ``folder``, mode 0o777 minus the umask (``tempfile.mkdtemp`` gives 0700)."""
    for _ in range(100):
        path = folder / f"{prefix}{uuid.uuid4().hex[:12]}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary folder {prefix}* in {folder}")


def sweep_stale_temps(folder: str | os.PathLike, older_than_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Remove the hidden temporary files and folders that a killed writer left in ``folder`` (names
    ``.<name>.<random>.tmp``, ``.<name>.<random>.partial``, ``.tmp_step_*``, ``.old_step_*``) once they
    are older than ``older_than_s`` seconds (younger ones may belong to a write in progress in another
    process). Returns what was removed; errors are logged, never raised."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for entry in folder.iterdir():
        if not _TEMP_NAMES.match(entry.name):
            continue
        try:
            if now - entry.lstat().st_mtime < older_than_s:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError as exc:
            logger.warning("could not remove the leftover temporary %s: %s", entry, exc)
    if removed:
        logger.info("removed %d leftover temporary file(s) of interrupted writes in %s: %s", len(removed),
                    folder, [p.name for p in removed])
    return removed


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO, Path], None]) -> Path:
    """Run ``write(file, temp_path)`` on a temporary file next to ``path``, then rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is untouched. Parent folders are
    created. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp_file(path.parent, f".{path.name}.", ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f, tmp)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, os.replace)."""
    return _atomic_write(path, lambda f, _tmp: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented UTF-8 JSON atomically. Raises TypeError for non-JSON values
    before anything is written."""
    data = (json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n").encode("utf-8")
    return atomic_write_bytes(path, data)


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    bad = {k: type(v).__name__ for k, v in metadata.items()
           if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; these entries are not: {bad}. "
                        "Convert values with str() or json.dumps().")
    return dict(metadata)


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> Path:
    """Save ``tensors`` as a safetensors file atomically.

    metadata: string-to-string header entries; ``producer`` defaults to :data:`PRODUCER`. Tensors
    are made contiguous and moved to the CPU first. A failure (a bad tensor, a full disk) leaves the
    previous file byte-identical and no temporary file.
    """
    meta = _check_metadata(metadata or {})
    meta.setdefault("producer", PRODUCER)
    cpu = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}

    def write(f: BinaryIO, tmp: Path) -> None:
        f.write(safetensors.torch.save(cpu, metadata=meta))

    return _atomic_write(path, write)


def unique_path(folder: str | os.PathLike, stem: str, ext: str) -> Path:
    """``folder/stem_NNNNN.ext`` with a counter one above the highest existing one (00001 first).

    Never returns a path that exists at the time of the call (a file written by another process
    in between is not detected; writers here never overwrite a user's file through this name).
    """
    ext = ext.lstrip(".")
    if not stem or os.sep in stem or (os.altsep and os.altsep in stem):
        raise ValueError(f"file stem {stem!r} must be a non-empty name without path separators.")
    folder = Path(folder)
    pattern = re.compile(rf"^{re.escape(stem)}_(\d{{5,}})\.{re.escape(ext)}$")
    counters = [int(m.group(1)) for name in (os.listdir(folder) if folder.is_dir() else ())
                if (m := pattern.match(name))]
    counter = max(counters, default=0) + 1
    while (candidate := folder / f"{stem}_{counter:05d}.{ext}").exists():
        counter += 1
    return candidate


# --------------------------------------------------------------------------------------------
# One writer per folder
# --------------------------------------------------------------------------------------------

LOCK_FILE = ".lock"


class FolderBusyError(RuntimeError):
    """Another process holds a folder's lock (:func:`folder_lock`); the message names it."""


def _try_lock(fd: int) -> bool:
    if os.name == "nt":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str):
    """Hold an exclusive lock on ``folder/.lock`` for the block, or raise :class:`FolderBusyError`.

    The operating system's lock (``flock`` / ``msvcrt.locking``) is released when the holder exits or
    is killed, so a crash never leaves a stale lock; the file keeps the holder's pid, host and start
    time for the message. Two ComfyUI servers (or two processes) sharing one output folder use it so
    that they never write checkpoints into the same run at once.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd):
            try:
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() if hasattr(os, "pread") \
                    else path.read_text(encoding="utf-8", errors="replace").strip()
            except OSError:
                holder = "unknown"
            raise FolderBusyError(f"{what} is in use by another process ({holder or 'unknown'}): two writers "
                                  "would overwrite each other's files. Wait until it has finished, or use "
                                  "another folder.")
        info = f"pid {os.getpid()} on {socket.gethostname()} since " \
               f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}"
        os.ftruncate(fd, 0)
        os.write(fd, info.encode("utf-8"))  # at offset 0: the file was just opened
        yield path
    finally:
        os.close(fd)  # releases the lock


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """A loaded checkpoint: ``adapter`` tensors (CPU), ``state`` (plain containers), ``meta`` (JSON)."""

    path: Path
    step: int
    adapter: dict[str, torch.Tensor]
    state: dict[str, Any]
    meta: dict[str, Any]


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint after ``step`` completed steps: ``step_000123``."""
    if step < 0:
        raise ValueError(f"checkpoint step {step} must be >= 0.")
    return f"step_{step:06d}"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``directory`` as ``(step, path)``, oldest first. Temporary and
    incomplete folders are ignored (an incomplete one is logged)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        m = _STEP_DIR.match(entry.name)
        if not (m and entry.is_dir()):
            continue
        if all((entry / n).is_file() for n in (ADAPTER_FILE, STATE_FILE, META_FILE)):
            found.append((int(m.group(1)), entry))
        else:
            logger.warning("ignoring incomplete checkpoint folder %s", entry)
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def _write_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(directory: str | os.PathLike, step: int, adapter: Mapping[str, torch.Tensor],
                    state: Mapping[str, Any], meta: Mapping[str, Any] | None = None, keep: int = 0) -> Path:
    """Write checkpoint ``directory/step_NNNNNN`` and return its path.

    adapter: tensors for ``adapter.safetensors``. state: tensors, numbers, strings, None and
    lists/tuples/dicts of them (``torch.load(weights_only=True)`` must read it back; anything else
    raises before the checkpoint appears). meta: JSON-serialisable extras for ``meta.json``.
    keep: how many newest checkpoints to keep after this one is in place (0 = all).
    An existing checkpoint of the same step is replaced.
    """
    if keep < 0:
        raise ValueError(f"keep={keep} must be >= 0 (0 keeps every checkpoint).")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(step)
    info = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "producer": PRODUCER,
            "step": int(step), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **dict(meta or {})}
    meta_bytes = (json.dumps(info, indent=2, sort_keys=True) + "\n").encode("utf-8")
    adapter_cpu = {k: t.detach().to("cpu").contiguous() for k, t in adapter.items()}
    adapter_bytes = safetensors.torch.save(adapter_cpu, metadata={"producer": PRODUCER, "step": str(step)})
    sweep_stale_temps(directory)
    tmp = new_temp_dir(directory, f".tmp_{final.name}_")
    old: Path | None = None
    try:
        _write_file(tmp / ADAPTER_FILE, lambda f: f.write(adapter_bytes))
        _write_file(tmp / STATE_FILE, lambda f: torch.save(dict(state), f))
        _check_weights_only(tmp / STATE_FILE)
        _write_file(tmp / META_FILE, lambda f: f.write(meta_bytes))  # last: marks the folder complete
        if final.exists():
            old = directory / f".old_{final.name}_{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(directory)
    if keep:
        prune_checkpoints(directory, keep)
    logger.info("saved checkpoint %s", final)
    return final


def _check_weights_only(path: Path) -> None:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TypeError(f"checkpoint state holds an object torch.load(weights_only=True) cannot read "
                        f"back: {exc}. Store tensors, numbers, strings and lists/dicts only.") from exc


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints (keep >= 1); returns the deleted."""
    if keep < 1:
        raise ValueError(f"keep={keep} must be >= 1 to prune checkpoints.")
    doomed = [p for _, p in list_checkpoints(directory)[:-keep]]
    for p in doomed:
        shutil.rmtree(p)
        logger.debug("removed old checkpoint %s", p)
    return doomed


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a checkpoint folder, else the latest checkpoint inside it."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"no checkpoint in {path}: expected a step_NNNNNN folder holding "
                              f"{ADAPTER_FILE}, {STATE_FILE} and {META_FILE}, or a folder of such folders.")
    return latest


def read_json(path: str | os.PathLike) -> Any:
    """A small JSON file this project wrote (meta.json, run records): JSONDecodeError for invalid JSON,
    :class:`pso.limits.LimitError` (a ValueError) for JSON nested deeper than anything written here."""
    path = Path(path)
    return loads_json(path.read_text(encoding="utf-8"), str(path))


def load_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint folder (or of the latest one inside a folder of them), checked
    to be a comfyui-pso checkpoint's; its ``step`` is an int."""
    path = resolve_checkpoint(path)
    try:
        meta = read_json(path / META_FILE)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path / META_FILE} cannot be read ({exc}): the checkpoint is damaged; "
                              "resume from an older one (a step_NNNNNN folder) or start a new run.") from exc
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path} is not a comfyui-pso checkpoint (meta.json format={got!r}, expected "
                              f"{CHECKPOINT_FORMAT!r}).")
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path / META_FILE} has no valid step ({step!r}): the checkpoint is damaged.")
    return meta


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint folder (or the latest one inside a folder of checkpoints) onto the CPU.

    ``state.pt`` is read with ``torch.load(weights_only=True)``: a file holding any other object
    raises CheckpointError instead of running its code.
    """
    path = resolve_checkpoint(path)
    missing = [n for n in (ADAPTER_FILE, STATE_FILE, META_FILE) if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}.")
    meta = load_checkpoint_meta(path)
    damaged = (f"the checkpoint {path} is damaged (truncated or overwritten: a full disk or a crash while "
               "copying it?); resume from an older step_NNNNNN folder or start a new run")
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path / STATE_FILE}: it holds objects other than tensors and plain "
            f"containers, which could run code when unpickled ({exc}). Only load checkpoints written "
            "by comfyui-pso.") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path / STATE_FILE} cannot be read ({exc}): {damaged}.") from exc
    try:
        adapter = safetensors.torch.load_file(str(path / ADAPTER_FILE), device="cpu")
    except (safetensors.SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path / ADAPTER_FILE} cannot be read ({exc}): {damaged}.") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE_FILE} holds a {type(state).__name__}, not a training state: "
                              f"{damaged}.")
    return Checkpoint(path=path, step=int(meta["step"]), adapter=adapter, state=state, meta=meta)
