"""Facts about pso.schedules: schedule values, ComfyUI agreement, conversions, timestep sets."""

import math

import numpy as np
import pytest
import torch

from pso import schedules as S
from pso.schedules import (
    FEW_STEP_TIMESTEPS,
    DiscreteSchedule,
    FlowSchedule,
    add_noise,
    alphas_cumprod,
    few_step_sigmas,
    flow_sigmas,
    noise_from_x0,
    parameterization,
    sub_schedule,
)


@pytest.fixture(scope="module")
def sd() -> DiscreteSchedule:
    return DiscreteSchedule(alphas_cumprod("scaled_linear"), prediction="eps")


def _naive_abar(betas: list[float]) -> list[float]:
    out, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        out.append(prod)
    return out


# ---------------------------------------------------------------- beta schedules
def test_scaled_linear_sigmas_are_the_sd15_values(sd):
    # SD 1.5 / SDXL: sigma_max 14.6146 (t = 999), sigma_min 0.0292 (t = 0) as k-diffusion reports.
    assert sd.sigma_max.item() == pytest.approx(14.6146, abs=1e-4)
    assert sd.sigma_min.item() == pytest.approx(0.029168, abs=1e-5)
    assert sd.sigmas.dtype == torch.float32 and sd.sigmas.shape == (1000,)


def test_scaled_linear_matches_a_naive_python_product():
    t = 1000
    b0, b1 = 0.00085 ** 0.5, 0.012 ** 0.5
    betas = [(b0 + (b1 - b0) * i / (t - 1)) ** 2 for i in range(t)]
    expected = torch.tensor(_naive_abar(betas), dtype=torch.float64)
    got = alphas_cumprod("scaled_linear")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_linear_matches_a_naive_python_product():
    betas = [1e-4 + (2e-2 - 1e-4) * i / 999 for i in range(1000)]
    expected = torch.tensor(_naive_abar(betas), dtype=torch.float64)
    torch.testing.assert_close(alphas_cumprod("linear", 1000, 1e-4, 2e-2), expected, rtol=1e-12, atol=0)


def test_cosine_abar_telescopes_to_f_t_over_f_0():
    # abar_t = prod (f(s+1)/f(s)) = f(t+1)/f(0) wherever no beta was clipped at 0.999.
    t = np.arange(1001) / 1000 + 8e-3
    f = np.cos(t / (1 + 8e-3) * np.pi / 2) ** 2
    expected = f[1:] / f[0]
    got = alphas_cumprod("cosine").numpy()
    unclipped = (1 - f[1:] / f[:-1]) < 0.999
    assert unclipped[:-1].all()  # only the very last beta is clipped
    np.testing.assert_allclose(got[unclipped], expected[unclipped], rtol=1e-10)


def test_unknown_kind_lists_the_valid_kinds():
    with pytest.raises(ValueError, match=r"'squared'.*\['cosine', 'linear', 'scaled_linear'\]"):
        alphas_cumprod("squared")


def test_bad_betas_name_the_values_and_the_sd_defaults():
    with pytest.raises(ValueError, match=r"beta_start=0\.02, beta_end=0\.01.*0\.00085"):
        alphas_cumprod("linear", 1000, 0.02, 0.01)


def test_unknown_prediction_points_to_flow_schedule():
    with pytest.raises(ValueError, match=r"'x0'.*\['eps', 'v'\].*FlowSchedule"):
        DiscreteSchedule(prediction="x0")


# ---------------------------------------------------------------- DiscreteSchedule vs ComfyUI
def _comfy_tables():
    # ComfyUI 0.3.75 ModelSamplingDiscrete._register_schedule + make_beta_schedule("linear"),
    # re-typed: betas in float64, cumprod, sigmas float64, stored .float(); log in float64, .float().
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    sigmas = ((1 - ac) / ac) ** 0.5
    return sigmas.float(), sigmas.log().float()


def test_sigma_tables_are_bit_identical_to_comfyui(sd):
    sigmas, log_sigmas = _comfy_tables()
    assert torch.equal(sd.sigmas, sigmas)
    assert torch.equal(sd.log_sigmas, log_sigmas)


def test_timestep_inverts_sigma_at_every_integer_step(sd):
    t = torch.arange(1000)
    back = sd.timestep(sd.sigma(t))
    assert back.dtype == torch.int64
    assert torch.equal(back, t)


def test_sigma_interpolates_log_sigma_linearly(sd):
    s = sd.sigma(torch.tensor([10.25, 998.5]))
    lo, hi = sd.sigmas[10].double(), sd.sigmas[11].double()
    expected0 = math.exp(0.75 * math.log(lo) + 0.25 * math.log(hi))
    expected1 = math.exp(0.5 * math.log(sd.sigmas[998].double()) + 0.5 * math.log(sd.sigmas[999].double()))
    assert s[0].item() == pytest.approx(expected0, rel=1e-6)
    assert s[1].item() == pytest.approx(expected1, rel=1e-6)
    # out-of-range timesteps clamp to the table ends
    ends = sd.sigma(torch.tensor([-5.0, 2000.0]))
    assert ends.tolist() == pytest.approx([sd.sigmas[0].item(), sd.sigmas[-1].item()])


def test_timestep_snaps_to_the_nearest_entry_in_log_sigma(sd):
    l10, l11 = sd.log_sigmas[10].double(), sd.log_sigmas[11].double()
    near10 = torch.tensor([math.exp(l10 + 0.4 * (l11 - l10))])
    near11 = torch.tensor([math.exp(l10 + 0.6 * (l11 - l10))])
    assert sd.timestep(near10).item() == 10
    assert sd.timestep(near11).item() == 11


def test_percent_to_sigma_endpoints_and_midpoint(sd):
    assert sd.percent_to_sigma(0.0) == 999999999.9
    assert sd.percent_to_sigma(1.0) == 0.0
    assert sd.percent_to_sigma(0.5) == pytest.approx(sd.sigma(torch.tensor(499.5)).item(), rel=1e-7)


def test_noise_scaling_closed_forms(sd):
    noise = torch.tensor([[1.0, -2.0]])
    latent = torch.tensor([[0.5, 0.25]])
    sigma = torch.tensor(3.0)
    assert torch.allclose(sd.noise_scaling(sigma, noise, latent), torch.tensor([[3.5, -5.75]]))
    root10 = math.sqrt(10.0)
    expected = torch.tensor([[root10 + 0.5, -2 * root10 + 0.25]])
    assert torch.allclose(sd.noise_scaling(sigma, noise, latent, True), expected)
    assert torch.equal(noise, torch.tensor([[1.0, -2.0]]))  # inputs are not modified
    flow = FlowSchedule()
    got = flow.noise_scaling(torch.tensor(0.25), noise, latent)
    assert torch.allclose(got, 0.25 * noise + 0.75 * latent)
    assert torch.equal(flow.noise_scaling(torch.tensor(0.25), noise, latent, True), got)


def test_per_sample_sigmas_broadcast_over_the_batch(sd):
    noise = torch.ones(2, 1, 2, 2)
    latent = torch.zeros(2, 1, 2, 2)
    out = sd.noise_scaling(torch.tensor([1.0, 2.0]), noise, latent)
    assert out[0].eq(1.0).all() and out[1].eq(2.0).all()


def test_calculate_input_is_the_variance_preserving_latent(sd):
    x = torch.tensor([[3.0, 4.0]])
    assert torch.allclose(sd.calculate_input(torch.tensor(2.0), x), x / math.sqrt(5.0))


def test_eps_denoised_recovers_x0_from_the_true_noise(sd):
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(2, 1, 2, 2, generator=g), torch.randn(2, 1, 2, 2, generator=g)
    sigma = torch.tensor([0.7, 5.0])
    x = x0 + sigma.view(2, 1, 1, 1) * n
    torch.testing.assert_close(sd.calculate_denoised(sigma, n, x), x0, rtol=0, atol=1e-5)


def test_v_denoised_recovers_x0_from_the_true_v():
    ms = DiscreteSchedule(prediction="v")
    g = torch.Generator().manual_seed(1)
    x0, n = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    sigma = torch.tensor([0.3, 1.0, 9.0])
    s = sigma.view(3, 1)
    alpha, sig_vp = 1 / torch.sqrt(1 + s**2), s / torch.sqrt(1 + s**2)
    v = alpha * n - sig_vp * x0  # Salimans & Ho (2022), in the VP frame
    x = x0 + s * n
    torch.testing.assert_close(ms.calculate_denoised(sigma, v, x), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(S.x0_to_v(x, x0, sigma), v, rtol=0, atol=1e-5)


def test_flow_denoised_and_velocity_round_trip():
    ms = FlowSchedule()
    x0, n = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.5, 2.0]])
    s = torch.tensor(0.3)
    x = (1 - s) * x0 + s * n
    v = n - x0
    torch.testing.assert_close(ms.calculate_denoised(s, v, x), x0)
    torch.testing.assert_close(S.x0_to_flow(x, x0, s), v)


@pytest.mark.parametrize("param", ["eps", "v", "const"])
def test_noise_from_x0_inverts_add_noise(param):
    g = torch.Generator().manual_seed(2)
    x0, n = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    sigma = torch.tensor([0.2, 0.9])
    x = add_noise(x0, n, sigma, param)
    torch.testing.assert_close(noise_from_x0(x, x0, sigma, param), n, rtol=0, atol=1e-5)


def test_eps_and_v_conversions_round_trip():
    g = torch.Generator().manual_seed(3)
    x, x0 = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    sigma = torch.tensor([0.5, 4.0])
    torch.testing.assert_close(S.eps_to_x0(x, S.x0_to_eps(x, x0, sigma), sigma), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(S.v_to_x0(x, S.x0_to_v(x, x0, sigma), sigma), x0, rtol=0, atol=1e-5)


def test_noise_from_x0_const_closed_form():
    x, x0 = torch.tensor([1.0]), torch.tensor([0.5])
    assert noise_from_x0(x, x0, 0.5, "const").item() == pytest.approx((1.0 - 0.25) / 0.5)
    assert noise_from_x0(x, x0, 0.5, "eps").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"'flow'.*\['eps', 'v', 'const'\]"):
        noise_from_x0(x, x0, 0.5, "flow")


# ---------------------------------------------------------------- parameterization (duck typing)
class _HostDiscrete(torch.nn.Module):  # stands in for comfy.model_sampling.ModelSamplingDiscrete
    pass


class EPS:
    pass


class V_PREDICTION(EPS):  # noqa: N801 - ComfyUI's class names are what is detected
    pass


class EDM(V_PREDICTION):
    pass


class CONST:
    pass


class LCM(EPS):
    pass


def _host(type_cls):
    return type("ModelSampling", (_HostDiscrete, type_cls), {})()


def test_parameterization_of_our_classes(sd):
    assert parameterization(sd) == "eps"
    assert parameterization(DiscreteSchedule(prediction="v")) == "v"
    assert parameterization(FlowSchedule(shift=3.0)) == "const"


@pytest.mark.parametrize(
    ("type_cls", "expected"), [(EPS, "eps"), (V_PREDICTION, "v"), (CONST, "const"), (LCM, "eps")]
)
def test_parameterization_of_comfyui_objects_by_mro_name(type_cls, expected):
    assert parameterization(_host(type_cls)) == expected


def test_edm_is_not_mistaken_for_v_prediction():
    supported = r"\['CONST', 'EPS', 'LCM', 'V_PREDICTION'\]"
    with pytest.raises(ValueError, match=r"type EDM .*not supported.*" + supported):
        parameterization(_host(EDM))


def test_unknown_object_is_a_type_error():
    with pytest.raises(TypeError, match=r"cannot tell the parameterisation of object"):
        parameterization(object())


# ---------------------------------------------------------------- flow schedule
def test_flow_schedule_table_and_inverse():
    ms = FlowSchedule(shift=3.0, multiplier=1000)
    assert ms.sigma_max.item() == pytest.approx(1.0)
    assert ms.sigma_min.item() == pytest.approx(3 * 0.001 / (1 + 2 * 0.001))
    # ComfyUI: the network's timestep is sigma * multiplier; sigma(t) applies the shift to t / multiplier.
    assert ms.timestep(torch.tensor(0.25)).item() == pytest.approx(250.0)
    t = torch.tensor([100.0, 500.0, 900.0])
    torch.testing.assert_close(ms.sigma(t), 3 * (t / 1000) / (1 + 2 * (t / 1000)))
    assert ms.percent_to_sigma(0.0) == 1.0 and ms.percent_to_sigma(1.0) == 0.0
    assert ms.percent_to_sigma(0.5) == pytest.approx(1.5 / 2.0)  # 3 * 0.5 / (1 + 2 * 0.5)


def test_flow_sigmas_closed_forms():
    assert flow_sigmas(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    # shift 3: 3t / (1 + 2t) at t = 1, 0.75, 0.5, 0.25
    assert flow_sigmas(4, shift=3.0).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-7)
    assert flow_sigmas(1).tolist() == [1.0, 0.0]


def test_flow_schedule_rejects_bad_shift():
    with pytest.raises(ValueError, match=r"shift must be a finite number > 0, got -1\.0"):
        FlowSchedule(shift=-1.0)


# ---------------------------------------------------------------- few-step timestep sets
def test_registry_timesteps_match_independent_formulas():
    # diffusers LCMScheduler: origin grid arange(1, 51) * 20 - 1, reversed, at floor(linspace(0, 50, 4)).
    origin = (np.arange(1, 51) * 20 - 1)[::-1]
    lcm = origin[np.floor(np.linspace(0, 50, num=4, endpoint=False)).astype(np.int64)]
    assert FEW_STEP_TIMESTEPS["lcm_4"] == tuple(int(t) for t in lcm) == (999, 759, 499, 259)
    assert S.lcm_timesteps(4) == list(lcm)
    # diffusers "trailing": round(arange(1000, 0, -1000 / 4)) - 1
    trailing = np.round(np.arange(1000, 0, -1000 / 4)).astype(np.int64) - 1
    assert FEW_STEP_TIMESTEPS["lightning_4"] == tuple(int(t) for t in trailing) == (999, 749, 499, 249)
    assert FEW_STEP_TIMESTEPS["hyper_4"] == FEW_STEP_TIMESTEPS["lightning_4"]
    assert S.trailing_timesteps(4) == list(trailing)
    # ComfyUI SDTurboScheduler: flip(arange(1, 11) * 100 - 1)[:steps]
    turbo = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))
    assert FEW_STEP_TIMESTEPS["turbo_4"] == tuple(turbo[:4].tolist()) == (999, 899, 799, 699)
    assert FEW_STEP_TIMESTEPS["turbo_1"] == (999,)
    assert S.turbo_timesteps(2, denoise=0.5) == turbo[5:7].tolist()
    assert FEW_STEP_TIMESTEPS["dmd2"] == (999, 749, 499, 249)


def test_dmd2_sigmas_match_the_alphas_cumprod_formula(sd):
    sig = few_step_sigmas(sd, "dmd2")
    betas = [((0.00085 ** 0.5) + ((0.012 ** 0.5) - (0.00085 ** 0.5)) * i / 999) ** 2 for i in range(1000)]
    abar = _naive_abar(betas)
    expected = [math.sqrt((1 - abar[t]) / abar[t]) for t in (999, 749, 499, 249)] + [0.0]
    assert sig.dtype == torch.float32 and sig.shape == (5,)
    assert sig.tolist() == pytest.approx(expected, rel=2e-6)
    assert sig.tolist() == pytest.approx([14.6146, 4.0817, 1.6129, 0.6932, 0.0], abs=1e-4)


def test_few_step_sigmas_are_built_like_sdturboscheduler(sd):
    # SDTurboScheduler: model_sampling.sigma(int64 timesteps) then a zero: bit-identical.
    ts = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[0:4]
    sig = sd.sigma(ts)
    expected = torch.cat([sig, sig.new_zeros([1])])
    assert torch.equal(few_step_sigmas(sd, "turbo_4"), expected)
    assert torch.equal(few_step_sigmas(sd, [999, 899, 799, 699]), expected)


def test_few_step_sigmas_errors():
    with pytest.raises(ValueError, match=r"'dmd3'.*'dmd2'.*'turbo_4'"):
        few_step_sigmas(DiscreteSchedule(), "dmd3")
    with pytest.raises(ValueError, match=r"strictly decreasing.*\[249, 499\]"):
        few_step_sigmas(DiscreteSchedule(), [249, 499])


def test_sub_schedule_nests_dmd2_step_counts(sd):
    ms = sd
    four = few_step_sigmas(ms, "dmd2")
    assert torch.equal(sub_schedule(four, 2), few_step_sigmas(ms, [999, 499]))
    assert torch.equal(sub_schedule(four, 1), few_step_sigmas(ms, [999]))
    assert torch.equal(sub_schedule(four, 4), four)


def test_sub_schedule_refuses_a_step_count_that_does_not_divide(sd):
    four = few_step_sigmas(sd, "dmd2")
    with pytest.raises(ValueError, match=r"3-step schedule out of a 4-step one.*\[1, 2, 4\]"):
        sub_schedule(four, 3)


def test_check_sigmas_is_one_rule_that_names_the_value_and_the_fix():
    from pso.schedules import check_sigmas

    good = torch.tensor([14.6, 4.0, 1.0, 0.0])
    assert check_sigmas(good) is good and check_sigmas(good, min_steps=2) is good
    cases = [(torch.tensor([[1.0, 0.0]]), 1, r"got shape \(1, 2\), which is not a 1-D tensor"),
             (torch.tensor([1.0]), 1, r"at least 1 step; got \[1.0\], which has fewer than 1 step\. Build"),
             (torch.tensor([1.0, 0.0]), 2, r"2 steps; got \[1.0, 0.0\], which has fewer than 2 steps"),
             (torch.tensor([1.0, float("nan"), 0.0]), 1, r"got \[1.0, nan, 0.0\], which holds a level"),
             (torch.tensor([1.0, -0.5]), 1, "not finite and >= 0"),
             (torch.tensor([1.0, 1.0, 0.0]), 1, r"got \[1.0, 1.0, 0.0\], which is not strictly decreasing")]
    for sigmas, steps, match in cases:
        with pytest.raises(ValueError, match=match):
            check_sigmas(sigmas, min_steps=steps)
    with pytest.raises(ValueError, match="^PSO Online Train: SIGMAS must be .*schedule of at least 2 steps"):
        check_sigmas(torch.tensor([1.0, 0.0]), min_steps=2, what="PSO Online Train: SIGMAS")
