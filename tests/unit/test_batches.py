"""pso.batches: pair batches whose references are at most ``max_age`` steps old when trained on."""

from __future__ import annotations

import pytest
import torch

from pso.batches import PairBatchSource
from pso.references import ReferencePool
from pso.schedules import DiscreteSchedule, few_step_sigmas

MS = DiscreteSchedule()
SIGMAS = few_step_sigmas(MS, "dmd2")


class VersionedDenoiser:
    """x0 = the current "model version" + the row's cond / 100: a reference's value says which model
    version sampled it (the renoise sampler returns the last x0)."""

    def __init__(self):
        self.version = 0.0
        self.calls = 0

    def __call__(self, x, sigma, cond):
        self.calls += x.shape[0]
        return torch.full_like(x, self.version) + cond.view(-1, 1, 1, 1).to(x) / 100


def make_source(p=6, batch=2, accum=1, max_age=1, traj=False):
    pool = ReferencePool(torch.full((p, 1, 2, 2), -1.0), torch.arange(p), SIGMAS, "renoise", MS, chunk_size=4)
    targets = torch.arange(p, dtype=torch.float32).view(p, 1, 1, 1).expand(p, 1, 2, 2).clone()
    return PairBatchSource(pool, targets, batch, accum, max_age=max_age, needs_traj=traj), pool


def test_max_age_one_trains_every_pair_against_the_current_models_sample():
    src, pool = make_source()
    den, gen = VersionedDenoiser(), torch.Generator().manual_seed(0)
    for step in range(1, 5):  # step 0 uses the given references (the starting model's, age 0)
        den.version = float(step)
        src.prepare(den, step, gen)
        batch = src(step, gen)
        # every reference of the step was sampled by this step's model, for its own row's prompt
        expected = float(step) + batch.cond.view(-1, 1, 1, 1).float() / 100
        assert torch.allclose(batch.reference, expected.expand_as(batch.reference))
        # pair i keeps target i and prompt i
        assert torch.equal(batch.target[:, 0, 0, 0], batch.cond.float())
    # one few-step sampling of the batch per step, nothing else
    assert den.calls == 4 * 2 * (SIGMAS.numel() - 1) and src.resampled == 8


def test_references_younger_than_max_age_are_reused_not_resampled():
    src, pool = make_source(p=2, batch=2, max_age=3)
    den, gen = VersionedDenoiser(), torch.Generator().manual_seed(0)
    seen = []
    for step in range(7):
        den.version = float(step)
        src.prepare(den, step, gen)
        seen.append(float(src(step, gen).reference.max().floor()))
    # born at 0 (given, value -1), re-sampled at step 3 (age 3) and step 6
    assert seen == [-1.0, -1.0, -1.0, 3.0, 3.0, 3.0, 6.0]
    assert pool.born.tolist() == [6, 6]


def test_grad_accumulation_prepares_every_micro_batch_of_the_step():
    src, pool = make_source(p=8, batch=2, accum=3)
    den, gen = VersionedDenoiser(), torch.Generator().manual_seed(1)
    den.version = 5.0
    src.prepare(den, 1, gen)
    refs = [src(1, gen).reference for _ in range(3)]
    assert all(bool((r.floor() == 5.0).all()) for r in refs)
    with pytest.raises(RuntimeError, match="prepare\\(\\) must run before step 1"):
        src(1, gen)


def test_same_seed_same_batches_and_references_and_pool_state_resumes():
    def run(seed, steps=3):
        src, pool = make_source(p=5, batch=3)
        den, gen = VersionedDenoiser(), torch.Generator().manual_seed(seed)
        out = []
        for step in range(steps):
            den.version = float(step)
            src.prepare(den, step, gen)
            out.append(src(step, gen).cond)
        return out, pool

    a, pa = run(0)
    b, _ = run(0)
    c, _ = run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    restored = ReferencePool(torch.zeros(5, 1, 2, 2), torch.arange(5), SIGMAS, "renoise", MS)
    restored.load_state_dict(pa.state_dict())
    assert torch.equal(restored.born, pa.born) and torch.equal(restored.reference, pa.reference)


def test_trajectories_of_resampled_rows_replace_only_those_rows():
    src, pool = make_source(p=4, batch=2, traj=True)
    den, gen = VersionedDenoiser(), torch.Generator().manual_seed(0)
    pool.refresh(den, gen)  # version 0 everywhere, with trajectories
    before = pool.trajectory.x0.clone()
    den.version = 2.0
    src.prepare(den, 1, gen)
    batch = src(1, gen)
    rows = batch.cond
    assert torch.allclose(batch.reference_traj.final, batch.reference)
    others = torch.tensor([i for i in range(4) if i not in rows.tolist()])
    assert torch.equal(pool.trajectory.x0[others], before[others])
    assert bool((pool.trajectory.x0[rows].floor() == 2.0).all())


def test_refusals_name_the_bad_values():
    pool = ReferencePool(torch.zeros(3, 1, 2, 2), torch.arange(3), SIGMAS, "renoise", MS)
    with pytest.raises(ValueError, match="batch_size=0"):
        PairBatchSource(pool, torch.zeros(3, 1, 2, 2), 0)
    with pytest.raises(ValueError, match="2 targets for 3 references"):
        PairBatchSource(pool, torch.zeros(2, 1, 2, 2), 1)


def test_step_count_mixing_samples_the_steps_references_with_its_schedule():
    """Half of the steps use a sub-schedule: every reference of such a step is sampled with it (even a
    reference of age 0) and the batch carries the schedule; the other steps carry none."""
    from pso.schedules import sub_schedule

    one, two = sub_schedule(SIGMAS, 1), sub_schedule(SIGMAS, 2)
    pool = ReferencePool(torch.full((6, 1, 2, 2), -1.0), torch.arange(6), SIGMAS, "renoise", MS)
    src = PairBatchSource(pool, torch.zeros(6, 1, 2, 2), 3, max_age=1, sub_schedules=[one, two])
    den, gen = VersionedDenoiser(), torch.Generator().manual_seed(3)
    seen = []
    for step in range(40):
        den.calls = 0
        src.prepare(den, step, gen)
        batch = src(step, gen)
        n = None if batch.sigmas is None else batch.sigmas.numel() - 1
        seen.append(n)
        if n is not None:
            assert den.calls == 3 * n  # all 3 rows re-sampled with n steps, at step 0 too
            assert torch.equal(batch.sigmas, one if n == 1 else two)
    assert 12 <= seen.count(None) <= 28 and seen.count(1) >= 5 and seen.count(2) >= 5
    with pytest.raises(ValueError, match="needs max_age=1 \\(got 3\\)"):
        PairBatchSource(pool, torch.zeros(6, 1, 2, 2), 3, max_age=3, sub_schedules=[one])
