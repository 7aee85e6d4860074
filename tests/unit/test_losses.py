"""Facts about pso.losses: closed-form values, gradient signs, reductions, metrics, registry errors.

Closed-form expectations are written from hand computation: -log sigmoid(x) = log(1 + exp(-x)).
"""

from __future__ import annotations

import math

import pytest
import torch

from pso import losses as L

LOG2 = math.log(2.0)


def nll(x: float) -> float:
    """-log sigmoid(x), computed independently of torch."""
    return math.log1p(math.exp(-x))


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def rand(b=3, n=4, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, generator=g, dtype=torch.float64) * 0.5 + 0.05


# Every DPO-form loss, called with "model equals frozen" inputs built from two random tensors.
def _agreeing_calls():
    a, b = rand(seed=1), rand(seed=2)
    zero = torch.zeros_like(a)
    sigma = rand(seed=3) + 0.5
    return {
        "pso_offline": lambda red: L.pso_offline_loss(a, a.clone(), b, b.clone(), 50.0, red),
        "pso_full": lambda red: L.pso_full_loss(a, a.clone(), zero, 5.0, red),
        "pso_online": lambda red: L.pso_online_loss(zero, zero.clone(), 5.0, red),
        "pso_online_clipped": lambda red: L.pso_online_clipped_loss(zero, zero.clone(), 50.0, reduction=red),
        "pso_dreambooth": lambda red: L.pso_dreambooth_loss(a, a.clone(), b, b.clone(), sigma, 5.0,
                                                            form="pso", reduction=red),
        "diffusion_dpo": lambda red: L.diffusion_dpo_loss(a, a.clone(), b, b.clone(), 5000.0, red),
    }


@pytest.mark.parametrize("reduction", list(L.REDUCTIONS))
@pytest.mark.parametrize("name", list(_agreeing_calls()))
def test_dpo_forms_equal_log2_when_model_equals_frozen(name, reduction):
    out = _agreeing_calls()[name](reduction)
    assert out.loss.shape == (3,)
    torch.testing.assert_close(out.loss, torch.full((3,), LOG2, dtype=out.loss.dtype), atol=1e-6, rtol=0)
    assert out.metrics["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert out.metrics["margin"] == pytest.approx(0.0, abs=1e-9)


# ---- closed-form values -------------------------------------------------------------------------


def test_offline_closed_form():
    # bracket (0.30 - 0.25) - (0.20 - 0.24) = 0.09; logit = -50 * 0.09 = -4.5
    out = L.pso_offline_loss(t([[0.30]]), t([[0.25]]), t([[0.20]]), t([[0.24]]), beta=50.0)
    assert out.logits.item() == pytest.approx(-4.5, abs=1e-12)
    assert out.loss.item() == pytest.approx(nll(-4.5), abs=1e-12)


def test_full_closed_form_sign_of_reference_logratio():
    # Eq. 5 bracket = (m_t - f_t) + lr_r = -0.02 + 0.05 = 0.03; logit = -5 * 0.03 = -0.15.
    # A positive reference log-ratio (model likes the reference more than frozen does) is penalised.
    out = L.pso_full_loss(t([[0.20]]), t([[0.22]]), t([[0.05]]), beta=5.0)
    assert out.logits.item() == pytest.approx(-0.15, abs=1e-12)
    assert out.loss.item() == pytest.approx(nll(-0.15), abs=1e-12)


def test_full_equals_offline_with_gaussian_logratio_in_place_of_ref_errors():
    # Eq. 5 and Eq. 6 agree when the reference log-ratio equals -(m_r - f_r) (Eq. 11 with omega = 1).
    m_t, f_t, m_r, f_r = rand(seed=4), rand(seed=5), rand(seed=6), rand(seed=7)
    full = L.pso_full_loss(m_t, f_t, -(m_r - f_r), 5.0)
    offline = L.pso_offline_loss(m_t, f_t, m_r, f_r, 5.0)
    torch.testing.assert_close(full.loss, offline.loss)


def test_online_closed_form():
    # logit = 5 * (0.03 - (-0.01)) = 0.2
    out = L.pso_online_loss(t([[0.03]]), t([[-0.01]]), beta=5.0)
    assert out.loss.item() == pytest.approx(nll(0.2), abs=1e-12)


def test_online_clipped_closed_form():
    # target ratio exp(0.5) > 1.1 is clamped to 1.1; reference log-ratio -0.02 lies inside [log .9, log 1.1]
    out = L.pso_online_clipped_loss(t([[0.5]]), t([[-0.02]]), beta=50.0, clip=0.1)
    expected_logit = 50.0 * (math.log(1.1) + 0.02)
    assert out.logits.item() == pytest.approx(expected_logit, abs=1e-12)
    assert out.loss.item() == pytest.approx(nll(expected_logit), abs=1e-12)
    assert out.metrics["clipped_fraction"] == pytest.approx(0.5)


def test_dreambooth_pso_closed_form():
    # w = 2^-2 = 0.25; bracket (0.4 - 0.5) - 0.1 * (0.3 - 0.1) = -0.12; logit = -5 * 0.25 * -0.12 = 0.15
    out = L.pso_dreambooth_loss(t([[0.4]]), t([[0.5]]), t([[0.3]]), t([[0.1]]), t([[2.0]]), beta=5.0)
    assert out.logits.item() == pytest.approx(0.15, abs=1e-12)
    assert out.loss.item() == pytest.approx(nll(0.15), abs=1e-12)


def test_dreambooth_hinge_closed_form_with_reference_sft():
    # logit = -5 * 0.25 * (0.4 - 0.1 * 0.3) = -0.4625; hinge 1 + 0.4625; + 0.5 * 0.25 * 0.3 = 0.0375
    out = L.pso_dreambooth_loss(t([[0.4]]), None, t([[0.3]]), None, t([[2.0]]), beta=5.0, form="pso_db")
    assert out.loss.item() == pytest.approx(1.4625, abs=1e-12)
    with_sft = L.pso_dreambooth_loss(t([[0.4]]), None, t([[0.3]]), None, t([[2.0]]), beta=5.0,
                                     form="pso_db", ref_sft_weight=0.5)
    assert with_sft.loss.item() == pytest.approx(1.5, abs=1e-12)


def test_dreambooth_hinge_is_flat_past_the_margin():
    # logit = -5 * 1 * (0.01 - 0.1 * 3.0) = 1.45 > 1: hinge inactive, zero loss and zero gradient
    m_t = t([[0.01]]).requires_grad_()
    out = L.pso_dreambooth_loss(m_t, None, t([[3.0]]), None, t([[1.0]]), beta=5.0, form="pso_db")
    out.loss.sum().backward()
    assert out.loss.item() == 0.0
    assert m_t.grad.item() == 0.0


def test_diffusion_dpo_closed_form_has_factor_one_half():
    # bracket (0.1000 - 0.1002) - (0.1001 - 0.1000) = -0.0003; logit = -0.5 * 5000 * -0.0003 = 0.75
    out = L.diffusion_dpo_loss(t([[0.1000]]), t([[0.1002]]), t([[0.1001]]), t([[0.1000]]), beta_dpo=5000.0)
    assert out.logits.item() == pytest.approx(0.75, abs=1e-9)
    assert out.loss.item() == pytest.approx(nll(0.75), abs=1e-9)


def test_sft_is_mean_error_over_transitions():
    out = L.sft_loss(t([[0.2, 0.4], [0.1, 0.1]]))
    torch.testing.assert_close(out.loss, t([0.3, 0.1]))
    assert out.logits is None
    assert out.metrics["loss"] == pytest.approx(0.2)


# ---- gradient signs -----------------------------------------------------------------------------


def _err_grads(fn):
    """Autograd d loss / d (model_err_target, model_err_ref) at a generic point."""
    m_t, m_r = rand(seed=8).requires_grad_(), rand(seed=9).requires_grad_()
    fn(m_t, m_r).loss.sum().backward()
    return m_t.grad, m_r.grad


def like(x: torch.Tensor, seed: int, shift: float = 0.0) -> torch.Tensor:
    return rand(*x.shape, seed=seed) + shift


ERROR_FORMS = {
    "pso_offline": lambda m_t, m_r, red: L.pso_offline_loss(
        m_t, like(m_t, 10), m_r, like(m_r, 11), 50.0, red),
    "pso_dreambooth": lambda m_t, m_r, red: L.pso_dreambooth_loss(
        m_t, like(m_t, 10), m_r, like(m_r, 11), like(m_t, 12, 0.5), 5.0, reduction=red),
    "pso_dreambooth_hinge": lambda m_t, m_r, red: L.pso_dreambooth_loss(
        m_t, None, m_r, None, like(m_t, 12, 0.5), 5.0, form="pso_db", reduction=red),
    "diffusion_dpo": lambda m_t, m_r, red: L.diffusion_dpo_loss(
        m_t, like(m_t, 10), m_r, like(m_r, 11), 50.0, red),
}


@pytest.mark.parametrize("reduction", list(L.REDUCTIONS))
@pytest.mark.parametrize("name", list(ERROR_FORMS))
def test_descent_lowers_target_error_and_raises_reference_error(name, reduction):
    g_t, g_r = _err_grads(lambda m_t, m_r: ERROR_FORMS[name](m_t, m_r, reduction))
    assert (g_t > 0).all(), g_t
    assert (g_r < 0).all(), g_r


@pytest.mark.parametrize("reduction", list(L.REDUCTIONS))
def test_full_gradients_lower_target_error_and_reference_logratio(reduction):
    m_t, lr_r = rand(seed=13).requires_grad_(), (rand(seed=14) - 0.3).requires_grad_()
    L.pso_full_loss(m_t, rand(seed=15), lr_r, 5.0, reduction).loss.sum().backward()
    assert (m_t.grad > 0).all()
    assert (lr_r.grad > 0).all()


@pytest.mark.parametrize("reduction", list(L.REDUCTIONS))
def test_online_gradients_raise_target_logratio(reduction):
    lr_t, lr_r = (rand(seed=16) - 0.3).requires_grad_(), (rand(seed=17) - 0.3).requires_grad_()
    L.pso_online_loss(lr_t, lr_r, 5.0, reduction).loss.sum().backward()
    assert (lr_t.grad < 0).all()
    assert (lr_r.grad > 0).all()


def test_clipped_gradient_is_zero_outside_the_clip_range_only():
    # columns: target ratio exp(0.5) (above 1.1), exp(-0.5) (below 0.9), exp(0.05) (inside)
    lr_t = t([[0.5, -0.5, 0.05]]).requires_grad_()
    lr_r = t([[0.0, 0.0, 0.0]]).requires_grad_()
    L.pso_online_clipped_loss(lr_t, lr_r, beta=50.0, clip=0.1).loss.sum().backward()
    assert lr_t.grad[0, 0].item() == 0.0
    assert lr_t.grad[0, 1].item() == 0.0
    assert lr_t.grad[0, 2].item() < 0.0
    assert (lr_r.grad > 0).all()


# ---- reductions ---------------------------------------------------------------------------------


def test_sum_inside_and_per_transition_differ_for_two_transitions():
    # per-transition logits z = 1 * (lr_t - lr_r) = [2, -1]
    lr_t, lr_r = t([[2.0, -1.0]]), t([[0.0, 0.0]])
    inside = L.pso_online_loss(lr_t, lr_r, beta=1.0, reduction="sum_inside")
    per = L.pso_online_loss(lr_t, lr_r, beta=1.0, reduction="per_transition")
    assert inside.loss.item() == pytest.approx(nll(1.0), abs=1e-12)
    assert per.loss.item() == pytest.approx(0.5 * (nll(2.0) + nll(-1.0)), abs=1e-12)
    assert per.loss.item() > inside.loss.item() + 0.3
    assert per.logits.item() == inside.logits.item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["pso_offline", "pso_dreambooth", "diffusion_dpo"])
def test_reductions_agree_for_one_transition(name):
    m_t, m_r = rand(b=5, n=1, seed=18), rand(b=5, n=1, seed=19)
    a = ERROR_FORMS[name](m_t, m_r, "sum_inside").loss
    b = ERROR_FORMS[name](m_t, m_r, "per_transition").loss
    torch.testing.assert_close(a, b)


def test_default_reduction_is_sum_inside_and_registered():
    assert L.DEFAULT_REDUCTION == "sum_inside"
    assert set(L.REDUCTIONS) == {"sum_inside", "per_transition"}


# ---- metrics ------------------------------------------------------------------------------------


def test_metrics_on_constructed_batch():
    # beta = 2: pair logits [16, 6, 1, -20] -> 3 of 4 ranked right, |logit| > 6.91 for 16 and -20.
    lr_t = t([[8.0], [3.0], [0.5], [-10.0]])
    out = L.pso_online_loss(lr_t, torch.zeros_like(lr_t), beta=2.0)
    assert out.metrics["implicit_accuracy"] == pytest.approx(0.75)
    assert out.metrics["saturated_fraction"] == pytest.approx(0.5)
    assert out.metrics["margin"] == pytest.approx((8 + 3 + 0.5 - 10) / 4)
    assert out.metrics["logratio_target"] == pytest.approx((8 + 3 + 0.5 - 10) / 4)
    assert all(isinstance(v, float) for v in out.metrics.values())


def test_saturation_counts_log_sigmoid_arguments_of_the_reduction():
    # transitions [8, -7.5] sum to 0.5: no saturated pair, but both transitions are saturated.
    lr_t, lr_r = t([[8.0, -7.5]]), t([[0.0, 0.0]])
    inside = L.pso_online_loss(lr_t, lr_r, beta=1.0, reduction="sum_inside")
    per = L.pso_online_loss(lr_t, lr_r, beta=1.0, reduction="per_transition")
    assert inside.metrics["saturated_fraction"] == 0.0
    assert per.metrics["saturated_fraction"] == 1.0
    assert math.isclose(L.SATURATION_LOGIT, math.log(999.0))


def test_metrics_report_mean_errors():
    m_t, f_t, m_r, f_r = t([[0.1, 0.3]]), t([[0.2, 0.2]]), t([[0.5, 0.7]]), t([[0.4, 0.4]])
    out = L.pso_offline_loss(m_t, f_t, m_r, f_r, beta=50.0)
    assert out.metrics["model_err_target"] == pytest.approx(0.2)
    assert out.metrics["frozen_err_target"] == pytest.approx(0.2)
    assert out.metrics["model_err_ref"] == pytest.approx(0.6)
    assert out.metrics["frozen_err_ref"] == pytest.approx(0.4)


# ---- registry and errors ------------------------------------------------------------------------


def test_unknown_loss_error_lists_every_valid_name():
    with pytest.raises(ValueError, match="nope") as info:
        L.get_loss("nope")
    for name in L.LOSSES:
        assert name in str(info.value)


@pytest.mark.parametrize("beta", [0.0, -2.5, float("nan")])
def test_non_positive_beta_error_names_the_value(beta):
    with pytest.raises(ValueError, match="beta must be") as info:
        L.pso_offline_loss(rand(), rand(), rand(), rand(), beta)
    assert repr(beta) in str(info.value)


def test_non_positive_beta_dpo_error_names_the_value():
    with pytest.raises(ValueError, match=r"beta_dpo must be .* got -1\.0"):
        L.diffusion_dpo_loss(rand(), rand(), rand(), rand(), -1.0)


def test_unknown_reduction_and_form_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"'mean'.*per_transition, sum_inside"):
        L.pso_online_loss(rand(), rand(), 5.0, reduction="mean")
    with pytest.raises(ValueError, match=r"'dpo'.*pso, pso_db"):
        L.pso_dreambooth_loss(rand(), rand(), rand(), rand(), 1.0, 5.0, form="dpo")


def test_shape_mismatch_error_names_the_shapes():
    with pytest.raises(ValueError, match=r"logratio_target=\(3, 4\), logratio_ref=\(3,\)"):
        L.pso_online_loss(rand(), torch.zeros(3), 5.0)


def test_clip_out_of_range_error_names_the_value():
    with pytest.raises(ValueError, match=r"clip must be in \(0, 1\), got 1\.5"):
        L.pso_online_clipped_loss(rand(), rand(), 5.0, clip=1.5)


def test_registry_defaults_follow_the_paper_and_the_authors_code():
    betas = {name: spec.default_beta for name, spec in L.LOSSES.items()}
    assert betas == {
        "pso_offline": 50.0, "pso_full": 5.0, "pso_online": 5.0, "pso_online_clipped": 50.0,
        "pso_dreambooth": 5.0, "pso_dreambooth_hinge": 5.0, "diffusion_dpo": 5000.0, "sft": None,
    }
    gaussian = {name for name, spec in L.LOSSES.items() if spec.needs_gaussian_policy}
    assert gaussian == {"pso_full", "pso_online", "pso_online_clipped"}
    no_frozen = {name for name, spec in L.LOSSES.items() if not spec.needs_frozen_model}
    assert no_frozen == {"pso_dreambooth_hinge", "sft"}
    shared = {name for name, spec in L.LOSSES.items() if spec.shares_noise}
    assert shared == {"pso_offline", "pso_dreambooth", "pso_dreambooth_hinge", "diffusion_dpo"}
    for spec in L.LOSSES.values():
        assert set(spec.inputs) <= set(L.INPUTS)


def test_compute_loss_uses_spec_defaults():
    # clipped: default beta 50 and per_transition; z = 50 * [log 1.1, 0.02 - 0] per transition
    lr_t, lr_r = t([[0.5, 0.02]]), t([[0.0, 0.0]])
    out = L.compute_loss("pso_online_clipped", {"logratio_target": lr_t, "logratio_ref": lr_r, "sigma": lr_r})
    expected = 0.5 * (nll(50.0 * math.log(1.1)) + nll(50.0 * 0.02))
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)


def test_compute_loss_passes_inputs_to_the_right_arguments():
    m_t, f_t, m_r, f_r, sigma = rand(seed=20), rand(seed=21), rand(seed=22), rand(seed=23), rand(seed=24) + 1
    inputs = {"model_err_target": m_t, "frozen_err_target": f_t, "model_err_ref": m_r,
              "frozen_err_ref": f_r, "sigma": sigma}
    pairs = {
        "pso_offline": L.pso_offline_loss(m_t, f_t, m_r, f_r, 50.0),
        "diffusion_dpo": L.diffusion_dpo_loss(m_t, f_t, m_r, f_r, 5000.0),
        "pso_dreambooth": L.pso_dreambooth_loss(m_t, f_t, m_r, f_r, sigma, 5.0),
        "pso_dreambooth_hinge": L.pso_dreambooth_loss(m_t, None, m_r, None, sigma, 5.0, form="pso_db"),
        "sft": L.sft_loss(m_t),
    }
    for name, direct in pairs.items():
        torch.testing.assert_close(L.compute_loss(name, inputs, beta=None).loss, direct.loss, msg=name)


def test_compute_loss_missing_input_error_names_it():
    with pytest.raises(ValueError, match=r"missing \['logratio_ref'\]"):
        L.compute_loss("pso_full", {"model_err_target": rand(), "frozen_err_target": rand()})


def test_registry_carries_what_callers_need():
    """Levels, error space and mode come from the registry (no name tests elsewhere); the node choice
    lists and the headless online losses are read from it, in the released order."""
    levels = {name: spec.levels for name, spec in L.LOSSES.items()}
    assert levels == {"pso_offline": "few_step", "pso_full": "few_step", "pso_online": None,
                      "pso_online_clipped": None, "pso_dreambooth": "few_step",
                      "pso_dreambooth_hinge": "few_step", "diffusion_dpo": "continuous", "sft": "continuous"}
    x0 = {name for name, spec in L.LOSSES.items() if spec.error_space == "x0"}
    assert x0 == {"pso_dreambooth", "pso_dreambooth_hinge"}
    assert list(L.node_choices("offline")) == ["pso_offline", "pso_full", "pso_dreambooth",
                                               "pso_dreambooth_hinge", "sft"]
    assert list(L.node_choices("online")) == ["pso_online", "pso_online_clipped"]
    assert L.losses_of("online") == ("pso_online", "pso_online_clipped")
    assert [n for n, s in L.LOSSES.items() if s.pairwise] == [n for n in L.LOSSES if n != "sft"]
    assert {n for n, s in L.LOSSES.items() if s.target_anchor} == {"pso_offline"}
    offline = L.LOSSES["pso_offline"]
    assert (offline.beta_for("self_sampled"), offline.beta_for("preference_pairs")) == (10.0, 50.0)
    assert L.LOSSES["pso_full"].beta_for("self_sampled") == 5.0  # no measured value: the paper's
    with pytest.raises(ValueError, match="unknown beta source 'mine'; valid: preference_pairs, self_sampled"):
        offline.beta_for("mine")
    with pytest.raises(ValueError, match="unknown loss mode 'batch'"):
        L.node_choices("batch")


def test_every_registered_function_takes_its_inputs_by_name():
    """compute_loss calls each function with named inputs: a function whose parameters are not named as
    in INPUTS would lose them, so every registered function takes exactly the inputs the spec lists."""
    import inspect

    for name, spec in L.LOSSES.items():
        params = inspect.signature(spec.fn).parameters
        assert spec.inputs and all(k in params for k in spec.inputs), name
        assert ("beta" in params) == (spec.default_beta is not None), name


def test_a_spec_without_forward_sides_names_no_levels():
    with pytest.raises(ValueError, match="names neither"):
        L.LossSpec(fn=L.pso_online_loss, mode="online", target_path="sampled", reference_path="sampled",
                   needs_gaussian_policy=True, needs_frozen_model=True, error_space="eps", levels=None,
                   default_beta=5.0, default_reduction="sum_inside", equation="-", description="-")
