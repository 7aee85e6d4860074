"""Which pairs each optimizer step trains on, read shard by shard and independent of the process count.

The pairs of one or more pair datasets (``docs/pair-dataset-format.md``) are read in ``L`` *lanes*
(``data_lanes``). In epoch ``e`` the shards are shuffled with ``(seed, e)``; lane ``l`` takes shards
``l, l + L, l + 2L, ...`` of that order and walks each shard's pairs in an order shuffled with
``(seed, e, shard)``; a lane starts its next epoch when its shards are used up. Every micro-step takes
``micro_batch / L`` consecutive pairs from every lane, lanes in order: that is the *global* micro-batch,
and a pair's *global position* in it (lane-major) fixes its noise and levels
(:func:`pair_generators`). Process ``r`` of ``W`` works on lanes ``r, r + W, ...`` only, so it opens
only those lanes' shards (a small LRU cache of them: memory does not grow with the dataset), and the
union of what the processes train on is the same global batch for every ``W`` that divides ``L``.

Nothing here depends on how far a previous run got except the step number: a lane's position is
``step * pairs_per_step_per_lane``, so a resumed run (on any number of processes) continues the same
sequence from a checkpoint that records only the step.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..dataset import PairDataset, PairDatasetError
from ..methods import PairBatch, PairGenerators
from ..samplers import Trajectory


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple (e.g. ``(seed, "pair", step, position)``): stable across runs,
    processes and platforms (SHA-256, not Python's salted ``hash``)."""
    text = ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & ((1 << 63) - 1)


def _generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*parts))


def pair_generators(seed: int, step: int, micro: int, positions: Sequence[int]) -> PairGenerators:
    """The randomness of one micro-batch: a generator per pair from ``(seed, step, micro, global
    position)`` and a shared one from ``(seed, step, micro)``, identical on every process."""
    return PairGenerators(shared=_generator(seed, "shared", step, micro),
                          pairs=[_generator(seed, "pair", step, micro, p) for p in positions])


@dataclass(frozen=True)
class ShardRef:
    """One shard of one dataset and the dataset items (indices) stored in it, in manifest order."""

    dataset: int
    file: str
    items: tuple[int, ...]


def dataset_shards(datasets: Sequence[PairDataset]) -> list[ShardRef]:
    """Every non-empty shard of ``datasets``, dataset by dataset, shards in manifest order."""
    out = []
    for d, ds in enumerate(datasets):
        by_shard: dict[str, list[int]] = {s.file: [] for s in ds.shards}
        for i, rec in enumerate(ds.records):
            by_shard[rec.shard].append(i)
        out.extend(ShardRef(d, f, tuple(items)) for f, items in by_shard.items() if items)
    return out


class LanePlan:
    """The infinite, seeded pair sequence of each of ``lanes`` lanes (see the module docstring)."""

    def __init__(self, shards: Sequence[ShardRef], lanes: int, seed: int) -> None:
        if len(shards) < lanes:
            raise PairDatasetError(
                f"the datasets hold {len(shards)} non-empty shards but data_lanes={lanes}: every lane needs "
                f"at least one shard. Set data_lanes <= {len(shards)} (and a process count that divides "
                "it), or write the dataset with a smaller shard_size.")
        self.shards, self.lanes, self.seed = list(shards), lanes, seed
        self._epochs: dict[tuple[int, int], tuple[list[int], list[int]]] = {}

    def _epoch(self, lane: int, epoch: int) -> tuple[list[int], list[int]]:
        """(shard indices of ``lane`` in ``epoch``, cumulative item counts)."""
        key = (lane, epoch)
        if key not in self._epochs:
            gen = _generator(self.seed, "shards", epoch)
            order = torch.randperm(len(self.shards), generator=gen).tolist()
            mine = order[lane::self.lanes]
            cum, total = [], 0
            for s in mine:
                total += len(self.shards[s].items)
                cum.append(total)
            if len(self._epochs) > 4 * self.lanes:
                self._epochs.clear()
            self._epochs[key] = (mine, cum)
        return self._epochs[key]

    def _rows(self, shard: int, epoch: int) -> list[int]:
        n = len(self.shards[shard].items)
        return torch.randperm(n, generator=_generator(self.seed, "rows", epoch, shard)).tolist()

    def take(self, lane: int, start: int, count: int) -> list[tuple[int, int]]:
        """Pairs ``start .. start + count - 1`` of ``lane``'s sequence as ``(dataset, item)``."""
        out: list[tuple[int, int]] = []
        epoch, pos = 0, start
        while True:  # find the epoch that holds ``pos`` (lane positions only grow: a short walk)
            _, cum = self._epoch(lane, epoch)
            if pos < cum[-1]:
                break
            pos -= cum[-1]
            epoch += 1
        rows_cache: dict[int, list[int]] = {}
        while len(out) < count:
            mine, cum = self._epoch(lane, epoch)
            if pos >= cum[-1]:
                epoch, pos = epoch + 1, 0
                rows_cache.clear()
                continue
            k = bisect.bisect_right(cum, pos)
            shard = mine[k]
            offset = pos - (cum[k - 1] if k else 0)
            rows = rows_cache.setdefault(shard, self._rows(shard, epoch))
            ref = self.shards[shard]
            n = min(count - len(out), len(rows) - offset)
            out.extend((ref.dataset, ref.items[r]) for r in rows[offset:offset + n])
            pos += n
        return out


def _cat_trajectories(parts: list[Trajectory]) -> Trajectory:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for t in parts[1:]:
        same = (t.policy == first.policy and torch.equal(t.sigmas, first.sigmas)
                and torch.equal(t.std, first.std))
        if not same:
            raise PairDatasetError(
                "the datasets' trajectories were sampled with different SIGMAS or samplers; full / online "
                "PSO trains one schedule at a time: train on them separately.")
    per_sample = {k: torch.cat([getattr(t, k) for t in parts]) for k in ("latents", "x0", "noise", "mean")}
    return Trajectory(sigmas=first.sigmas, std=first.std, policy=first.policy, **per_sample)


class MicroBatches:
    """This process's share of every micro-batch: ``get(step, micro)`` -> (items, positions).

    ``items`` is a dict as :meth:`pso.dataset.PairDataset.get` returns it (``prompts``, ``target``,
    ``reference``, trajectories...) for the pairs of this process's lanes, lane-major; ``positions``
    are their global positions in the micro-batch.
    """

    def __init__(self, datasets: Sequence[PairDataset], plan: LanePlan, micro_batch: int, grad_accum: int,
                 rank: int, world_size: int) -> None:
        self.datasets, self.plan = list(datasets), plan
        self.per_lane = micro_batch // plan.lanes
        self.grad_accum = grad_accum
        self.my_lanes = list(range(rank, plan.lanes, world_size))

    def get(self, step: int, micro: int) -> tuple[dict[str, Any], list[int]]:
        start = (step * self.grad_accum + micro) * self.per_lane
        picks: list[tuple[int, int]] = []
        positions: list[int] = []
        for lane in self.my_lanes:
            picks += self.plan.take(lane, start, self.per_lane)
            positions += [lane * self.per_lane + i for i in range(self.per_lane)]
        return self._load(picks), positions

    def _load(self, picks: list[tuple[int, int]]) -> dict[str, Any]:
        groups: dict[int, list[int]] = {}
        for pos, (d, _) in enumerate(picks):
            groups.setdefault(d, []).append(pos)
        parts = []
        for d, where in groups.items():
            parts.append((where, self.datasets[d].get([picks[p][1] for p in where])))
        if len(parts) == 1 and parts[0][0] == list(range(len(picks))):
            return parts[0][1]
        order = torch.tensor([p for where, _ in parts for p in where]).argsort()
        merged: dict[str, Any] = {"prompts": [], "indices": []}
        for _, got in parts:
            merged["prompts"] += got["prompts"]
            merged["indices"] += got["indices"]
        merged["prompts"] = [merged["prompts"][i] for i in order.tolist()]
        merged["indices"] = [merged["indices"][i] for i in order.tolist()]
        for key, value in parts[0][1].items():
            if isinstance(value, torch.Tensor):
                merged[key] = torch.cat([got[key] for _, got in parts])[order]
            elif isinstance(value, Trajectory):
                merged[key] = _cat_trajectories([got[key] for _, got in parts]).select(order)
        return merged


def to_batch(items: dict[str, Any], device: torch.device) -> PairBatch:
    """A :class:`PairBatch` on ``device`` whose ``cond`` indexes this batch's encoded prompts."""
    n = len(items["prompts"])
    return PairBatch(target=_to(items.get("target"), device), reference=_to(items.get("reference"), device),
                     target_traj=_to(items.get("target_traj"), device),
                     reference_traj=_to(items.get("reference_traj"), device),
                     cond=torch.arange(n, device=device))


def _to(x, device):
    return None if x is None else x.to(device)
