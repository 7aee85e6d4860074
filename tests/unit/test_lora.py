"""Facts about pso.lora: a fresh adapter is a no-op, hooks and weight deltas agree, the base model
is never modified, files round-trip, and gradients go where they should."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.func import functional_call

from pso.lora import TARGETS, LoRAConfig, LoRANetwork, enable_gradient_checkpointing


class OpsLinear(nn.Linear):
    """Stands for ComfyUI's ``comfy.ops.*.Linear``, which subclasses nn.Linear."""


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.to_q, self.to_k, self.to_v = OpsLinear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x):
        w = torch.softmax(self.to_q(x) @ self.to_k(x).transpose(1, 2), dim=-1)
        return self.to_out(w @ self.to_v(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, 2 * dim)
        self.net = nn.ModuleList([proj, nn.Dropout(0.0), nn.Linear(2 * dim, dim)])

    def forward(self, x):
        return self.net[2](torch.nn.functional.gelu(self.net[0].proj(x)))


class Tiny(nn.Module):
    """x (B, 3, 8, 8) -> (B, 16, 8): convs (one with reflect padding, one grouped), attention, MLP."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="reflect")
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.attn1 = Attention(8)
        self.ff = FeedForward(8)

    def forward(self, x):
        h = self.grouped(self.conv2(torch.relu(self.conv1(x))))
        t = h.flatten(2).transpose(1, 2)
        t = t + self.attn1(t)
        return t + self.ff(t)


def make_model(seed: int = 0) -> Tiny:
    g = torch.Generator().manual_seed(seed)
    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def randomise_up(net: LoRANetwork, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.up.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture
def x():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))


def new_net(model, target="all", rank=3, seed=0, **kw) -> LoRANetwork:
    return LoRANetwork.for_module(model, LoRAConfig(rank=rank, target=target, **kw),
                                  torch.Generator().manual_seed(seed))


def test_targets_select_expected_modules():
    model = make_model()
    attn = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"]
    assert list(new_net(model, "attention").paths) == attn
    assert list(new_net(model, "attention_mlp").paths) == attn + ["ff.net.0.proj", "ff.net.2"]
    assert "conv1" not in new_net(model, "all_linear").paths
    # groups=2 is not a rank-r product: "all" takes every Linear and Conv2d but the grouped one.
    assert set(new_net(model, "all").paths) == {"conv1", "conv2", *attn, "ff.net.0.proj", "ff.net.2"}


def test_fresh_adapter_leaves_outputs_bit_identical(x):
    model = make_model()
    base = model(x)
    net = new_net(model)
    assert all(torch.count_nonzero(p) == 0 for p in net.up.values())
    assert all(torch.count_nonzero(p) > 0 for p in net.down.values())
    with net.attach(model):
        assert torch.equal(model(x), base)


def test_hook_equals_merged_weights_and_weight_patch(x):
    model = make_model()
    base = model(x)
    net = new_net(model, alpha=1.5)
    randomise_up(net)
    net.set_multiplier(0.7)
    with net.attach(model):
        hooked = model(x)
    assert (hooked - base).abs().max() > 1e-2  # the adapter does something

    merged = copy.deepcopy(model)
    with torch.no_grad():
        for path in net.paths:
            merged.get_submodule(path).weight += net.delta_weight(path)
    torch.testing.assert_close(merged(x), hooked, atol=1e-5, rtol=0)

    # The ComfyUI way: a weight function applied to the cast weight at call time.
    patched = {f"{p}.weight": net.weight_patch(p)(model.get_submodule(p).weight) for p in net.paths}
    torch.testing.assert_close(functional_call(model, patched, (x,)), hooked, atol=1e-5, rtol=0)
    with net.disabled():
        w = model.conv1.weight
        assert net.weight_patch("conv1")(w) is w


def test_delta_weight_layout_scale_and_dtype():
    model = make_model()
    net = new_net(model, rank=2, alpha=4.0)
    randomise_up(net)
    down, up = net.lora_down("conv1"), net.lora_up("conv1")
    assert down.shape == (2, 3, 3, 3) and up.shape == (8, 2, 1, 1)
    expected = 2.0 * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    torch.testing.assert_close(net.delta_weight("conv1"), expected)
    model.half()
    assert net.delta_weight("conv1").dtype == torch.float16


def test_disabled_and_zero_multiplier_restore_base_exactly(x):
    model = make_model()
    base = model(x)
    net = new_net(model)
    randomise_up(net)
    with net.attach(model):
        adapted = model(x)
        with net.disabled():
            assert torch.equal(model(x), base)
        assert torch.equal(model(x), adapted)
        net.set_multiplier(0.0)
        assert torch.equal(model(x), base)


def test_attach_and_remove_leave_module_unchanged(x):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    model.conv1.weight.requires_grad_(False)
    flags["conv1.weight"] = False
    base = model(x)
    net = new_net(model)
    randomise_up(net)
    handle = net.attach(model)
    with pytest.raises(RuntimeError, match="already attached"):
        net.attach(model)
    assert list(model.state_dict()) == list(before)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    handle.remove()
    handle.remove()  # idempotent
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(model(x), base)
    net.attach(model).remove()  # attachable again after removal


def test_attach_refuses_another_model():
    net = new_net(make_model(), "attention")
    with pytest.raises(ValueError, match="attn1.to_q"):
        net.attach(nn.Sequential(nn.Linear(8, 8)))


def test_kohya_export_import_round_trip(x):
    model = make_model()
    net = new_net(model, alpha=2.0)
    randomise_up(net)
    with net.attach(model):
        expected = model(x)
    key_fn = lambda p: "lora_unet_" + p.replace(".", "_")  # noqa: E731
    sd = net.lora_state_dict(key_fn)
    assert sd["lora_unet_conv1.lora_down.weight"].shape == (3, 3, 3, 3)
    assert sd["lora_unet_conv1.lora_up.weight"].shape == (8, 3, 1, 1)
    assert sd["lora_unet_attn1_to_q.lora_down.weight"].shape == (3, 8)
    assert sd["lora_unet_attn1_to_q.alpha"].ndim == 0 and float(sd["lora_unet_attn1_to_q.alpha"]) == 2.0

    other = new_net(model, seed=5)  # different down, alpha 3 (= rank)
    other.load_lora_state_dict(sd, key_fn)
    with other.attach(model):
        assert torch.equal(model(x), expected)

    broken = dict(sd)
    del broken["lora_unet_conv2.lora_up.weight"]
    broken["lora_unet_bogus.lora_up.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        other.load_lora_state_dict(broken, key_fn)
    assert "lora_unet_conv2.lora_up.weight" in str(err.value) and "lora_unet_bogus" in str(err.value)

    with pytest.raises(ValueError, match=r"LoRAConfig\(rank=3\)"):
        new_net(model, rank=2).load_lora_state_dict(sd, key_fn)


def test_missing_alpha_means_scale_one():
    model = make_model()
    net = new_net(model, "attention", rank=4, alpha=1.0)
    sd = {k: v for k, v in net.lora_state_dict().items() if not k.endswith(".alpha")}
    net.load_lora_state_dict(sd)
    assert net.scale("attn1.to_q") == 1.0


def test_gradients_reach_only_lora_parameters(x):
    model = make_model()
    model.requires_grad_(False)
    net = new_net(model)
    randomise_up(net)
    with net.attach(model):
        model(x).square().mean().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in net.named_lora_parameters())


def test_zero_up_means_only_up_learns_first(x):
    model = make_model()
    model.requires_grad_(False)
    net = new_net(model)
    with net.attach(model):
        model(x).square().mean().backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in net.down.values())
    assert all(torch.count_nonzero(p.grad) > 0 for p in net.up.values())


def _grads(model, net, x, checkpoint: bool, dropout_seed: int | None = None):
    net.zero_grad(set_to_none=True)
    generators = ()
    if dropout_seed is not None:
        net.dropout_generator = torch.Generator().manual_seed(dropout_seed)
        generators = (net.dropout_generator,)
    handle = None
    if checkpoint:
        handle = enable_gradient_checkpointing(model, lambda p, m: p in ("attn1", "ff"), generators)
    with net.attach(model):
        model(x).square().mean().backward()
    if handle is not None:
        handle.remove()
    return {k: p.grad.clone() for k, p in net.named_lora_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradient_checkpointing_gives_identical_gradients(x, dropout):
    model = make_model()
    model.requires_grad_(False)
    net = new_net(model, dropout=dropout)
    randomise_up(net)
    seed = 3 if dropout else None
    plain = _grads(model, net, x, checkpoint=False, dropout_seed=seed)
    calls = []
    model.attn1.register_forward_pre_hook(lambda m, a: calls.append(1))
    checked = _grads(model, net, x, checkpoint=True, dropout_seed=seed)
    assert len(calls) == 1  # hooks run once; the recomputation happens inside forward
    assert plain.keys() == checked.keys()
    for k in plain:
        assert torch.equal(plain[k], checked[k]), k
    assert "forward" not in model.attn1.__dict__ and "forward" not in model.ff.__dict__


def test_gradient_checkpointing_recomputes_forward(x):
    model = make_model()
    counter = []
    original = model.ff.forward
    model.ff.forward = lambda t: (counter.append(1), original(t))[1]
    handle = enable_gradient_checkpointing(model, lambda p, m: p == "ff")
    model(x).sum().backward()
    assert len(counter) == 2  # forward, then recomputation in backward
    handle.remove()
    assert model.ff.forward.__name__ == "<lambda>"  # the previous instance attribute is back


def test_dropout_without_generator_is_an_error(x):
    model = make_model()
    net = new_net(model, dropout=0.1)
    randomise_up(net)
    with net.attach(model), pytest.raises(RuntimeError, match="dropout_generator"):
        model(x)
    net.eval()
    with net.attach(model):
        model(x)  # no dropout in eval mode
    with pytest.raises(ValueError, match="weight patches cannot drop inputs"):
        net.weight_patch("conv1")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rank": 0}, "rank=0"),
    ({"alpha": -1.0}, "alpha=-1.0"),
    ({"target": "unet"}, str(sorted(TARGETS))),
    ({"dropout": 1.0}, "dropout=1.0 must be in [0, 1)"),
    ({"init": "xavier"}, "init='xavier'"),
])
def test_config_errors_name_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LoRAConfig(**kwargs)


def test_target_matching_nothing_names_alternatives():
    with pytest.raises(ValueError, match="matched no module"):
        new_net(nn.Sequential(nn.Linear(2, 2)), "attention")


def test_frozen_denoiser_is_the_base_model_without_gradients():
    from pso.lora import LoRAConfig, LoRANetwork, frozen_denoiser

    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    net = LoRANetwork.for_module(model, LoRAConfig(rank=2, target="all"), torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(torch.ones(1, 3)).clone()
        for _, p in net.named_lora_parameters():
            p.fill_(0.5)
    net.attach(model)
    x = torch.ones(1, 3)
    frozen = frozen_denoiser(lambda x, s, c: model(x), net)
    out = frozen(x, None, None)
    assert torch.equal(out, base) and not out.requires_grad
    assert not torch.equal(model(x), base) and net.enabled  # the adapter is back on afterwards


class Int8Linear(nn.Module):
    """A quantized linear layer as hosts build them (ComfyUI 0.33's mixed-precision Linear): not an
    nn.Linear, an int8 weight plus a scale, dequantised in forward. Its weight takes no delta."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.detach().abs().max() / 127
        self.weight = nn.Parameter(torch.round(linear.weight.detach() / scale).to(torch.int8),
                                   requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return nn.functional.linear(x, self.weight.float() * self.scale, self.bias)


def test_quantized_linear_layers_are_adapted_in_hook_mode_and_train():
    """Bypass mode for quantized layers: pso.lora finds linear-like layers that are not nn.Linear, and
    its forward hooks add scale * up(down(x)) to their output, with gradients to down and up only."""
    torch.manual_seed(0)
    model = nn.Sequential(Int8Linear(nn.Linear(8, 16)), nn.GELU(), Int8Linear(nn.Linear(16, 4)))
    x = torch.randn(5, 8)
    base = model(x)
    net = LoRANetwork.for_module(model, LoRAConfig(rank=2, target="all"), torch.Generator().manual_seed(0))
    assert list(net.paths) == ["0", "2"]
    randomise_up(net)
    handle = net.attach(model)
    out = model(x)
    handle.remove()
    first = model[0](x) + net._scale_tensor("0") * nn.functional.linear(
        nn.functional.linear(x, net.lora_down("0")), net.lora_up("0"))
    second = model[2](nn.functional.gelu(first))
    expected = second + net._scale_tensor("2") * nn.functional.linear(
        nn.functional.linear(nn.functional.gelu(first), net.lora_down("2")), net.lora_up("2"))
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, base)
    handle = net.attach(model)
    model(x).square().mean().backward()
    handle.remove()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model(x), base), "removing the hooks restores the layer exactly"
