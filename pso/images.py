"""Target-image folders: safe paths, file listing, captions, fingerprints and resizing.

Pure helpers (standard library and PyTorch only; no ComfyUI, no image decoder): the ComfyUI node
``PSOTargetImagesFromFolder`` decodes the files with Pillow, which the host provides, and calls
these for everything else.

A target folder is a flat folder of images (``IMAGE_EXTENSIONS``, case-insensitive) with optional
captions ``<image stem>.txt`` next to them. Sub-folders and other files are ignored. Files are
listed in name order; that order is the order of the targets.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
import torch.nn.functional as F

from .limits import MAX_PROMPT_CHARS, LimitError, check_prompt, shorten

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSION = ".txt"
SIZE_MULTIPLE = 8  # every latent-diffusion VAE this pack targets downsamples by 8 (some by 16 or 32)


class TargetImageError(ValueError):
    """A target folder, file or setting a user has to fix; the message says what and how."""


def list_subfolders(root: str | os.PathLike, depth: int = 2) -> list[str]:
    """Sub-folders of ``root`` down to ``depth`` levels, as sorted "a" / "a/b" strings.

    Hidden folders (leading ".") are skipped. Symlinked folders are listed but not descended into;
    :func:`resolve_folder` decides whether they may be read.
    """
    root = Path(root)
    found: list[str] = []

    def walk(folder: Path, prefix: str, level: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            name = f"{prefix}{entry.name}"
            found.append(name)
            if level < depth and not entry.is_symlink():
                walk(Path(entry.path), name + "/", level + 1)

    walk(root, "", 1)
    return found


def _is_inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_folder(root: str | os.PathLike, folder: str) -> Path:
    """The real path of ``folder`` (relative to ``root``), refusing anything that leaves ``root``.

    Raises :class:`TargetImageError` for an empty name, an absolute path, a ``..`` component, a
    symlink that resolves outside ``root``, and a folder that does not exist.
    """
    root_real = Path(root).resolve()
    if not isinstance(folder, str) or not folder.strip():
        raise TargetImageError(f"folder {folder!r} is empty: choose a sub-folder of ComfyUI's input folder "
                               f"{root_real}")
    if PurePosixPath(folder).is_absolute() or PureWindowsPath(folder).is_absolute() or \
            PureWindowsPath(folder).drive:
        raise TargetImageError(f"folder {folder!r} is an absolute path; give a sub-folder of ComfyUI's input "
                               f"folder {root_real} instead (move or link the images there)")
    if ".." in PureWindowsPath(folder).parts:  # splits on both "/" and "\\"
        raise TargetImageError(f"folder {folder!r} contains '..'; target images are only read from inside "
                               f"ComfyUI's input folder {root_real}: choose one of its sub-folders")
    too_long = [p for p in PureWindowsPath(folder).parts if len(p.encode("utf-8", "surrogatepass")) > 255]
    if too_long:  # the file system would answer a bare OSError 36
        raise TargetImageError(f"folder {shorten(folder)!r} has a name part of {len(too_long[0])} "
                               "characters; file systems allow 255 bytes: choose a sub-folder with a shorter "
                               "name")
    path = (root_real / folder).resolve()
    if not _is_inside(path, root_real):
        raise TargetImageError(f"folder {folder!r} resolves to {path}, outside ComfyUI's input folder "
                               f"{root_real} (a symlink?); copy the images into the input folder instead")
    if not path.is_dir():
        raise TargetImageError(f"folder {folder!r} not found in ComfyUI's input folder {root_real}: create "
                               "it and put the target images there, or pick another folder (press R to "
                               "refresh the list)")
    return path


def _inside_files(folder: Path, root: Path | None, suffixes: Sequence[str]) -> list[Path]:
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file()),
                   key=lambda p: p.name)
    if root is not None:
        root_real = Path(root).resolve()
        outside = [p.name for p in files if not _is_inside(p.resolve(), root_real)]
        if outside:
            raise TargetImageError(f"{', '.join(outside)} in {folder} link(s) to files outside ComfyUI's "
                                   f"input folder {root_real}; copy the files into the folder instead")
    return files


def list_images(folder: Path, root: str | os.PathLike | None = None) -> list[Path]:
    """The image files directly in ``folder``, in name order; refuses files linking outside ``root``."""
    images = _inside_files(folder, None if root is None else Path(root), IMAGE_EXTENSIONS)
    if not images:
        kinds = "/".join(e[1:] for e in IMAGE_EXTENSIONS)
        raise TargetImageError(f"no images in {folder}: put {kinds} files there (sub-folders are not "
                               "searched)")
    return images


def caption_path(image: Path) -> Path:
    return image.with_suffix(CAPTION_EXTENSION)


def read_prompts(images: Sequence[Path], default_prompt: str) -> list[str]:
    """One prompt per image: its caption file (whitespace stripped), else ``default_prompt``.

    An empty caption file counts as no caption. Raises :class:`TargetImageError` listing every image
    left without a prompt when ``default_prompt`` is empty.
    """
    default = default_prompt.strip()
    prompts: list[str] = []
    missing: list[str] = []
    for image in images:
        path = caption_path(image)
        text = ""
        if path.is_file():
            if path.stat().st_size > 4 * MAX_PROMPT_CHARS:  # not read whole: the check below names it
                raise TargetImageError(f"caption {path.name} is {path.stat().st_size:,} bytes; a prompt may "
                                       f"be at most {MAX_PROMPT_CHARS:,} characters: shorten it")
            try:
                text = path.read_text(encoding="utf-8-sig").strip()
            except UnicodeDecodeError as exc:
                raise TargetImageError(f"caption {path.name} is not UTF-8 text ({exc.reason}); save it as "
                                       "UTF-8") from exc
        if not text:
            text = default
            if not text:
                missing.append(image.name)
        try:
            prompts.append(check_prompt(text, f"caption {path.name}" if path.is_file() else "default_prompt"))
        except LimitError as exc:
            raise TargetImageError(str(exc)) from None
    if missing:
        raise TargetImageError(f"{len(missing)} image(s) have no caption file (<image name>"
                               f"{CAPTION_EXTENSION}) and default_prompt is empty: {', '.join(missing)}. "
                               "Add the captions or set default_prompt")
    return prompts


def folder_fingerprint(folder: Path) -> str:
    """A hash of the names, sizes and modification times of the images and captions in ``folder``.

    It changes when such a file is added, removed, renamed or rewritten; other files do not count.
    """
    digest = hashlib.sha256(str(folder).encode())
    for path in _inside_files(folder, None, (*IMAGE_EXTENSIONS, CAPTION_EXTENSION)):
        st = path.stat()
        digest.update(f"\0{path.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def check_size(size: int) -> int:
    """``size`` is 0 (keep sizes) or a positive multiple of :data:`SIZE_MULTIPLE`."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise TargetImageError(f"size {size!r} must be an integer (0, or a multiple of {SIZE_MULTIPLE})")
    if size < 0 or size % SIZE_MULTIPLE:
        lower = max(size // SIZE_MULTIPLE * SIZE_MULTIPLE, SIZE_MULTIPLE)
        raise TargetImageError(f"size {size} must be 0 (keep the images' sizes) or a positive multiple of "
                               f"{SIZE_MULTIPLE}, the VAE's downsampling factor; try {lower} or "
                               f"{lower + SIZE_MULTIPLE}")
    return size


def check_same_size(names: Sequence[str], images: Sequence[torch.Tensor]) -> None:
    """All images (H, W, C) share one size; else name two that differ and suggest ``size``."""
    h0, w0 = images[0].shape[:2]
    for name, image in zip(names, images, strict=True):
        h, w = image.shape[:2]
        if (h, w) != (h0, w0):
            raise TargetImageError(f"images differ in size: {names[0]} is {w0}x{h0} but {name} is {w}x{h} "
                                   "(width x height). Set size (e.g. 512) to resize and centre-crop every "
                                   "image to size x size, or make them the same size")


def check_latent_grid(height: int, width: int, factor: int, fix: str) -> None:
    """Pixels map onto the VAE's latent grid only if both sides are multiples of ``factor``."""
    if height % factor or width % factor:
        raise TargetImageError(f"images are {width}x{height} (width x height), not a multiple of the VAE's "
                               f"downsampling factor {factor}; the VAE would silently crop them. {fix}")


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is ``size`` (bicubic, antialiased), then centre-crop to a square.

    Shapes: image (H, W, C) floats in [0, 1] -> (size, size, C), clamped to [0, 1].
    """
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = image.movedim(-1, 0).unsqueeze(0).float()
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, :, top:top + size, left:left + size]
    return x.squeeze(0).movedim(0, -1).clamp(0.0, 1.0).contiguous()
