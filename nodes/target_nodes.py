"""Nodes that turn images into PSO targets: the samples the model should learn to prefer.

A target is VAE-encoded once, here, and travels as a :class:`~.types.TargetSet` (latents in the
VAE's latent space, on the CPU in float32, one prompt and one source name per image). The folder
logic (safe paths, captions, fingerprints, resizing) lives in :mod:`pso.images`; this module only
decodes files with Pillow and calls the host's VAE.
"""

from __future__ import annotations

import logging
from pathlib import Path

import folder_paths
import numpy as np
import torch
from comfy_api.v0_0_2 import io
from PIL import Image, ImageOps

from ..pso import images as target_images
from ..pso.images import TargetImageError
from .types import TARGETS_TYPE, TargetSet

logger = logging.getLogger(__name__)


def _input_root() -> Path:
    return Path(folder_paths.get_input_directory())


def load_rgb(path: Path) -> torch.Tensor:
    """Decode one image file: first frame, EXIF-transposed, RGB (alpha dropped, not composited).

    Shapes: -> (H, W, 3) float32 in [0, 1].
    """
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I;16"):  # 16-bit greyscale: keep its full range
                grey = np.asarray(img, dtype=np.float32) / 65535.0
                return torch.from_numpy(grey).unsqueeze(-1).expand(-1, -1, 3).contiguous()
            if img.mode == "I":  # as ComfyUI's LoadImage does
                img = img.point(lambda v: v * (1 / 255))
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise TargetImageError(f"{path.name} in {path.parent} has an image extension but cannot be read as "
                               f"an image ({type(exc).__name__}: {exc}); replace or remove the file") from exc
    return torch.from_numpy(rgb)


def load_folder_images(files: list[Path], size: int) -> torch.Tensor:
    """Decode ``files`` and bring them to one size (``size`` > 0: resize + centre-crop, else equal).

    Shapes: -> (M, H, W, 3) float32 in [0, 1].
    """
    import comfy.utils

    progress = comfy.utils.ProgressBar(len(files))
    images = []
    for i, path in enumerate(files):
        image = load_rgb(path)
        images.append(target_images.resize_center_crop(image, size) if size else image)
        progress.update_absolute(i + 1, len(files))  # also raises if the user pressed Cancel
    if not size:
        target_images.check_same_size([f.name for f in files], images)
    return torch.stack(images)


def encode_targets(vae, pixels: torch.Tensor, fix: str) -> torch.Tensor:
    """VAE-encode a batch of images once.

    A video VAE (the host's ``latent_dim`` 3: Wan 2.1 / 2.2, also Qwen-Image's) reads an IMAGE batch
    as the frames of ONE clip, so each image is encoded alone, as a one-frame clip (the latent
    format Qwen-Image samples in, and the one-frame videos a Wan LoRA can learn a look from).

    Shapes: pixels (M, H, W, C) in [0, 1] (channels after the third ignored) -> latents
    (M, C_lat, H / f, W / f), or (M, C_lat, 1, H / f, W / f) from a video VAE, float32 on the CPU, in
    the VAE's (outer) latent space.
    """
    factor = vae.spacial_compression_encode()
    target_images.check_latent_grid(int(pixels.shape[1]), int(pixels.shape[2]), int(factor), fix)
    video = getattr(vae, "latent_dim", 2) == 3
    if video:
        latents = torch.cat([vae.encode(pixels[i:i + 1, ..., :3]) for i in range(pixels.shape[0])])
    else:
        latents = vae.encode(pixels[..., :3])
    if latents.ndim != (5 if video else 4) or (video and latents.shape[2] != 1):
        raise TargetImageError(f"this VAE encodes an image to latents of shape {tuple(latents.shape)}; PSO "
                               "targets need the VAE of the model you fine-tune (an image VAE, or a Wan / "
                               "Qwen-Image video VAE, which gives one frame per image)")
    return latents.to(device="cpu", dtype=torch.float32)


def _vae_input() -> io.Vae.Input:
    return io.Vae.Input("vae", tooltip="The VAE of the model you fine-tune: it encodes the target images "
                                       "into that model's latent space (once, here).")


class PSOTargetImagesFromFolder(io.ComfyNode):
    """Target images and their captions from a sub-folder of ComfyUI's input folder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        exts = "/".join(e[1:].upper() for e in target_images.IMAGE_EXTENSIONS)
        return io.Schema(
            node_id="PSOTargetImagesFromFolder",
            display_name="PSO Target Images (folder)",
            category="PSO/data",
            description=(
                "Loads the target images for PSO: the samples the model should learn to prefer over its "
                f"own outputs. Reads every {exts} file directly in a sub-folder of ComfyUI's input "
                "folder (name order; sub-folders and other files are ignored), with its caption from "
                "<image name>.txt next to it. Images are EXIF-rotated and converted to RGB (transparency "
                "is dropped, not composited onto a background), then VAE-encoded once. New, changed or "
                "removed images and captions make the node run again."
            ),
            inputs=[
                io.Combo.Input(
                    "folder",
                    options=target_images.list_subfolders(_input_root()),
                    tooltip="Sub-folder of ComfyUI's input folder holding the target images and their .txt "
                    "captions (press R to refresh the list after adding one).",
                ),
                _vae_input(),
                io.String.Input(
                    "default_prompt",
                    default="",
                    multiline=False,
                    tooltip="Prompt for images without a caption file (<image name>.txt). Leave empty to "
                    "require a caption for every image.",
                ),
                io.Int.Input(
                    "size",
                    default=0,
                    min=0,
                    max=16384,
                    step=target_images.SIZE_MULTIPLE,
                    tooltip="0 keeps the images' sizes (all must then be the same size). Above 0: resize "
                    "the shorter side to this many pixels and centre-crop to size x size; a multiple "
                    f"of {target_images.SIZE_MULTIPLE}.",
                ),
            ],
            outputs=[
                TARGETS_TYPE.Output(
                    display_name="targets",
                    tooltip="The encoded target images with one prompt each (caption or default prompt) "
                    "and their file names, for PSO Sample References and PSO Build Pairs.",
                ),
                io.Image.Output(
                    display_name="images",
                    tooltip="The loaded images after resizing, exactly as encoded: connect Preview Image "
                    "to check them.",
                ),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, folder=None, **kwargs) -> str | float:
        """Names, sizes and modification times of the folder's images and captions (cache key)."""
        if folder is None:  # folder comes from a link, unknown before the run: never reuse the cache
            return float("nan")
        try:
            return target_images.folder_fingerprint(target_images.resolve_folder(_input_root(), folder))
        except (TargetImageError, OSError) as exc:  # execute() reports the problem to the user
            return f"unreadable: {exc}"

    @classmethod
    def validate_inputs(cls, folder=None) -> bool | str:
        """Checked when the prompt is queued (the host's input validation), before anything runs: a
        missing, empty or unsafe folder is reported at once instead of after references are sampled.
        ``folder`` is None when it comes from a link (known only at run time: execute() checks it)."""
        if folder is None:
            return True
        try:
            root = _input_root()
            target_images.list_images(target_images.resolve_folder(root, folder), root)
        except TargetImageError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, folder, vae, default_prompt, size) -> io.NodeOutput:
        target_images.check_size(size)
        root = _input_root()
        path = target_images.resolve_folder(root, folder)
        files = target_images.list_images(path, root)
        prompts = target_images.read_prompts(files, default_prompt)
        pixels = load_folder_images(files, size)
        latents = encode_targets(vae, pixels, fix="Set size (e.g. 512) to resize and centre-crop them.")
        logger.info("PSO targets: %d images from %s, latents %s", len(files), path, tuple(latents.shape))
        return io.NodeOutput(TargetSet(latents, prompts, [f.name for f in files]), pixels)


class PSOTargetImagesFromBatch(io.ComfyNode):
    """Target images from any IMAGE batch in the graph, all with one prompt."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PSOTargetImagesFromBatch",
            display_name="PSO Target Images (IMAGE batch)",
            category="PSO/data",
            description=(
                "Makes PSO targets (the samples the model should learn to prefer over its own outputs) from "
                "an IMAGE batch produced anywhere in the graph (Load Image, another model's samples, an "
                "upscaler...). Every image gets the same prompt; they are VAE-encoded once. Only the first "
                "three channels are used (alpha is dropped)."
            ),
            inputs=[
                io.Image.Input(
                    "images",
                    tooltip="The target images, one batch of equal size (width and height multiples of the "
                    "VAE's downsampling factor, usually 8).",
                ),
                _vae_input(),
                io.String.Input(
                    "prompt",
                    default="",
                    multiline=True,
                    tooltip="The prompt every one of these images answers; PSO trains the model to prefer "
                    "them when given this prompt. Required.",
                ),
            ],
            outputs=[
                TARGETS_TYPE.Output(
                    display_name="targets",
                    tooltip="The encoded target images with the prompt, named 'image 0', 'image 1'..., for "
                    "PSO Sample References and PSO Build Pairs.",
                ),
            ],
        )

    @classmethod
    def execute(cls, images, vae, prompt) -> io.NodeOutput:
        text = prompt.strip()
        if not text:
            raise TargetImageError("prompt is empty: type the prompt these target images answer (or use PSO "
                                   "Target Images (folder) with one caption file per image)")
        latents = encode_targets(vae, images, fix="Resize them with an Upscale Image node or crop them with "
                                 "ImageCrop first.")
        n = int(latents.shape[0])
        return io.NodeOutput(TargetSet(latents, [text] * n, [f"image {i}" for i in range(n)]))
