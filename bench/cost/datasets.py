"""Pair-dataset loading: the same reader on a dataset of N pairs and on one of 10 N pairs.

Both datasets are written with :class:`pso.dataset.PairDatasetWriter` (same latent size, same
shard size), then read the way a streaming trainer reads them: :meth:`pso.dataset.PairDataset.get`
of consecutive batches of ``batch`` pairs, which keeps at most two shards in memory; the small
dataset is read 10 epochs, so that both read the same number of batches (and, with more than two
shards, load a shard every ``shard_size / batch`` batches).
Measured per pass: peak resident-set growth (opening the dataset included) and seconds per batch
(opening excluded: it reads the manifest once, O(pairs), and is reported by neither figure).
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import torch

from .memory import peak_bytes


def write_dataset(
    h: SimpleNamespace, folder: Path, pairs: int, latent: int, shard_size: int, seed: int = 0
) -> Path:
    """``pairs`` random (4, latent, latent) target / reference pairs in shards of ``shard_size``."""
    ds = h.dataset
    fp = ds.DatasetFingerprint(
        model_family="sd15",
        latent_channels=4,
        latent_height=latent,
        latent_width=latent,
        latent_format="SD15",
        sigmas=(14.6, 4.0, 1.5, 0.5, 0.0),
        sampler="lcm",
    )
    g = torch.Generator().manual_seed(seed)
    with ds.PairDatasetWriter(folder, fp, shard_size=shard_size, manifest_every=10**6) as writer:
        for start in range(0, pairs, shard_size):
            k = min(shard_size, pairs - start)
            t = torch.randn(k, 4, latent, latent, generator=g)
            r = torch.randn(k, 4, latent, latent, generator=g)
            writer.add_batch(t, r, [f"prompt {start + i}" for i in range(k)])
    return folder


def stream_batches(h: SimpleNamespace, folder: Path, batch: int, epochs: int = 1) -> tuple[int, float]:
    """Open the dataset and read ``epochs`` epochs of consecutive batches; (batches, seconds of the
    batches, opening excluded)."""
    ds = h.dataset.PairDataset.open(folder)
    t0 = time.perf_counter()
    n = len(ds)
    batches = 0
    for _ in range(epochs):
        for start in range(0, n - batch + 1, batch):
            pb = ds.pair_batch(list(range(start, start + batch)))
            assert pb.target.shape[0] == batch
            batches += 1
    return batches, time.perf_counter() - t0


def measure(h: SimpleNamespace, folder: Path, batch: int, epochs: int = 1, passes: int = 3
            ) -> tuple[float, int]:
    """(seconds per batch, peak memory growth in bytes) of ``epochs`` streaming epochs.

    Time: the fastest of ``passes`` passes (a pass takes ~0.1 s: a pause from another process would
    otherwise decide it). Memory: the first pass's (the host's RAM: the reader is CPU-side whatever
    the training device).
    """
    out = {}

    def run():
        out["batches"], out["seconds"] = stream_batches(h, folder, batch, epochs)

    peak, _ = peak_bytes(run, "cpu")
    best = out["seconds"]
    for _ in range(passes - 1):
        best = min(best, stream_batches(h, folder, batch, epochs)[1])
    return best / out["batches"], peak


def measure_load_all(h: SimpleNamespace, folder: Path) -> tuple[float, int]:
    """(seconds, peak memory growth in bytes) of reading every pair at once, as the Load Pair Dataset
    node does (``ds.get(range(len(ds)))``) to hand the in-memory trainer one PairSet."""
    out = {}

    def run():
        t0 = time.perf_counter()
        ds = h.dataset.PairDataset.open(folder)
        items = ds.get(list(range(len(ds))))
        out["seconds"] = time.perf_counter() - t0
        del items

    peak, _ = peak_bytes(run, "cpu")
    return out["seconds"], peak
