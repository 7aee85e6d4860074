"""PNG grids of samples (PIL only)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["image_grid", "labelled_rows", "save_png"]


def image_grid(images: torch.Tensor, nrow: int, scale: int = 4, pad: int = 1) -> np.ndarray:
    """Tile images into one uint8 array: greyscale images with ink dark on white (like the paper's
    figures), RGB images as they are.

    Shapes: images (N, 1, H, W) or (N, 3, H, W) in [-1, 1]; returns (rows*(H*scale+pad)+pad,
    nrow*(W*scale+pad)+pad), plus a last axis of 3 for RGB.
    """
    n, ch, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    hs, ws = h * scale, w * scale
    unit = (images.detach().clamp(-1, 1) + 1.0) / 2.0
    if ch == 1:
        unit = 1.0 - unit
    pix = (unit * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    extra = () if ch == 1 else (ch,)
    canvas = np.full((rows * (hs + pad) + pad, nrow * (ws + pad) + pad, *extra), 160, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        tile = np.repeat(np.repeat(pix[i], scale, axis=0), scale, axis=1)
        tile = tile[..., 0] if ch == 1 else tile
        top, left = pad + r * (hs + pad), pad + c * (ws + pad)
        canvas[top: top + hs, left: left + ws] = tile
    return canvas


def wrap_name(line: str, width: int) -> list[str]:
    """``line`` in pieces of at most ``width`` characters, broken after underscores where it can be (a
    long method name such as ``pso_offline_fresh_mix_sft_ema_final`` would run under the images)."""
    out: list[str] = []
    rest = line
    while len(rest) > width:
        cut = rest.rfind("_", 0, width)
        cut = cut + 1 if cut > 0 else width
        out.append(rest[:cut])
        rest = rest[cut:]
    return [*out, rest]


def labelled_rows(blocks: Sequence[tuple[str, np.ndarray]], label_width: int = 150) -> np.ndarray:
    """Stack grids vertically with a text label left of each (PIL's default bitmap font).

    Args: blocks: (label, uint8 (h_i, w_i) or (h_i, w_i, 3) grid) pairs. Returns uint8
    (sum h_i + gaps, label_width + max w_i), plus a last axis of 3 when any grid is RGB.
    """
    from PIL import Image, ImageDraw

    width = label_width + max(g.shape[1] for _, g in blocks)
    gap = 4
    height = sum(g.shape[0] + gap for _, g in blocks)
    rgb = any(g.ndim == 3 for _, g in blocks)
    canvas = Image.new("RGB" if rgb else "L", (width, height), (255, 255, 255) if rgb else 255)
    draw = ImageDraw.Draw(canvas)
    y = 0
    for label, grid in blocks:
        tile = Image.fromarray(grid)
        canvas.paste(tile.convert("RGB") if rgb else tile, (label_width, y))
        lines = [part for line in label.split("\n") for part in wrap_name(line, (label_width - 8) // 6)]
        for k, line in enumerate(lines):
            draw.text((4, y + 2 + 11 * k), line, fill=(0, 0, 0) if rgb else 0)
        y += grid.shape[0] + gap
    return np.asarray(canvas)


def save_png(array: np.ndarray, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a uint8 greyscale array as PNG atomically (``pso.io.atomic_write_bytes``), with text
    metadata (e.g. what produced it)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from pso.io import atomic_write_bytes

    info = PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", pnginfo=info)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
