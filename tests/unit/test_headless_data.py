"""Data-parallel determinism without the process count: per-pair generators (pso.methods) and the data
lanes of the headless trainer (pso.headless.data)."""

from __future__ import annotations

import pytest
import torch

from pso.dataset import DatasetFingerprint, PairDataset, PairDatasetError, PairDatasetWriter
from pso.headless.data import LanePlan, MicroBatches, dataset_shards, pair_generators
from pso.methods import MethodConfig, PairBatch, compute_method_loss
from pso.samplers import sample_trajectory
from pso.schedules import DiscreteSchedule, few_step_sigmas

MS = DiscreteSchedule()
SIGMAS = few_step_sigmas(MS, "dmd2")


def _model(scale):
    w = torch.tensor(scale)

    def den(x, sigma, cond):
        return x * w + 0.1 * cond.view(-1, 1, 1, 1).float()

    return den


def _batch(b=6, seed=0, traj=False):
    g = torch.Generator().manual_seed(seed)
    batch = PairBatch(target=torch.randn(b, 2, 3, 3, generator=g),
                      reference=torch.randn(b, 2, 3, 3, generator=g), cond=torch.arange(b))
    if traj:
        x = torch.randn(b, 2, 3, 3, generator=g) * float(SIGMAS[0])
        batch.reference_traj = sample_trajectory(_model(0.4), x, SIGMAS, batch.cond, MS, "renoise", g)
    return batch


def _half(batch: PairBatch, idx: slice) -> PairBatch:
    traj = None if batch.reference_traj is None else batch.reference_traj.select(idx)
    return PairBatch(target=batch.target[idx], reference=batch.reference[idx], cond=batch.cond[idx],
                     reference_traj=traj)


@pytest.mark.parametrize(("loss", "transitions"), [("pso_offline", "all"), ("pso_offline", "one"),
                                                   ("diffusion_dpo", "all"), ("pso_full", "one")])
def test_per_pair_generators_make_a_split_batch_equal_the_whole(loss, transitions):
    batch = _batch(traj=loss == "pso_full")
    cfg = MethodConfig(loss, transitions=transitions)
    model, frozen = _model(0.5), _model(0.45)
    whole = compute_method_loss(cfg, batch, model, frozen, SIGMAS, MS, pair_generators(7, 3, 1, range(6)))
    parts = [compute_method_loss(cfg, _half(batch, s), model, frozen, SIGMAS, MS,
                                 pair_generators(7, 3, 1, range(6)[s])) for s in (slice(0, 4), slice(4, 6))]
    split = torch.cat([p.loss for p in parts])
    assert torch.allclose(whole.loss, split, rtol=1e-6, atol=1e-7), (whole.loss, split)
    # ... and a plain generator (one stream for the batch) does not have this property
    plain = compute_method_loss(cfg, _half(batch, slice(4, 6)), model, frozen, SIGMAS, MS,
                                torch.Generator().manual_seed(0))
    other_step = compute_method_loss(cfg, batch, model, frozen, SIGMAS, MS,
                                     pair_generators(7, 4, 1, range(6)))
    if loss != "pso_full":  # Eq. 5 draws only the shared level; the reference is a recorded trajectory
        assert not torch.allclose(plain.loss, whole.loss[4:])
        assert not torch.allclose(other_step.loss, whole.loss)


def test_a_pair_generator_list_must_match_the_batch():
    with pytest.raises(ValueError, match="3 pair generators for a batch of 6"):
        compute_method_loss(MethodConfig("pso_offline"), _batch(), _model(0.5), _model(0.5), SIGMAS, MS,
                            pair_generators(0, 0, 0, range(3)))


def _dataset(folder, n=22, shard_size=3):
    fp = DatasetFingerprint("SD15", 1, 2, 2, "SD15", SIGMAS, "lcm")
    with PairDatasetWriter(folder, fp, shard_size=shard_size) as w:
        for i in range(n):
            w.add(torch.full((1, 2, 2), float(i)), torch.full((1, 2, 2), -float(i)), f"p{i}")
    return folder


def _lanes_of(ds, plan, lanes):
    return {plan.shards[s].file for lane in lanes for epoch in range(3) for s in plan._epoch(lane, epoch)[0]}


def test_two_processes_read_the_same_global_batches_as_one_from_their_own_shards(tmp_path):
    folder = _dataset(tmp_path / "d")
    lanes, micro, accum = 4, 8, 2
    single = PairDataset.open(folder)
    plan = LanePlan(dataset_shards([single]), lanes, seed=5)
    one = MicroBatches([single], plan, micro, accum, rank=0, world_size=1)
    ranks = [PairDataset.open(folder, max_cached_shards=3) for _ in range(2)]
    two = [MicroBatches([ranks[r]], LanePlan(dataset_shards([ranks[r]]), lanes, 5), micro, accum, r, 2)
           for r in range(2)]
    seen = []
    for step in range(6):  # 6 steps x 2 micro x 2 pairs per lane: every lane wraps its epoch
        for m in range(accum):
            items, pos = one.get(step, m)
            parts = [b.get(step, m) for b in two]
            merged = sorted((p, i) for it, ps in parts for p, i in zip(ps, it["indices"], strict=True))
            assert merged == sorted(zip(pos, items["indices"], strict=True))
            assert sorted(pos) == list(range(micro))
            seen += items["indices"]
    assert set(seen) == set(range(22))  # every pair is trained on
    for r in range(2):  # each process opened only its own lanes' shards, and holds at most 3 of them
        assert set(ranks[r].cached_shards) <= _lanes_of(ranks[r], two[r].plan, two[r].my_lanes)
        assert len(ranks[r].cached_shards) <= 3
    assert ranks[0].shard_loads + ranks[1].shard_loads <= single.shard_loads + 2 * lanes


def test_the_sequence_depends_on_the_seed_and_refuses_more_lanes_than_shards(tmp_path):
    ds = PairDataset.open(_dataset(tmp_path / "d"))
    a = LanePlan(dataset_shards([ds]), 2, seed=1).take(0, 0, 10)
    assert a == LanePlan(dataset_shards([ds]), 2, seed=1).take(0, 0, 10)
    assert a != LanePlan(dataset_shards([ds]), 2, seed=2).take(0, 0, 10)
    assert LanePlan(dataset_shards([ds]), 2, seed=1).take(0, 4, 6) == a[4:]  # random access = streaming
    with pytest.raises(PairDatasetError, match="8 non-empty shards but data_lanes=9"):
        LanePlan(dataset_shards([ds]), 9, seed=1)


def test_a_new_run_refuses_a_folder_with_another_runs_checkpoints(tmp_path):
    from pso import io as pso_io
    from pso_train.config import refuse_existing_checkpoints

    refuse_existing_checkpoints(tmp_path / "missing")  # nothing there: a new run may start
    step = tmp_path / "step_000004"
    step.mkdir()
    refuse_existing_checkpoints(tmp_path)  # an incomplete folder is not a checkpoint
    for name in (pso_io.ADAPTER_FILE, pso_io.STATE_FILE, pso_io.META_FILE):
        (step / name).write_bytes(b"x")
    with pytest.raises(pso_io.CheckpointError, match=r"already holds checkpoints \(\['step_000004'\]\); set "
                                                      r"resume_from = '.*' to continue"):
        refuse_existing_checkpoints(tmp_path)
