"""Import Pick-a-Pic preference pairs (Kirstain et al. 2023) into a pair dataset (``pso-import-pickapic``).

Pick-a-Pic's parquet shards hold one comparison per row: ``caption``, the two images ``jpg_0`` /
``jpg_1`` (JPEG bytes) and the preference ``label_0`` / ``label_1`` (1 / 0, or 0.5 each for a tie).
Each decided row becomes one pair: the preferred image is the target, the other the reference (the
paper's offline preference tuning, Eq. 6); ties are skipped. Images are resized (shorter side) and
centre-cropped to the resolution, then encoded with the model's VAE (latent distribution mean times
the VAE's scaling factor: ComfyUI's inner latent space for SD1.x / SDXL). Parquet files are read in
row batches and pairs are written shard by shard, so memory stays flat in the dataset's size.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from pso.dataset import DatasetFingerprint, PairDatasetWriter
from pso.preference_import import ImportReport, PreferenceRow, classify, read_rows
from pso.schedules import FEW_STEP_TIMESTEPS, few_step_sigmas

from .model import (
    detect_family,
    is_single_file,
    read_diffusers_config,
    require,
    schedule_from_config,
    unet_config_of,
)

logger = logging.getLogger(__name__)

SAMPLER = "pickapic"  # the fingerprint's sampler: these references are not samples of the model


def parquet_files(sources: Sequence[str | Path]) -> list[Path]:
    """The ``*.parquet`` files of ``sources`` (files, or folders searched recursively), sorted."""
    out: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            out += sorted(src.rglob("*.parquet"))
        elif src.is_file():
            out.append(src)
        else:
            raise FileNotFoundError(f"Pick-a-Pic source {src} does not exist.")
    if not out:
        raise FileNotFoundError(f"no .parquet files in {list(map(str, sources))}.")
    return out


def decided_rows(path: Path, report: ImportReport,
                 batch_rows: int) -> Iterator[list[tuple[PreferenceRow, int]]]:
    """Batches of ``(row, winner)`` for the decided rows of one file; every other row is recorded in
    ``report`` by category (ties, unlabelled, invalid labels, missing images), as the ComfyUI import
    node reports them (one row classifier: :func:`pso.preference_import.classify`)."""
    batch: list[tuple[PreferenceRow, int]] = []
    for row in read_rows(path, path.parent):
        report.rows_read += 1
        category, winner, reason = classify(row)
        if category == "kept":
            batch.append((row, winner))
            if len(batch) == batch_rows:
                yield batch
                batch = []
        elif category == "tie":
            report.ties.append(row.index)
        elif category == "unlabelled":
            report.unlabelled.append(row.index)
        else:
            getattr(report, category).append((row.index, reason))
    if batch:
        yield batch


def load_image(data: bytes | Path, size: int) -> torch.Tensor:
    """JPEG/PNG bytes (or a file) -> (3, size, size) float in [0, 1]: shorter side resized (bicubic),
    centre crop."""
    from PIL import Image

    with Image.open(io.BytesIO(data) if isinstance(data, bytes | bytearray) else data) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        buf = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return buf.view(size, size, 3).permute(2, 0, 1).float() / 255.0


class VAEEncoder:
    """The model's VAE: ``encode((B, 3, H, W) in [0, 1]) -> (B, C, H/f, W/f)`` inner latents."""

    def __init__(self, model: str | Path, model_config: str | Path | None, device: torch.device) -> None:
        diffusers = require("diffusers", "the Pick-a-Pic importer")
        model = Path(model)
        if is_single_file(model):
            if model_config is None:
                raise ValueError(f"{model} is a single-file checkpoint: pass --model-config, a local "
                                 "diffusers folder of its family (configs only).")
            self.vae = diffusers.AutoencoderKL.from_single_file(str(model), config=str(model_config),
                                                                subfolder="vae", local_files_only=True)
            self.config_dir = Path(model_config)
        else:
            self.vae = diffusers.AutoencoderKL.from_pretrained(model, subfolder="vae", local_files_only=True)
            self.config_dir = model
        self.vae.requires_grad_(False).eval().to(device)
        self.device = device
        self.scale = float(self.vae.config.scaling_factor)
        self.shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(images.to(self.device) * 2 - 1).latent_dist
        return ((dist.mean - self.shift) * self.scale).float().cpu()


def import_pickapic(sources: Sequence[str | Path], output: str | Path, model: str | Path, *,
                    model_config: str | Path | None = None, resolution: int = 512, timesteps: str = "dmd2",
                    shard_size: int = 256, limit: int | None = None, batch_rows: int = 16,
                    device: str | None = None) -> int:
    """Write the decided Pick-a-Pic pairs of ``sources`` to a new pair dataset at ``output``; returns
    the number of pairs written. ``timesteps`` (a :data:`pso.schedules.FEW_STEP_TIMESTEPS` name) sets
    the fingerprint's SIGMAS, the schedule offline PSO trains at."""
    if timesteps not in FEW_STEP_TIMESTEPS:
        raise ValueError(f"timesteps={timesteps!r} is unknown; choose one of {sorted(FEW_STEP_TIMESTEPS)}.")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = VAEEncoder(model, model_config, dev)
    family = detect_family(unet_config_of(vae.config_dir))
    scheduler_config = read_diffusers_config(vae.config_dir / "scheduler" / "scheduler_config.json")
    schedule, _ = schedule_from_config(scheduler_config, "auto")
    if resolution % vae.factor:
        raise ValueError(f"resolution={resolution} must be a multiple of the VAE's factor {vae.factor}.")
    side = resolution // vae.factor
    fp = DatasetFingerprint(family, int(vae.vae.config.latent_channels), side, side, latent_format=family,
                            sigmas=few_step_sigmas(schedule, timesteps), sampler=SAMPLER,
                            vae_scale_factor=vae.factor)
    written = 0
    reports = []
    with PairDatasetWriter(output, fp, shard_size=shard_size) as writer:
        for path in parquet_files(sources):
            report = ImportReport(source=str(path))
            reports.append(report)
            for rows in decided_rows(path, report, batch_rows):
                if limit is not None:
                    rows = rows[:max(0, limit - written)]
                images, keep = [], []
                for row, winner in rows:
                    try:
                        pair = [load_image(row.image_0, resolution), load_image(row.image_1, resolution)]
                    except (OSError, ValueError) as exc:  # PIL: truncated / not an image
                        report.unreadable_image.append((row.index, f"{type(exc).__name__}: {exc}"))
                        continue
                    images += pair
                    keep.append((row, winner))
                if keep:
                    latents = vae.encode(torch.stack(images))  # [0 of pair 0, 1 of pair 0, 0 of pair 1, ...]
                    latents = latents.view(len(keep), 2, *latents.shape[1:])
                    for i, (row, p) in enumerate(keep):
                        sources_ = (row.source_0, row.source_1)
                        writer.add(latents[i, p], latents[i, 1 - p], row.prompt, target_source=sources_[p],
                                   reference_source=sources_[1 - p], label="pickapic")
                        report.kept.append(row.index)
                    written += len(keep)
                if limit is not None and written >= limit:
                    report.stopped_at_max = True
                    break
            logger.info("%s", report.summary())
            if limit is not None and written >= limit:
                break
    logger.info("imported %d Pick-a-Pic pairs into %s", written, output)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pso-import-pickapic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="Pick-a-Pic .parquet files or folders of them")
    parser.add_argument("--output", required=True, help="new pair dataset folder")
    parser.add_argument("--model", required=True, help="diffusers folder or single-file checkpoint (its VAE)")
    parser.add_argument("--model-config", help="for a single file: local diffusers folder of its family")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--timesteps", default="dmd2", help=f"one of {sorted(FEW_STEP_TIMESTEPS)}")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--limit", type=int, help="stop after this many pairs")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    n = import_pickapic(args.sources, args.output, args.model, model_config=args.model_config,
                        resolution=args.resolution, timesteps=args.timesteps, shard_size=args.shard_size,
                        limit=args.limit, device=args.device)
    print(json.dumps({"pairs": n, "output": args.output}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
