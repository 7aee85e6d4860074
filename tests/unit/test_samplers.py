"""Facts about pso.samplers: ComfyUI bit-identity, the trajectory invariant, Eq. 4 marginals,
Gaussian log-probabilities and their gradients, determinism, and the errors users meet."""

import math

import pytest
import safetensors.torch
import torch

from pso.samplers import (
    POLICIES,
    Trajectory,
    ancestral_sigmas,
    euler_ancestral_rf_step,
    euler_ancestral_step,
    gaussian_log_prob,
    get_policy,
    initial_latent,
    is_max_denoise,
    recorded_trajectory,
    renoise_step,
    sample_trajectory,
    transition_log_probs,
)
from pso.schedules import DiscreteSchedule, FlowSchedule, few_step_sigmas, flow_sigmas

SHAPE = (3, 2, 2, 2)  # B, C, H, W


@pytest.fixture(scope="module")
def sd() -> DiscreteSchedule:
    return DiscreteSchedule()


def toy_denoiser(x, sigma, cond):
    """A deterministic x0 predictor that depends on x, on sigma (B,) and on cond."""
    s = sigma.view(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(0.5 * x) * 0.8 + 0.05 * s + (0.0 if cond is None else cond)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def start(ms, sigmas, seed=123, shape=SHAPE, dtype=torch.float32):
    noise = torch.randn(shape, generator=gen(seed)).to(dtype)
    return initial_latent(ms, sigmas, noise)


# ------------------------------------------------------------------ ComfyUI 0.3.75, re-typed
# The statements of comfy/k_diffusion/sampling.py and comfy/model_sampling.py, typed again here so
# that the test does not use pso's code to check pso's code (and never imports comfy).
def comfy_append_dims(x, target_dims):
    dims_to_append = target_dims - x.ndim
    return x[(...,) + (None,) * dims_to_append]


def comfy_to_d(x, sigma, denoised):
    return (x - denoised) / comfy_append_dims(sigma, x.ndim)


def comfy_get_ancestral_step(sigma_from, sigma_to, eta=1.):
    if not eta:
        return sigma_to, 0.
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)  # noqa: E501
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def comfy_default_noise_sampler(x, seed=None):
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(
        x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)


def comfy_reshape_sigma(sigma, noise_dim):
    if sigma.nelement() == 1:
        return sigma.view(())
    return sigma.view(sigma.shape[:1] + (1,) * (noise_dim - 1))


class EPS:  # comfy.model_sampling.EPS.noise_scaling
    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        sigma = comfy_reshape_sigma(sigma, noise.ndim)
        if max_denoise:
            noise = noise * torch.sqrt(1.0 + sigma ** 2.0)
        else:
            noise = noise * sigma
        noise += latent_image
        return noise


class CONST:  # comfy.model_sampling.CONST.noise_scaling
    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        sigma = comfy_reshape_sigma(sigma, noise.ndim)
        return sigma * noise + (1.0 - sigma) * latent_image


class HostEps(EPS):
    """Stands in for a ComfyUI model_sampling object (duck typed, MRO contains EPS)."""


class HostFlow(CONST):
    """Stands in for a ComfyUI flow model_sampling object (MRO contains CONST)."""


def comfy_sample_euler_ancestral(model, x, sigmas, ms, seed, eta=1., s_noise=1.):
    if isinstance(ms, CONST):
        return comfy_sample_euler_ancestral_RF(model, x, sigmas, ms, seed, eta, s_noise)
    noise_sampler = comfy_default_noise_sampler(x, seed=seed)
    s_in = x.new_ones([x.shape[0]])
    xs = [x]
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, None)
        sigma_down, sigma_up = comfy_get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0:
            x = denoised
        else:
            d = comfy_to_d(x, sigmas[i], denoised)
            dt = sigma_down - sigmas[i]
            x = x + d * dt + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        xs.append(x)
    return xs


def comfy_sample_euler_ancestral_RF(model, x, sigmas, ms, seed, eta=1.0, s_noise=1.):  # noqa: N802
    noise_sampler = comfy_default_noise_sampler(x, seed=seed)
    s_in = x.new_ones([x.shape[0]])
    xs = [x]
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, None)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            downstep_ratio = 1 + (sigmas[i + 1] / sigmas[i] - 1) * eta
            sigma_down = sigmas[i + 1] * downstep_ratio
            alpha_ip1 = 1 - sigmas[i + 1]
            alpha_down = 1 - sigma_down
            renoise_coeff = (sigmas[i + 1]**2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2)**0.5
            sigma_down_i_ratio = sigma_down / sigmas[i]
            x = sigma_down_i_ratio * x + (1 - sigma_down_i_ratio) * denoised
            if eta > 0:
                x = (alpha_ip1 / alpha_down) * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise_coeff  # noqa: E501
        xs.append(x)
    return xs


def comfy_sample_lcm(model, x, sigmas, ms, seed):
    noise_sampler = comfy_default_noise_sampler(x, seed=seed)
    s_in = x.new_ones([x.shape[0]])
    xs = [x]
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, None)
        x = denoised
        if sigmas[i + 1] > 0:
            x = ms.noise_scaling(sigmas[i + 1], noise_sampler(sigmas[i], sigmas[i + 1]), x)
        xs.append(x)
    return xs


def comfy_sample_euler(model, x, sigmas, ms, seed):
    s_in = x.new_ones([x.shape[0]])
    xs = [x]
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i]
        denoised = model(x, sigma_hat * s_in, None)
        d = comfy_to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        x = x + d * dt
        xs.append(x)
    return xs


COMFY_LOOPS = {
    "renoise": comfy_sample_lcm,
    "euler_ancestral": comfy_sample_euler_ancestral,
    "euler_ancestral_rf": comfy_sample_euler_ancestral_RF,
    "euler": comfy_sample_euler,
}

CASES = [  # (policy, model sampling kind, sigmas)
    ("renoise", "eps", "dmd2"),
    ("renoise", "flow", "flow4"),
    ("euler_ancestral", "eps", "turbo_4"),
    ("euler_ancestral", "flow", "flow4_shift3"),  # ComfyUI dispatches to the RF sampler
    ("euler_ancestral_rf", "flow", "flow4_shift3"),
    ("euler", "eps", "lightning_4"),
    ("euler", "flow", "flow4"),
]


def _setup(kind, sigmas_name, sd):
    if kind == "eps":
        sigmas = few_step_sigmas(sd, sigmas_name)
        return sd, HostEps(), sigmas
    sigmas = flow_sigmas(4, shift=3.0) if sigmas_name == "flow4_shift3" else flow_sigmas(4)
    return FlowSchedule(), HostFlow(), sigmas


@pytest.mark.parametrize(("policy", "kind", "sigmas_name"), CASES)
@pytest.mark.parametrize("host", [False, True], ids=["pso_ms", "host_ms"])
def test_trajectory_is_bit_identical_to_comfyui_loop(policy, kind, sigmas_name, host, sd):
    ours, host_ms, sigmas = _setup(kind, sigmas_name, sd)
    ms = host_ms if host else ours
    x = start(ours, sigmas)
    traj = sample_trajectory(toy_denoiser, x, sigmas, None, ms, policy, gen(7))
    expected = COMFY_LOOPS[policy](toy_denoiser, x, sigmas, host_ms, seed=7)
    assert len(expected) == traj.num_steps + 1
    for n, xn in enumerate(expected):
        assert torch.equal(traj.latents[:, n], xn), f"step {n} differs"


@pytest.mark.parametrize(("policy", "kind", "sigmas_name"), CASES)
def test_latents_equal_mean_plus_std_times_noise_exactly(policy, kind, sigmas_name, sd):
    ms, _, sigmas = _setup(kind, sigmas_name, sd)
    traj = sample_trajectory(toy_denoiser, start(ms, sigmas), sigmas, None, ms, policy, gen(3))
    for n in range(traj.num_steps):
        rebuilt = traj.mean[:, n] + traj.std[n] * traj.noise[:, n]  # docs/design.md's form
        assert torch.equal(traj.latents[:, n + 1], rebuilt), f"step {n}"
        comfy_order = traj.mean[:, n] + traj.noise[:, n] * traj.std[n]  # the order ComfyUI uses
        assert torch.equal(traj.latents[:, n + 1], comfy_order)


def test_float64_latents_stay_bit_identical_to_comfyui(sd):
    sigmas = few_step_sigmas(sd, "turbo_4")
    x = start(sd, sigmas, dtype=torch.float64)
    traj = sample_trajectory(toy_denoiser, x, sigmas, None, sd, "euler_ancestral", gen(5))
    expected = comfy_sample_euler_ancestral(toy_denoiser, x, sigmas, HostEps(), seed=5)
    assert traj.latents.dtype == torch.float64
    for n, xn in enumerate(expected):
        assert torch.equal(traj.latents[:, n], xn), f"step {n}"


def test_reduced_precision_latents_are_refused_with_the_fix(sd):
    sigmas = few_step_sigmas(sd, "turbo_4")
    x = start(sd, sigmas).bfloat16()
    with pytest.raises(ValueError, match=r"float32 or float64 latent, got torch.bfloat16.*Pass x.float\(\)"):
        sample_trajectory(toy_denoiser, x, sigmas, None, sd, "euler_ancestral", gen(5))


def test_euler_ancestral_on_a_flow_model_records_the_rf_policy():
    ms = FlowSchedule()
    sigmas = flow_sigmas(3)
    traj = sample_trajectory(toy_denoiser, start(ms, sigmas), sigmas, None, ms, "euler_ancestral", gen(0))
    assert traj.policy == "euler_ancestral_rf"


# ------------------------------------------------------------------ noise draws and determinism
def test_noise_is_drawn_once_per_stochastic_step_and_not_on_the_last(sd):
    sigmas = few_step_sigmas(sd, "dmd2")  # 4 steps: draws at steps 0, 1, 2 only
    g = gen(11)
    traj = sample_trajectory(toy_denoiser, start(sd, sigmas), sigmas, None, sd, "renoise", g)
    ref = gen(11)
    draws = [torch.randn(SHAPE, generator=ref) for _ in range(3)]
    for n in range(3):
        assert torch.equal(traj.noise[:, n], draws[n])
    assert torch.equal(traj.noise[:, 3], torch.zeros(SHAPE))
    assert traj.std[3].item() == 0.0
    # the generator was advanced by exactly three draws
    assert torch.equal(torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=ref))


def test_same_seed_same_trajectory_other_seed_different(sd):
    sigmas = few_step_sigmas(sd, "turbo_4")
    x = start(sd, sigmas)
    a = sample_trajectory(toy_denoiser, x, sigmas, None, sd, "euler_ancestral", gen(1))
    b = sample_trajectory(toy_denoiser, x, sigmas, None, sd, "euler_ancestral", gen(1))
    c = sample_trajectory(toy_denoiser, x, sigmas, None, sd, "euler_ancestral", gen(2))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.noise, b.noise)
    assert not torch.allclose(a.final, c.final)


def test_deterministic_policy_needs_no_generator_and_stochastic_one_does(sd):
    sigmas = few_step_sigmas(sd, "lightning_4")
    x = start(sd, sigmas)
    traj = sample_trajectory(toy_denoiser, x, sigmas, None, sd, "euler", None)
    assert traj.stochastic_steps() == [] and torch.equal(traj.noise, torch.zeros_like(traj.noise))
    with pytest.raises(ValueError, match=r"'renoise' draws noise at step 0: pass a torch.Generator"):
        sample_trajectory(toy_denoiser, x, sigmas, None, sd, "renoise", None)


# ------------------------------------------------------------------ gradients on / off
class Shifted(torch.nn.Module):
    """x0 = toy(x) + theta: d x0 / d theta = 1 everywhere."""

    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(0.1))

    def forward(self, x, sigma, cond):
        return toy_denoiser(x, sigma, cond) + self.theta


def test_sampling_records_no_graph_unless_asked(sd):
    model = Shifted()
    sigmas = few_step_sigmas(sd, "dmd2")
    x = start(sd, sigmas)
    off = sample_trajectory(model, x, sigmas, None, sd, "renoise", gen(0))
    assert not off.latents.requires_grad and not off.x0.requires_grad
    on = sample_trajectory(model, x, sigmas, None, sd, "renoise", gen(0), grad=True)
    assert on.final.requires_grad
    on.final.sum().backward()
    # renoise's final sample is x0 = toy(x_3) + theta: d sum / d theta >= numel (chain adds more)
    assert model.theta.grad is not None and model.theta.grad.item() > 0
    assert torch.equal(on.latents.detach(), off.latents)


def test_log_prob_gradient_matches_the_closed_form(sd):
    # renoise: mean = x0 = toy + theta, so
    # d/dtheta mean_elem log N(x'; mean, s^2) = mean_elem (x' - mean) / s^2
    model = Shifted()
    sigmas = few_step_sigmas(sd, "dmd2")
    traj = sample_trajectory(model, start(sd, sigmas), sigmas, None, sd, "renoise", gen(4))
    with torch.no_grad():
        model.theta.fill_(0.3)  # score the recorded samples under a different model
    lp = transition_log_probs(model, traj, None, sd)
    assert lp.shape == (SHAPE[0], 3)
    lp.sum().backward()
    expected = 0.0
    for n in range(3):
        mean = toy_denoiser(traj.latents[:, n], sigmas[n] * torch.ones(SHAPE[0]), None) + 0.3
        expected += ((traj.latents[:, n + 1] - mean) / traj.std[n] ** 2).flatten(1).mean(1).sum()
    assert model.theta.grad.item() == pytest.approx(expected.item(), rel=1e-4)
    # moving theta towards 0.1 (the sampling model) raises the likelihood: the gradient is negative
    assert model.theta.grad.item() < 0


def test_transition_log_probs_no_grad_when_asked(sd):
    sigmas = few_step_sigmas(sd, "dmd2")
    model = Shifted()
    traj = sample_trajectory(model, start(sd, sigmas), sigmas, None, sd, "renoise", gen(4))
    assert not transition_log_probs(model, traj, None, sd, grad=False).requires_grad


# ------------------------------------------------------------------ Eq. 4 marginals
@pytest.mark.parametrize(("policy", "flow"), [("renoise", False), ("euler_ancestral", False),
                                              ("renoise", True), ("euler_ancestral_rf", True)])
def test_perfect_x0_predictor_reproduces_forward_marginals(policy, flow, sd):
    # With f(x) = x0 exactly, every latent at level s is x0 + s n (eps) / (1 - s) x0 + s n (flow).
    # 4096 x 1 x 2 x 2 = 16384 standardised residuals per level: the sample mean has standard error
    # 1/128 = 0.0078 and the sample std about 1/sqrt(2 * 16384) = 0.0055; we allow 4 standard errors.
    x0 = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 1, 2, 2).expand(4096, 1, 2, 2).contiguous()
    ms = FlowSchedule() if flow else sd
    sigmas = flow_sigmas(4, shift=3.0) if flow else few_step_sigmas(sd, "dmd2")
    noise = torch.randn(x0.shape, generator=gen(21))
    x = initial_latent(ms, sigmas, noise, latent_image=x0, max_denoise=False)
    traj = sample_trajectory(lambda x, s, c: x0, x, sigmas, None, ms, policy, gen(22))
    for n in range(traj.num_steps):
        s = sigmas[n].item()
        scale = (1 - s) if flow else 1.0
        r = (traj.latents[:, n] - scale * x0) / s
        assert abs(r.mean().item()) < 4 * 0.0078, (n, r.mean().item())
        assert abs(r.std().item() - 1.0) < 4 * 0.0055, (n, r.std().item())
    assert torch.allclose(traj.final, x0)


# ------------------------------------------------------------------ single steps by hand
def test_euler_ancestral_step_hand_computed(sd):
    sigma, sigma_next = torch.tensor(2.0), torch.tensor(1.0)
    down, up = ancestral_sigmas(sigma, sigma_next)
    # sigma_up = min(1, sqrt(1 * (4 - 1) / 4)) = sqrt(3)/2; sigma_down = sqrt(1 - 3/4) = 1/2.
    # (Appendix A.2 as printed would give a drift target sqrt(3)/2 and noise sqrt(1 - 4): imaginary.)
    assert up.item() == pytest.approx(math.sqrt(3) / 2) and down.item() == pytest.approx(0.5)
    x, x0 = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.2, 0.0]])
    mean, std = euler_ancestral_step(x, x0, sigma, sigma_next, sd)
    # d = (x - x0) / 2 = [0.4, -0.5]; mean = x + d (0.5 - 2) = [0.4, -0.25]
    assert mean.flatten().tolist() == pytest.approx([0.4, -0.25])
    assert std.item() == pytest.approx(math.sqrt(3) / 2)
    mean0, std0 = euler_ancestral_step(x, x0, sigma, torch.tensor(0.0), sd)
    assert torch.equal(mean0, x0) and std0.item() == 0.0


def test_euler_ancestral_rf_step_hand_computed():
    # s = 0.8 -> 0.4: sigma_down = 0.2, a = 0.6, a_down = 0.8, r = 0.25,
    # std = sqrt(0.16 - 0.04 * 0.36 / 0.64) = sqrt(0.1375); mean = 0.75 (0.25 x + 0.75 x0)
    x, x0 = torch.tensor([[1.0]]), torch.tensor([[0.2]])
    mean, std = euler_ancestral_rf_step(x, x0, torch.tensor(0.8), torch.tensor(0.4), FlowSchedule())
    assert mean.item() == pytest.approx(0.3, rel=1e-6)
    assert std.item() == pytest.approx(math.sqrt(0.1375), rel=1e-6)


def test_renoise_step_hand_computed(sd):
    x, x0 = torch.tensor([[9.0]]), torch.tensor([[0.5]])
    mean, std = renoise_step(x, x0, torch.tensor(2.0), torch.tensor(0.7), sd)
    assert mean.item() == 0.5 and std.item() == pytest.approx(0.7)
    mean, std = renoise_step(x, x0, torch.tensor(0.9), torch.tensor(0.4), FlowSchedule())
    assert mean.item() == pytest.approx(0.3) and std.item() == pytest.approx(0.4)


# ------------------------------------------------------------------ log-probabilities
@pytest.mark.parametrize(("policy", "sigmas_name"), [("renoise", "dmd2"), ("euler_ancestral", "turbo_4")])
def test_log_probs_equal_an_independent_gaussian_density(policy, sigmas_name, sd):
    sigmas = few_step_sigmas(sd, sigmas_name)
    traj = sample_trajectory(toy_denoiser, start(sd, sigmas), sigmas, None, sd, policy, gen(9))
    lp = transition_log_probs(toy_denoiser, traj, None, sd)
    assert traj.stochastic_steps() == [0, 1, 2] and lp.shape == (SHAPE[0], 3)
    for t, n in enumerate([0, 1, 2]):
        normal = torch.distributions.Normal(traj.mean[:, n].double(), traj.std[n].double())
        expected = normal.log_prob(traj.latents[:, n + 1].double()).flatten(1).mean(1)
        torch.testing.assert_close(lp[:, t].double(), expected, rtol=1e-5, atol=1e-5)
        # and in closed form through the recorded noise: mean(-z^2/2) - log std - log(2 pi)/2
        const = math.log(traj.std[n]) + 0.5 * math.log(2 * math.pi)
        closed = (-0.5 * traj.noise[:, n] ** 2).flatten(1).mean(1) - const
        torch.testing.assert_close(lp[:, t], closed, rtol=1e-5, atol=1e-5)


def test_gaussian_log_prob_is_a_per_element_mean():
    x = torch.zeros(2, 3, 4)
    lp = gaussian_log_prob(x, torch.zeros_like(x), torch.tensor(1.0))
    assert lp.shape == (2,)
    assert lp.tolist() == pytest.approx([-0.5 * math.log(2 * math.pi)] * 2)
    lp2 = gaussian_log_prob(torch.ones(2, 2), torch.zeros(2, 2), torch.tensor([1.0, 2.0]))
    assert lp2.tolist() == pytest.approx([-0.5 - 0.5 * math.log(2 * math.pi),
                                          -0.125 - math.log(2.0) - 0.5 * math.log(2 * math.pi)])
    with pytest.raises(ValueError, match=r"std must be > 0.*\[0\.0\]"):
        gaussian_log_prob(x, x, torch.tensor(0.0))


def test_deterministic_policy_is_refused_naming_the_equations(sd):
    sigmas = few_step_sigmas(sd, "lightning_4")
    traj = sample_trajectory(toy_denoiser, start(sd, sigmas), sigmas, None, sd, "euler", None)
    with pytest.raises(ValueError, match=r"'euler' is deterministic.*Eq\. 5.*Eq\. 7.*Offline PSO \(Eq\. 6\)"):
        transition_log_probs(toy_denoiser, traj, None, sd)


def test_final_deterministic_step_cannot_be_scored(sd):
    sigmas = few_step_sigmas(sd, "dmd2")
    traj = sample_trajectory(toy_denoiser, start(sd, sigmas), sigmas, None, sd, "renoise", gen(0))
    with pytest.raises(ValueError, match=r"step 3 has no log-probability.*\[0, 1, 2\]"):
        transition_log_probs(toy_denoiser, traj, None, sd, steps=[1, 3])
    one = few_step_sigmas(sd, "turbo_1")
    traj1 = sample_trajectory(toy_denoiser, start(sd, one), one, None, sd, "euler_ancestral", gen(0))
    with pytest.raises(ValueError, match=r"no transitions to score.*N=1"):
        transition_log_probs(toy_denoiser, traj1, None, sd)


# ------------------------------------------------------------------ policies registry
def test_policy_registry_flags_and_errors(sd):
    assert {k: p.stochastic for k, p in POLICIES.items()} == {
        "renoise": True, "euler_ancestral": True, "euler_ancestral_rf": True, "euler": False}
    names = r"\['euler', 'euler_ancestral', 'euler_ancestral_rf', 'renoise'\]"
    with pytest.raises(ValueError, match=r"'ddim'.*" + names):
        get_policy("ddim")
    rf_msg = r"'euler_ancestral_rf' is for rectified-flow.*use 'euler_ancestral'"
    with pytest.raises(ValueError, match=rf_msg):
        get_policy("euler_ancestral_rf", sd)
    assert get_policy("euler_ancestral", HostFlow()).name == "euler_ancestral_rf"


# ------------------------------------------------------------------ initial latent
def test_initial_latent_scales_noise_as_ksampler(sd):
    noise = torch.ones(1, 1, 1, 2)
    full = few_step_sigmas(sd, "dmd2")  # starts at sigma_max: max_denoise -> sqrt(1 + s^2)
    assert is_max_denoise(sd, full)
    s = full[0].item()
    assert initial_latent(sd, full, noise).flatten().tolist() == pytest.approx([math.sqrt(1 + s * s)] * 2)
    one = few_step_sigmas(sd, "dmd2_1")  # t = 399 < 999: ComfyUI scales by sigma only
    assert not is_max_denoise(sd, one)
    assert initial_latent(sd, one, noise).flatten().tolist() == pytest.approx([one[0].item()] * 2)
    forced = initial_latent(sd, one, noise, max_denoise=True)
    assert forced.flatten().tolist() == pytest.approx([math.sqrt(1 + one[0].item() ** 2)] * 2)
    latent = torch.full((1, 1, 1, 2), 3.0)
    flow = initial_latent(FlowSchedule(), torch.tensor([0.5, 0.0]), noise, latent)
    assert flow.flatten().tolist() == pytest.approx([0.5 + 1.5] * 2)


# ------------------------------------------------------------------ Trajectory helpers
def _traj(sd, seed=0):
    sigmas = few_step_sigmas(sd, "dmd2")
    return sample_trajectory(toy_denoiser, start(sd, sigmas), sigmas, None, sd, "renoise", gen(seed))


def test_trajectory_shapes_and_helpers(sd):
    traj = _traj(sd)
    assert traj.latents.shape == (3, 5, 2, 2, 2) and traj.x0.shape == (3, 4, 2, 2, 2)
    assert traj.std.shape == (4,) and traj.stochastic_steps() == [0, 1, 2]
    assert torch.equal(traj.final, traj.latents[:, 4])
    one = traj.select(-1)
    assert one.batch_size == 1 and torch.equal(one.latents[0], traj.latents[2])
    two = traj.select([2, 0])
    assert torch.equal(two.mean[1], traj.mean[0]) and torch.equal(two.sigmas, traj.sigmas)
    assert traj.to("cpu").detach().latents.data_ptr() == traj.latents.data_ptr()
    with pytest.raises(IndexError, match=r"batch index 3 out of range for batch size 3"):
        traj.select(3)


def test_a_recorded_run_rebuilds_the_trajectory_that_made_it(sd):
    """recorded_trajectory (what host sampling records) gives back the Trajectory of the run it saw, bit for
    bit, and refuses a run that is not the policy's."""
    traj = _traj(sd, seed=4)
    n = traj.num_steps
    x = [traj.latents[:, i] for i in range(n)]
    x0 = [traj.x0[:, i] for i in range(n)]
    noise = {i: traj.noise[:, i] for i in traj.stochastic_steps()}
    got = recorded_trajectory(x, x0, noise, traj.final, traj.sigmas, sd, "renoise")
    for name in ("sigmas", "latents", "x0", "noise", "mean", "std"):
        assert torch.equal(getattr(got, name), getattr(traj, name)), name
    assert got.policy == traj.policy
    with pytest.raises(RuntimeError, match=r"did not report steps \[1\] of 4 \(final latent present\)"):
        recorded_trajectory([x[0], None, *x[2:]], x0, noise, traj.final, traj.sigmas, sd, "renoise")
    with pytest.raises(RuntimeError, match="at step 0 .* sampler drew no noise but policy 'renoise'"):
        recorded_trajectory(x, x0, {k: v for k, v in noise.items() if k}, traj.final, traj.sigmas, sd,
                            "renoise")


def test_trajectory_shape_mismatch_is_named(sd):
    traj = _traj(sd)
    msg = r"Trajectory.x0 has shape \(3, 3, 2, 2, 2\), expected \(3, 4, 2, 2, 2\)"
    with pytest.raises(ValueError, match=msg):
        Trajectory(traj.sigmas, traj.latents, traj.x0[:, :3], traj.noise, traj.mean, traj.std, "renoise")


def test_state_dict_round_trips_through_safetensors(sd, tmp_path):
    traj = _traj(sd, seed=5)
    state = traj.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    meta = {k: v for k, v in state.items() if isinstance(v, str)}
    assert meta == {"policy": "renoise", "format": "pso.trajectory/1"}
    path = tmp_path / "traj.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    with safetensors.safe_open(str(path), "pt") as f:
        meta_back = f.metadata()
    loaded = safetensors.torch.load_file(str(path))
    back = Trajectory.from_state_dict({**loaded, **meta_back})
    for name in ("sigmas", "latents", "x0", "noise", "mean", "std"):
        assert torch.equal(getattr(back, name), getattr(traj, name))
    assert back.policy == "renoise"
    with pytest.raises(KeyError, match=r"missing \['policy'\]"):
        Trajectory.from_state_dict(loaded)

