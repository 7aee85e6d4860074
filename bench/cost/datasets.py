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
    # the reader's own cost per batch; the SHA-256 pass (once per shard and opened dataset, a fixed
    # cost per shard, not per batch) is part of measure_load_all, as PSO Load Pairs runs it
    ds = h.dataset.PairDataset.open(folder, verify=False)
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


def measure_load_all(h: SimpleNamespace, folder: Path, batch: int = 2) -> tuple[float, int]:
    """(seconds, peak memory growth in bytes) of what PSO Load Pairs -> PSO Train does with a dataset
    without trajectories: open it with 4 shards cached, verify every shard's SHA-256, and draw one
    epoch of random batches of ``batch`` pairs through :class:`pso.dataset.LatentColumn` (the node's
    BatchSource indexes the columns the same way). It read the whole dataset into memory before."""
    out = {}

    def run():
        t0 = time.perf_counter()
        ds = h.dataset.PairDataset.open(folder, max_cached_shards=4)
        ds.verify()
        target, reference = h.dataset.LatentColumn(ds, "target"), h.dataset.LatentColumn(ds, "reference")
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
        for start in range(0, len(ds) - batch + 1, batch):
            idx = order[start:start + batch]
            assert target[idx].shape[0] == reference[idx].shape[0] == batch
        out["seconds"] = time.perf_counter() - t0

    peak, _ = peak_bytes(run, "cpu")
    return out["seconds"], peak
