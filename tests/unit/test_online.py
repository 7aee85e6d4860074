"""pso.online: reward labelling, the round schedule and the online-PSO loop (Eq. 7) without a host."""

from __future__ import annotations

import pytest
import torch

from pso import online
from pso.methods import MethodConfig, make_step_fn
from pso.schedules import DiscreteSchedule, few_step_sigmas
from pso.trainer import TrainConfig, Trainer

MS = DiscreteSchedule()
SIGMAS = few_step_sigmas(MS, "dmd2")  # 999/749/499/249 -> 0


def test_labels_take_the_best_as_target_and_skip_ties_within_the_margin():
    scores = torch.tensor([[1.0, 2.0], [3.0, 3.0], [0.5, 0.45], [0.2, -0.3]])
    labels = online.label_pairs(scores, tie_margin=0.1)
    assert labels.winner.tolist() == [1, 0, 0, 0] and labels.loser.tolist() == [0, 0, 1, 1]
    assert labels.gap.tolist() == pytest.approx([1.0, 0.0, 0.05, 0.5])
    assert labels.kept.tolist() == [True, False, False, True]
    assert labels.kept_count == 2 and labels.skipped_ties == 2
    exact = online.label_pairs(scores, tie_margin=0.0)  # margin 0: only the exact tie is skipped
    assert exact.kept.tolist() == [True, False, True, True] and exact.skipped_ties == 1


def test_labels_pair_the_best_with_the_worst_of_k_samples():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.7, 0.2, 0.2, 0.8]])
    labels = online.label_pairs(scores)
    assert labels.winner.tolist() == [1, 3] and labels.loser.tolist() == [0, 1]
    assert labels.gap.tolist() == pytest.approx([0.8, 0.6])


@pytest.mark.parametrize("scores, match", [(torch.zeros(3), r"\(P, K\) with K >= 2.*\(3,\)"),
                                           (torch.zeros(2, 1), r"K >= 2.*\(2, 1\)"),
                                           (torch.tensor([[0.0, float("nan")]]), "finite")])
def test_bad_scores_are_refused_with_their_shape_or_values(scores, match):
    with pytest.raises(ValueError, match=match):
        online.label_pairs(scores)


def test_rounds_cycle_through_the_prompts_and_clamp_to_the_list():
    assert [online.round_prompt_indices(5, 3, r) for r in range(3)] == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]
    assert online.round_prompt_indices(2, 128, 7) == [0, 1]  # paper's 128, clamped to 2 prompts
    with pytest.raises(ValueError, match="at least one prompt"):
        online.round_prompt_indices(0, 3, 0)


def test_round_seeds_follow_the_documented_formula_and_never_repeat():
    seeds = [online.round_seed(10, r, i, 3) for r in range(4) for i in range(3)]
    assert seeds == list(range(10, 22))
    assert online.round_seed(2**64 - 1, 0, 1, 3) == 0  # wraps like ComfyUI's unsigned 64-bit seeds


@pytest.mark.parametrize("kwargs, match", [({"rounds": 0}, "rounds=0"),
                                           ({"samples_per_prompt": 1}, "samples_per_prompt=1.*two samples"),
                                           ({"tie_margin": -0.5}, "tie_margin=-0.5"),
                                           ({"batch_size": 0}, "batch_size=0"),
                                           ({"steps_per_round": 2.5}, "steps_per_round=2.5")])
def test_config_errors_name_the_bad_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        online.OnlineConfig(**kwargs)


class BiasDenoiser:
    """``x0 = theta + 0.5 * x / sqrt(1 + sigma^2)``: the starting noise reaches the final sample, so
    samples of one prompt differ, and theta shifts every sample's mean."""

    def __init__(self, theta: torch.Tensor):
        self.theta = theta

    def __call__(self, x, sigma, cond):
        return self.theta + 0.5 * x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt()


def _rounds(config, seed=0, **kw):
    def sample_fn(denoiser, prompt, s, count, sigmas=None):
        return online.sample_prompt(denoiser, None, s, count, torch.zeros(1, 2, 4, 4),
                                    SIGMAS if sigmas is None else sigmas, MS, "renoise")

    def score_fn(traj, prompt, round_index, slot):  # "brightness" of the final latent
        return traj.final.mean(dim=(1, 2, 3))

    return online.OnlineRounds(config, 3, seed, sample_fn, score_fn, **kw)


def test_sample_prompt_repeats_under_its_seed_and_samples_differ_within_the_batch():
    den = BiasDenoiser(torch.tensor(0.0))
    a = online.sample_prompt(den, None, 5, 3, torch.zeros(1, 2, 4, 4), SIGMAS, MS, "renoise")
    b = online.sample_prompt(den, None, 5, 3, torch.zeros(1, 2, 4, 4), SIGMAS, MS, "renoise")
    c = online.sample_prompt(den, None, 6, 3, torch.zeros(1, 2, 4, 4), SIGMAS, MS, "renoise")
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, c.latents)
    assert not torch.equal(a.final[0], a.final[1])
    # ComfyUI's RandomNoise: the starting noise is randn of the whole batch from a CPU generator seeded
    # with the seed; with max denoise the latent starts at noise * sqrt(1 + sigma_max^2)
    noise = torch.randn((3, 2, 4, 4), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a.latents[:, 0], noise * (1 + SIGMAS[0] ** 2).sqrt())


def test_each_batch_pairs_a_higher_scored_target_with_its_reference_and_an_epoch_covers_all():
    cfg = online.OnlineConfig(rounds=1, prompts_per_round=3, samples_per_prompt=4, steps_per_round=3,
                              batch_size=1)
    rounds = _rounds(cfg)
    g = torch.Generator().manual_seed(0)
    rounds.refresh(BiasDenoiser(torch.tensor(0.0)), 0, g)
    conds = []
    for step in range(3):
        batch = rounds(step, g)
        t, r = batch.target_traj.final.mean(), batch.reference_traj.final.mean()
        assert t > r
        conds += batch.cond.tolist()
    assert sorted(conds) == [0, 1, 2]  # one epoch serves every prompt's pair once
    h = rounds.history[0]
    assert h["kept_pairs"] == 3 and h["skipped_ties"] == 0 and h["reward_best"] > h["reward_worst"]
    with pytest.raises(RuntimeError, match="step 3 belongs to round 1"):
        rounds(3, g)


def test_a_round_of_ties_stops_with_the_margin_named():
    cfg = online.OnlineConfig(rounds=1, samples_per_prompt=2, tie_margin=100.0)
    with pytest.raises(ValueError, match="tie_margin=100.*Lower tie_margin"):
        _rounds(cfg).refresh(BiasDenoiser(torch.tensor(0.0)), 0, torch.Generator())


def _train_online(seed: int, lr: float = 0.05, rounds: int = 8):
    theta = torch.zeros((), requires_grad=True)
    model, frozen = BiasDenoiser(theta), BiasDenoiser(torch.tensor(0.0))
    cfg = online.OnlineConfig(rounds=rounds, prompts_per_round=3, samples_per_prompt=4, steps_per_round=2,
                              batch_size=3)
    src = _rounds(cfg, seed)
    step_fn = make_step_fn(MethodConfig("pso_online"), model, frozen, SIGMAS, MS)
    tr = Trainer([theta], step_fn, src, TrainConfig(steps=cfg.total_steps, lr=lr, seed=seed,
                                                    ref_refresh_every=cfg.steps_per_round),
                 refresh_fn=lambda step, g: src.refresh(model, step, g))
    result = tr.train()
    src.evaluate(model, rounds)
    return [h["reward_mean"] for h in src.history], result, float(theta.detach())


def test_online_pso_raises_the_reward_of_the_models_samples():
    """Eq. 7 on a one-parameter model: training on best-vs-worst pairs moves theta toward brighter
    samples, so the reward of later rounds' (fresh) samples is higher than the first round's.
    (Seeds 0, 1, 2, 5 and 6 all rise from ~0.0 to ~1.15; one is checked here.)"""
    rewards, result, theta = _train_online(0)
    assert theta > 0, theta
    assert all(b > a for a, b in zip(rewards, rewards[1:], strict=False)), rewards
    assert rewards[-1] > rewards[0] + 0.5, rewards


def test_online_runs_repeat_exactly_under_a_fixed_seed():
    a, ra, ta = _train_online(3, rounds=3)
    b, rb, tb = _train_online(3, rounds=3)
    c, _, _ = _train_online(4, rounds=3)
    assert a == b and ra.loss_history == rb.loss_history and ta == tb
    assert a != c


def test_mixing_alternates_rounds_between_the_full_and_the_sub_schedules():
    two, three = SIGMAS[[0, 2, 4]], SIGMAS[[0, 1, 2, 4]]
    assert [online.round_schedule([], r) for r in range(3)] == [None, None, None]
    picked = [online.round_schedule([two, three], r) for r in range(8)]
    assert [p is None for p in picked] == [True, False] * 4  # even rounds: the run's own N steps
    assert [p.numel() - 1 for p in picked[1::2]] == [2, 3, 2, 3]  # odd rounds: the sub-schedules in turn


def test_a_one_step_sub_schedule_is_refused_for_having_no_transition_to_train():
    with pytest.raises(ValueError, match=r"sub-schedule of 1 step.*no stochastic transition.*>= 2"):
        online.check_sub_schedules([SIGMAS[[0, 4]]])


def test_mixed_rounds_sample_and_train_the_sub_schedules_trajectories():
    """Round 1 of a mixed run samples 2-step trajectories (999 -> 499 -> 0); the pairs it serves are
    those, the loss trains their one stochastic transition, and the history records each round's steps.
    The final evaluation samples with the run's own schedule."""
    cfg = online.OnlineConfig(rounds=2, prompts_per_round=3, samples_per_prompt=2, steps_per_round=1,
                              batch_size=3)
    two = SIGMAS[[0, 2, 4]]
    theta = torch.zeros((), requires_grad=True)
    model, frozen = BiasDenoiser(theta), BiasDenoiser(torch.tensor(0.0))
    src = _rounds(cfg, sub_schedules=[two])
    g = torch.Generator().manual_seed(0)
    step_fn = make_step_fn(MethodConfig("pso_online"), model, frozen, SIGMAS, MS)
    steps_seen = []
    for step in range(2):
        src.refresh(model, step, g)
        batch = src(step, g)
        steps_seen.append(batch.target_traj.sigmas.numel() - 1)
        assert torch.equal(batch.target_traj.sigmas, SIGMAS if step == 0 else two)
        loss = step_fn(batch, g).loss.mean()
        theta.grad = None
        loss.backward()
        assert theta.grad is not None and theta.grad != 0  # the 2-step round trains its one transition
    src.evaluate(model, cfg.rounds)
    assert steps_seen == [4, 2]
    assert [h["steps"] for h in src.history] == [4.0, 2.0, 4.0]
    table = online.history_table(src.history).splitlines()
    assert table[0].split()[-1] == "steps" and [line.split()[-1] for line in table[1:]] == ["4", "2", "4"]


def test_history_table_lists_every_round():
    table = online.history_table([{"round": 0.0, "reward_mean": 0.5, "reward_best": 0.6, "reward_worst": 0.4,
                                   "kept_pairs": 3.0, "skipped_ties": 1.0},
                                  {"round": 1.0, "reward_mean": 0.7, "reward_best": 0.7, "reward_worst": 0.7,
                                   "final": 1.0}])
    lines = table.splitlines()
    assert len(lines) == 3 and lines[1].split()[:2] == ["0", "0.5"] and lines[1].split()[-2:] == ["3", "1"]
    assert lines[2].startswith("1 (final)") and lines[2].split()[-2:] == ["-", "-"]


def test_sharded_rounds_gathered_equal_one_process_rounds():
    """Two 'processes' each sample their slots of a round; gathered, they hold the one-process pairs."""
    cfg = online.OnlineConfig(rounds=1, prompts_per_round=3, samples_per_prompt=4, batch_size=3)
    model = BiasDenoiser(torch.tensor(0.3))
    one = _rounds(cfg)
    one.refresh(model, 0, torch.Generator().manual_seed(5))

    class Captured(Exception):
        pass

    shares: dict[int, list] = {}

    def capture(rank):
        def gather(local):
            shares[rank] = local
            raise Captured
        return gather

    for rank in (0, 1):
        with pytest.raises(Captured):
            _rounds(cfg, shard=(rank, 2), gather=capture(rank)).refresh(model, 0, torch.Generator())
    assert [item[0] for item in shares[0]] == [0, 2] and [item[0] for item in shares[1]] == [1]
    two = _rounds(cfg, shard=(1, 2), gather=lambda local: shares[1] + shares[0])
    two.refresh(model, 0, torch.Generator().manual_seed(5))
    assert torch.equal(two.target_traj.latents, one.target_traj.latents)
    assert torch.equal(two.order, one.order) and torch.equal(two.cond, one.cond)
    with pytest.raises(ValueError, match="more than one process needs a gather function"):
        _rounds(cfg, shard=(0, 2))


def test_a_checkpoint_inside_a_round_keeps_its_pairs_and_one_at_the_boundary_does_not():
    cfg = online.OnlineConfig(rounds=2, prompts_per_round=3, samples_per_prompt=4, steps_per_round=2,
                              batch_size=2)
    model = BiasDenoiser(torch.tensor(0.3))
    src = _rounds(cfg)
    src.refresh(model, 0, torch.Generator().manual_seed(1))
    first = src(0, torch.Generator())
    inside = src.state_dict()
    assert "pairs" in inside and inside["last_step"] == 0
    src(1, torch.Generator())
    assert "pairs" not in src.state_dict(), "after the round's last step the next round is re-sampled"
    restored = _rounds(cfg)
    restored.load_state_dict(inside)
    again = restored(0, torch.Generator())
    assert torch.equal(again.target_traj.latents, first.target_traj.latents)
    assert torch.equal(restored(1, torch.Generator()).cond, src(1, torch.Generator()).cond)
    with pytest.raises(ValueError, match="seed 0 and 3 prompts; this run has seed 9"):
        _rounds(cfg, seed=9).load_state_dict(inside)


def test_online_progress_counts_each_prompt_sampled_and_each_step_once():
    """The progress bar of an online run: a round samples its prompts, then trains its steps; the last
    round is followed by the evaluation's prompts. Every unit is reached once, in order, ending at the
    total."""
    cfg = online.OnlineConfig(rounds=3, prompts_per_round=4, steps_per_round=2, batch_size=1)
    num_prompts = 3  # fewer than prompts_per_round: 3 a round
    seen = []
    for r in range(cfg.rounds):
        seen += [cfg.progress_after_prompt(num_prompts, r, slot) for slot in range(3)]
        seen += [cfg.progress_after_step(num_prompts, r * 2 + j) for j in (1, 2)]
    seen += [cfg.progress_after_prompt(num_prompts, cfg.rounds, slot) for slot in range(3)]
    assert seen == list(range(1, cfg.progress_total(num_prompts) + 1)) and seen[-1] == 3 * 5 + 3

