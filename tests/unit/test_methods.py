"""pso.methods: pairs become loss inputs with shared noise and levels, as the equations say."""

from __future__ import annotations

import math

import pytest
import torch

from pso import losses
from pso.methods import (
    MethodConfig,
    PairBatch,
    compute_method_loss,
    required_fields,
    training_levels,
)
from pso.samplers import sample_trajectory
from pso.schedules import DiscreteSchedule, add_noise, few_step_sigmas, noise_from_x0, parameterization

MS = DiscreteSchedule()
SIGMAS = few_step_sigmas(MS, "dmd2")  # 999/749/499/249 -> 0


class Recorder:
    """A denoiser x0 = scale * x that records every call."""

    def __init__(self, scale: float):
        self.scale = scale
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, sigma, cond):
        self.calls.append((x.detach().clone(), sigma.detach().clone()))
        return x * self.scale


def _pairs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    target, reference = torch.randn(b, 2, 3, 3, generator=g), torch.randn(b, 2, 3, 3, generator=g)
    return PairBatch(target=target, reference=reference, cond=torch.arange(b))


def test_training_levels_leave_out_the_deterministic_last_step():
    assert torch.equal(training_levels(SIGMAS), SIGMAS[:3])  # t = 999, 749, 499 (paper: n = 2..N)
    with pytest.raises(ValueError, match="at least 2 steps"):
        training_levels(few_step_sigmas(MS, "turbo_1"))


@pytest.mark.parametrize("transitions", ["all", "one"])
def test_offline_pairs_share_noise_and_levels(transitions):
    batch = _pairs()
    rec = Recorder(0.5)
    compute_method_loss(MethodConfig("pso_offline", transitions=transitions), batch, rec, rec, SIGMAS, MS,
                        torch.Generator().manual_seed(1))
    x, sigma = rec.calls[1]  # the model's call (after the frozen one): target rows first, then reference rows
    half = x.shape[0] // 2
    t = half // 3
    clean = torch.cat([batch.target.repeat(t, 1, 1, 1), batch.reference.repeat(t, 1, 1, 1)])
    noise = (x - clean) / sigma.view(-1, 1, 1, 1)
    assert torch.allclose(noise[:half], noise[half:], atol=1e-5), "target and reference must share noise"
    assert torch.equal(sigma[:half], sigma[half:]), "target and reference must share levels"
    assert set(sigma.tolist()) <= set(SIGMAS[:3].tolist())
    if transitions == "all":
        assert sorted(set(sigma.tolist())) == sorted(SIGMAS[:3].tolist())
    # the frozen model saw exactly the same inputs
    assert torch.equal(rec.calls[0][0], x) and torch.equal(rec.calls[0][1], sigma)


@pytest.mark.parametrize("loss", ["pso_offline", "pso_dreambooth", "diffusion_dpo"])
def test_identical_model_and_frozen_give_log_two(loss):
    den = Recorder(0.7)
    out = compute_method_loss(MethodConfig(loss), _pairs(), den, den, SIGMAS, MS,
                              torch.Generator().manual_seed(0))
    assert torch.allclose(out.loss, torch.full((3,), math.log(2.0)), atol=1e-6)


def test_offline_loss_equals_an_independent_computation():
    """Re-derive Eq. 6 by hand for x0 = a x (model) and x0 = b x (frozen) with the same noise draws."""
    batch, a, b, beta = _pairs(b=2, seed=3), 0.6, 0.8, 7.0
    out = compute_method_loss(MethodConfig("pso_offline", beta=beta), batch, Recorder(a), Recorder(b),
                              SIGMAS, MS, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    levels = SIGMAS[:3]
    noise = torch.randn((3 * 2, 2, 3, 3), generator=g)  # level-major, shared by the pair
    logit = torch.zeros(2)
    for li, s in enumerate(levels):
        for i in range(2):
            n = noise[li * 2 + i]

            def err(x0_clean, k, n=n, s=s):
                x = x0_clean + s * n
                return ((x - k * x) / s - n).square().mean()

            mt, ft = err(batch.target[i], a), err(batch.target[i], b)
            mr, fr = err(batch.reference[i], a), err(batch.reference[i], b)
            logit[i] += -beta * ((mt - ft) - (mr - fr))
    assert torch.allclose(out.logits, logit, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out.loss, -torch.nn.functional.logsigmoid(logit), rtol=1e-5, atol=1e-6)


def test_full_pso_scores_the_reference_trajectory_at_the_target_levels():
    batch = _pairs(b=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 3, 3, generator=g) * float(SIGMAS[0])
    batch.reference_traj = sample_trajectory(Recorder(0.5), x, SIGMAS, None, MS, "renoise", g)
    model, frozen = Recorder(0.5), Recorder(0.5)
    out = compute_method_loss(MethodConfig("pso_full"), batch, model, frozen, SIGMAS, MS, g)
    assert torch.allclose(out.loss, torch.full((2,), math.log(2.0)), atol=1e-6)
    scored = sorted({float(c[1][0]) for c in model.calls[1:]})
    assert scored == sorted(SIGMAS[:3].tolist())
    other = sample_trajectory(Recorder(0.5), x, few_step_sigmas(MS, "turbo_4"), None, MS, "renoise", g)
    batch.reference_traj = other
    with pytest.raises(ValueError, match="same SIGMAS as training"):
        compute_method_loss(MethodConfig("pso_full"), batch, model, frozen, SIGMAS, MS, g)


def test_full_pso_refuses_a_deterministic_reference_sampler():
    batch = _pairs(b=1)
    x = torch.randn(1, 2, 3, 3) * float(SIGMAS[0])
    batch.reference_traj = sample_trajectory(Recorder(0.5), x, SIGMAS, None, MS, "euler", None)
    with pytest.raises(ValueError, match="Offline PSO \\(Eq. 6\\)"):
        compute_method_loss(MethodConfig("pso_full"), batch, Recorder(0.5), Recorder(0.5), SIGMAS, MS, None)


def test_missing_pair_fields_are_named():
    assert required_fields("pso_online") == ("target_traj", "reference_traj")
    assert required_fields("sft") == ("target",)
    with pytest.raises(ValueError, match="reference_traj"):
        compute_method_loss(MethodConfig("pso_full"), _pairs(), Recorder(1), Recorder(1), SIGMAS, MS, None)


def test_gradient_step_raises_target_likelihood_relative_to_reference():
    """One SGD step on a scalar-parameter denoiser lowers (target error - reference error)."""
    theta = torch.tensor(0.3, requires_grad=True)
    frozen = Recorder(0.3)

    def model(x, sigma, cond):
        return x * theta

    reference = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(2)) * 3
    batch = PairBatch(target=torch.zeros(4, 1, 2, 2), reference=reference)

    def gap():
        with torch.no_grad():
            out = compute_method_loss(MethodConfig("pso_offline", beta=1.0), batch, model, frozen, SIGMAS, MS,
                                      torch.Generator().manual_seed(9))
        return out.metrics["model_err_target"] - out.metrics["model_err_ref"]

    before = gap()
    out = compute_method_loss(MethodConfig("pso_offline", beta=1.0), batch, model, frozen, SIGMAS, MS,
                              torch.Generator().manual_seed(9))
    out.loss.mean().backward()
    with torch.no_grad():
        theta -= 0.05 * theta.grad
    assert gap() < before


def test_config_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="pso_offline"):
        MethodConfig("no_such_loss")
    with pytest.raises(ValueError, match="-1"):
        MethodConfig("pso_offline", beta=-1.0)
    with pytest.raises(ValueError, match="'some'"):
        MethodConfig("pso_offline", transitions="some")
    assert set(losses.LOSSES) >= {"pso_offline", "pso_full", "pso_online", "sft"}


def test_levels_option_moves_sft_onto_the_few_step_levels():
    rec = Recorder(0.5)
    batch = _pairs()
    compute_method_loss(MethodConfig("sft"), batch, rec, None, SIGMAS, MS, torch.Generator().manual_seed(0))
    continuous = set(rec.calls[0][1].tolist())
    assert not continuous <= set(SIGMAS[:3].tolist())  # default: continuous levels
    rec.calls.clear()
    compute_method_loss(MethodConfig("sft", levels="few_step"), batch, rec, None, SIGMAS, MS,
                        torch.Generator().manual_seed(0))
    assert sorted(set(rec.calls[0][1].tolist())) == sorted(SIGMAS[:3].tolist())
    with pytest.raises(ValueError, match="does not apply"):
        MethodConfig("pso_full", levels="continuous")
    with pytest.raises(ValueError, match="'sometimes'"):
        MethodConfig("sft", levels="sometimes")


def _offline(cfg: MethodConfig, batch: PairBatch, scale=0.6, frozen=0.7, seed=4):
    model, froz = Recorder(scale), Recorder(frozen)
    out = compute_method_loss(cfg, batch, model, froz, SIGMAS, MS, torch.Generator().manual_seed(seed))
    return out, model


def test_target_anchor_adds_the_targets_diffusion_loss_and_keeps_the_logits():
    batch = _pairs(b=2, seed=5)
    plain, rec = _offline(MethodConfig("pso_offline", beta=10.0), batch)
    anchored, _ = _offline(MethodConfig("pso_offline", beta=10.0, target_sft_weight=2.0), batch)
    half, _ = _offline(MethodConfig("pso_offline", beta=10.0, target_sft_weight=1.0), batch)
    assert torch.equal(anchored.logits, plain.logits)
    # the anchor is w x the model's mean eps error on the targets over the pair's levels: positive,
    # linear in w, and the same noise and levels give the same error for every w
    diff = anchored.loss - plain.loss
    assert bool((diff > 0).all())
    assert torch.allclose(diff, 2.0 * (half.loss - plain.loss), rtol=1e-5)
    assert anchored.metrics["pairwise_loss"] == pytest.approx(plain.metrics["loss"])
    assert anchored.metrics["loss"] == pytest.approx(float(anchored.loss.mean()))
    # gradient: with weight w the target error's gradient grows by w / T per level (T = 3)
    x = torch.zeros(1, requires_grad=True)
    m_t = torch.stack([x * 0 + 1.0, x * 0 + 2.0, x + 3.0], dim=1)
    out = losses.LossOutput(torch.zeros(1), torch.zeros(1), {"loss": 0.0})
    from pso.methods import add_target_anchor
    add_target_anchor(out, m_t, 3.0).loss.sum().backward()
    assert x.grad.item() == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["final", "continuous"])
def test_anchor_levels_add_one_target_level_to_the_anchor_only(kind):
    """anchor_levels='final' also anchors the targets at the last step's input level (t = 249 of 999/749/
    499/249), which the pairwise loss never trains; 'continuous' at one level per pair drawn as SFT draws
    them. One extra model call on the targets alone; the logits (the pairwise part) are unchanged, and the
    anchor becomes the mean error over the pair's three levels and the extra one."""
    batch = _pairs(b=2, seed=5)
    plain, _ = _offline(MethodConfig("pso_offline", beta=10.0, target_sft_weight=1.0), batch)
    cfg = MethodConfig("pso_offline", beta=10.0, target_sft_weight=1.0, anchor_levels=kind)
    out, rec = _offline(cfg, batch)
    assert len(rec.calls) == 2  # the pairs' batched call, then the anchor's extra level
    assert torch.equal(out.logits, plain.logits)
    x, sigma = rec.calls[1]
    assert x.shape[0] == 2
    if kind == "final":
        assert torch.equal(sigma, SIGMAS[3].expand(2))
    else:
        assert not set(sigma.tolist()) <= set(SIGMAS[:4].tolist())
    # the anchor is the mean over 4 levels now: recover the extra level's error from the two losses
    param = parameterization(MS)
    clean_scale = add_noise(batch.target, torch.zeros_like(batch.target), sigma, param)  # x at zero noise
    noise = (x - clean_scale) / (add_noise(torch.zeros_like(x), torch.ones_like(x), sigma, param))
    extra_err = ((noise_from_x0(x, 0.6 * x, sigma, param) - noise) ** 2).flatten(1).mean(1)
    pair_anchor = plain.loss - _pairwise(plain)
    assert torch.allclose(out.loss - _pairwise(out), (3 * pair_anchor + extra_err) / 4, rtol=1e-4)
    with pytest.raises(ValueError, match="anchor_levels must be one of"):
        MethodConfig("pso_offline", anchor_levels="last")


def _pairwise(out) -> torch.Tensor:
    """The per-pair pairwise loss of an anchored output (Eq. 6 with the logits it reports)."""
    return -torch.nn.functional.logsigmoid(out.logits)


def test_target_anchor_and_error_space_refusals_name_the_value():
    with pytest.raises(ValueError, match="target_sft_weight must be a finite number >= 0, got -1"):
        MethodConfig("pso_offline", target_sft_weight=-1.0)
    with pytest.raises(ValueError, match="loss 'sft' has none"):
        MethodConfig("sft", target_sft_weight=1.0)
    with pytest.raises(ValueError, match="loss 'pso_online' has none"):
        MethodConfig("pso_online", target_sft_weight=1.0)
    with pytest.raises(ValueError, match="error_space must be one of"):
        MethodConfig("pso_offline", error_space="v")
    with pytest.raises(ValueError, match="levels='few_step_final' does not apply"):
        MethodConfig("pso_full", levels="few_step_final")


def test_a_batch_with_a_sub_schedule_trains_at_that_schedules_levels():
    from pso.methods import batch_levels
    from pso.schedules import sub_schedule

    one, two = sub_schedule(SIGMAS, 1), sub_schedule(SIGMAS, 2)
    assert torch.equal(batch_levels(one), SIGMAS[:1])  # the 1-step schedule's only level, t = 999
    assert torch.equal(batch_levels(two), SIGMAS[:1])  # 999 -> 499 -> 0: the stochastic transition at 999
    assert torch.equal(batch_levels(SIGMAS), SIGMAS[:3])
    for sub, want in ((one, SIGMAS[:1]), (two, SIGMAS[:1])):
        batch = _pairs(b=2)
        batch.sigmas = sub
        _, rec = _offline(MethodConfig("pso_offline"), batch)
        assert sorted(set(rec.calls[0][1].tolist())) == want.tolist()
    batch = _pairs(b=2)
    batch.sigmas = two
    _, rec = _offline(MethodConfig("pso_offline", levels="few_step_final"), batch)
    assert sorted(set(rec.calls[0][1].tolist())) == sorted([float(two[0]), float(two[1])])


def test_error_space_x0_compares_clean_latents():
    """eps = (x - x0) / sigma, so an x0 error is sigma^2 times the eps error of the same prediction."""
    from pso.methods import forward_noised_errors

    g = torch.Generator().manual_seed(2)
    clean, noise = torch.randn(3, 2, 3, 3, generator=g), torch.randn(3, 2, 3, 3, generator=g)
    sigma = SIGMAS[:3].clone()
    den = Recorder(0.6)
    eps = forward_noised_errors(den, clean, noise, sigma, None, MS, "eps")
    x0 = forward_noised_errors(den, clean, noise, sigma, None, MS, "x0")
    assert torch.allclose(x0, eps * sigma.square(), rtol=1e-4)
    batch = _pairs(b=2)
    out_x0, _ = _offline(MethodConfig("pso_offline", error_space="x0"), batch)
    out_default, _ = _offline(MethodConfig("pso_offline"), batch)
    out_eps, _ = _offline(MethodConfig("pso_offline", error_space="eps"), batch)
    assert torch.equal(out_default.loss, out_eps.loss) and not torch.equal(out_x0.loss, out_eps.loss)


def test_pair_generators_draw_each_pair_alike_however_the_batch_is_split():
    """draws() serves one stream (a torch.Generator) or one generator per pair (PairGenerators): a pair's
    noise, level index and continuous level are the same in a batch of 3 and alone."""
    from pso.methods import OneStream, PairGenerators, draws

    def gens(seeds):
        pairs = [torch.Generator().manual_seed(s) for s in seeds]
        return PairGenerators(torch.Generator().manual_seed(9), pairs)

    whole, alone = draws(gens([1, 2, 3])), draws(gens([2]))
    noise = whole.randn_level_major(2, 3, (4,)).reshape(2, 3, 4)
    assert torch.equal(noise[:, 1], alone.randn_level_major(2, 1, (4,)))
    assert draws(gens([1, 2, 3])).level_indices(5, 3)[1] == draws(gens([2])).level_indices(5, 1)[0]
    assert draws(gens([1, 2, 3])).uniform(3)[1] == draws(gens([2])).uniform(1)[0]
    one = draws(torch.Generator().manual_seed(4))
    assert isinstance(one, OneStream) and draws(one) is one
    expected = torch.randn(6, 4, generator=torch.Generator().manual_seed(4))
    assert torch.equal(one.randn_level_major(2, 3, (4,)), expected)
    with pytest.raises(ValueError, match="holds 1 pair generators for a batch of 3 pairs"):
        alone.uniform(3)


def test_method_config_is_where_loss_settings_are_checked_and_defaults_resolved():
    """One rule for beta (a finite number > 0, as every loss function requires) and one place where
    None becomes the loss's default beta."""
    for bad in (float("inf"), 0.0, -1.0, True):
        with pytest.raises(ValueError, match=f"beta must be a finite number > 0, got {bad!r}"):
            MethodConfig("pso_offline", beta=bad)
    with pytest.raises(ValueError, match=r"reduction 'sum' is unknown; choose one of \['per_transition'"):
        MethodConfig("pso_offline", reduction="sum")
    assert MethodConfig("pso_offline").resolved_beta == 50.0 == losses.LOSSES["pso_offline"].default_beta
    assert MethodConfig("pso_online_clipped", beta=7.0).resolved_beta == 7.0
    assert MethodConfig("sft").resolved_beta is None


@pytest.mark.parametrize("kind", ["final", "continuous"])
def test_anchor_levels_train_on_sigmas_made_in_inference_mode(kind):
    """ComfyUI builds SIGMAS under inference mode; the anchor's extra level must not be a view of them
    (a view of an inference tensor cannot be saved for backward: the first CI run of 'final' failed so
    in every node test whose pairs carried the host's SIGMAS)."""
    with torch.inference_mode():
        sigmas = few_step_sigmas(MS, "dmd2").clone()
    weight = torch.nn.Parameter(torch.tensor(0.6))

    def model(x, sigma, cond):
        return x * weight

    cfg = MethodConfig("pso_offline", beta=10.0, target_sft_weight=1.0, anchor_levels=kind)
    out = compute_method_loss(cfg, _pairs(b=2, seed=5), model, Recorder(0.7), sigmas, MS,
                              torch.Generator().manual_seed(4))
    out.loss.sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad)


def _online_batch(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * b, 2, 3, 3, generator=g) * float(SIGMAS[0])
    trajs = sample_trajectory(Recorder(0.5), x, SIGMAS, None, MS, "renoise", g)
    return PairBatch(target_traj=trajs.select(torch.arange(b)),
                     reference_traj=trajs.select(torch.arange(b, 2 * b)), cond=torch.arange(b))


@pytest.mark.parametrize("loss", ["pso_online", "pso_online_clipped"])
def test_first_step_penalty_adds_the_weighted_shift_of_both_sides_first_prediction(loss):
    """first_step_weight w adds w * (mean (x0_theta - x0_pre)^2 on the target's x_T + the same on the
    reference's x_T) per pair, at the trajectories' first level; the pairwise part and the logits stay."""
    batch = _online_batch()
    theta = torch.tensor(0.6, requires_grad=True)

    def model(x, sigma, cond):
        return x * theta

    frozen = Recorder(0.5)
    plain = compute_method_loss(MethodConfig(loss), batch, model, frozen, SIGMAS, MS, torch.Generator())
    held = compute_method_loss(MethodConfig(loss, first_step_weight=0.25), batch, model, frozen, SIGMAS, MS,
                               torch.Generator())
    xt, xr = batch.target_traj.latents[:, 0], batch.reference_traj.latents[:, 0]
    shift = ((0.1 * xt) ** 2).flatten(1).mean(1) + ((0.1 * xr) ** 2).flatten(1).mean(1)
    assert torch.allclose(held.loss - plain.loss, 0.25 * shift.detach(), rtol=1e-5)
    assert torch.equal(held.logits, plain.logits)
    assert held.metrics["pairwise_loss"] == pytest.approx(plain.metrics["loss"])
    assert held.metrics["first_step_shift"] == pytest.approx(float(shift.mean()), rel=1e-5)
    # its gradient pulls theta toward the frozen 0.5
    theta.grad = None
    (held.loss - plain.loss).sum().backward()
    assert theta.grad > 0


def test_first_step_penalty_reuses_the_log_ratios_first_predictions_and_falls_back_without_them():
    """With every transition scored, the penalty takes the x0 predictions the log-ratio made at the first
    step (no extra model call); with one drawn transition that is not the first, it calls both models
    at the first latents itself. Both give the same added term."""
    batch = _online_batch()
    xt, xr = batch.target_traj.latents[:, 0], batch.reference_traj.latents[:, 0]
    shift = ((0.1 * xt) ** 2).flatten(1).mean(1) + ((0.1 * xr) ** 2).flatten(1).mean(1)
    n_stochastic = len(batch.target_traj.stochastic_steps())
    for transitions in ("all", "one"):
        seen_first = set()
        for seed in range(8):
            counts, losses = [], []
            for weight in (0.0, 0.25):
                model, frozen = Recorder(0.6), Recorder(0.5)
                cfg = MethodConfig("pso_online", first_step_weight=weight, transitions=transitions)
                out = compute_method_loss(cfg, batch, model, frozen, SIGMAS, MS,
                                          torch.Generator().manual_seed(seed))
                counts.append((len(model.calls), len(frozen.calls)))
                losses.append(out.loss)
            assert torch.allclose(losses[1] - losses[0], 0.25 * shift, rtol=1e-5)
            scored = n_stochastic if transitions == "all" else 1
            assert counts[0] == (scored, scored)
            first_scored = any(float(s[0]) == float(SIGMAS[0]) for _, s in frozen.calls[:scored])
            seen_first.add(first_scored)
            assert counts[1] == ((scored, scored) if first_scored else (scored + 1, scored + 1))
        assert seen_first == ({True} if transitions == "all" else {True, False})


def test_first_step_weight_is_refused_where_there_is_no_sampled_first_step():
    with pytest.raises(ValueError, match="first_step_weight must be a finite number >= 0, got -0.1"):
        MethodConfig("pso_online", first_step_weight=-0.1)
    with pytest.raises(ValueError, match="weight=0.5 holds the first step.*'pso_offline' has none"):
        MethodConfig("pso_offline", first_step_weight=0.5)
