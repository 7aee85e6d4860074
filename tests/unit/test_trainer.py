"""Facts about pso.trainer: bitwise-exact resume, the NaN guard, gradient accumulation, warm-up,
clipping, reference-refresh timing, the moving average of the adapter and the errors a user can meet."""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import pso.io as pio
from pso.lora import LoRAConfig, LoRANetwork
from pso.trainer import NonFiniteLossError, StopTraining, TrainConfig, Trainer, ema_decay_at


@dataclass
class Out:
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Interrupt(Exception):
    """Stands for ComfyUI's InterruptProcessingException raised from a progress callback."""


class RefPool:
    """What a reference-refresh owner looks like: state filled by refresh_fn, checkpointed."""

    def __init__(self):
        self.offset = torch.zeros(2)

    def refresh(self, step, gen):
        self.offset = torch.randn(2, generator=gen) * 0.1

    def state_dict(self):
        return {"offset": self.offset.clone()}

    def load_state_dict(self, sd):
        self.offset = sd["offset"].clone()


class Setup:
    """A frozen 4 -> 8 -> 2 regression MLP with a rank-2 LoRA; the loss uses generator draws."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.model.requires_grad_(False)
        self.net = LoRANetwork.for_module(self.model, LoRAConfig(rank=2, target="all_linear"), g)
        self.handle = self.net.attach(self.model)
        self.w_true = torch.randn(4, 2, generator=g)
        self.pool = RefPool()
        self.calls = 0

    def batch_source(self, step, gen):
        return torch.randn(6, 4, generator=gen)

    def step_fn(self, x, gen):
        self.calls += 1
        y = torch.tanh(x @ self.w_true) + 0.1 * torch.randn(x.shape[0], 2, generator=gen) + self.pool.offset
        err = (self.model(x) - y).square().mean(dim=1)
        return Out(err, {"err_max": float(err.detach().max())})

    def trainer(self, config, **kw):
        return Trainer(self.net, self.step_fn, self.batch_source, config, **kw)


def cfg(**kw) -> TrainConfig:
    base = {"steps": 8, "lr": 0.05, "max_grad_norm": 1.0, "warmup_steps": 2, "seed": 11}
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("where", ["callback", "mid_step"])
def test_interrupted_and_resumed_run_repeats_the_loss_sequence_bitwise(tmp_path, where):
    """Interrupt after step 5 (callback) or inside step 6 after its batch drew from the generator."""
    settings = {"ref_refresh_every": 3, "checkpoint_every": 3, "keep_checkpoints": 2, "warmup_steps": 7}
    a = Setup()
    full = a.trainer(cfg(checkpoint_dir=str(tmp_path / "a"), **settings),
                     refresh_fn=a.pool.refresh, stateful={"refs": a.pool}).train()

    b = Setup()

    def stop_at_5(event):
        if where == "callback" and event.phase == "step" and event.step == 5:
            raise Interrupt("cancelled")

    def step_fn(x, gen):
        if where == "mid_step" and b.calls == 5:
            raise Interrupt("cancelled")
        return b.step_fn(x, gen)

    run_dir = tmp_path / "b"
    with pytest.raises(Interrupt):
        Trainer(b.net, step_fn, b.batch_source, cfg(checkpoint_dir=str(run_dir), **settings),
                callback=stop_at_5, refresh_fn=b.pool.refresh, stateful={"refs": b.pool}).train()
    assert pio.latest_checkpoint(run_dir).name == "step_000005"  # saved on the way out

    c = Setup()
    resumed = c.trainer(cfg(checkpoint_dir=str(run_dir), **settings),
                        refresh_fn=c.pool.refresh, stateful={"refs": c.pool}).train(resume_from=run_dir)
    assert len(full.loss_history) == 8
    assert resumed.loss_history == full.loss_history  # float equality: bit for bit
    assert resumed.metrics_history == full.metrics_history
    assert resumed.final_step == 8 and not resumed.interrupted
    assert all(torch.equal(p, q) for p, q in zip(a.net.parameters(), c.net.parameters(), strict=True))
    # Resuming at step 5 runs steps 6..8 only.
    assert c.calls == 3


def test_resume_without_the_generator_state_would_differ(tmp_path):
    """Guards the test above: the loss really depends on the trainer's generator."""
    a, b = Setup(), Setup()
    first = a.trainer(cfg(steps=3)).train().loss_history
    second = b.trainer(cfg(steps=3, seed=12)).train().loss_history
    assert first != second


def test_stop_training_returns_an_interrupted_result_and_checkpoint(tmp_path):
    s = Setup()

    def stop_at_2(event):
        if event.step == 2:
            raise StopTraining

    result = s.trainer(cfg(checkpoint_dir=str(tmp_path)), callback=stop_at_2).train()
    assert result.interrupted and result.final_step == 2 and len(result.loss_history) == 2
    assert result.last_checkpoint == tmp_path / "step_000002"
    assert pio.load_checkpoint(tmp_path).state["step"] == 2


def test_nan_loss_keeps_the_newest_weights_whose_forward_was_finite(tmp_path):
    """The loss of step 5 is NaN: the weights after step 4 produced it, so they are not good; the
    weights after step 3 gave step 4 a finite loss. Those are put back (equal to a clean 3-step run),
    the step-4 checkpoint is set aside and step 2's is the newest on disk."""
    s = Setup()
    inner = s.step_fn

    def poisoned(x, gen):
        out = inner(x, gen)
        return Out(out.loss * float("nan"), out.metrics) if s.calls == 5 else out

    trainer = Trainer(s.net, poisoned, s.batch_source, cfg(checkpoint_dir=str(tmp_path), checkpoint_every=2))
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train()
    msg = str(err.value)
    assert "step 5 of 8" in msg and "nan" in msg and "max_grad_norm" not in msg
    assert "lower the learning rate" in msg and "the weights after step 3" in msg
    assert err.value.step == 5 and err.value.good_step == 3 and err.value.bad_inputs == ()
    result = err.value.result
    assert result.final_step == 3 and len(result.loss_history) == 3 and result.stopped_reason == msg
    newest = pio.latest_checkpoint(tmp_path)
    assert newest.name == "step_000002" and err.value.last_checkpoint == newest
    assert [p.name.split("_step_")[0] for p in tmp_path.iterdir() if p.name.startswith(".")] == [".nonfinite"]
    ckpt = pio.load_checkpoint(newest)
    assert ckpt.state["step"] == 2 and all(math.isfinite(v) for v in ckpt.state["loss_history"])
    clean = Setup()
    clean_result = clean.trainer(cfg(steps=3)).train()
    assert clean_result.loss_history == result.loss_history
    for k, v in clean.net.state_dict().items():
        assert torch.equal(s.net.state_dict()[k], v), k


def test_nan_in_the_data_is_blamed_on_the_data_and_keeps_the_weights():
    s = Setup()
    source = s.batch_source

    def broken(step, gen):
        x = source(step, gen)
        if step == 2:
            x[0, 0] = float("inf")
        return {"x": x}

    inner = s.step_fn

    def step_fn(batch, gen):
        return inner(batch["x"], gen)

    trainer = Trainer(s.net, step_fn, broken, cfg())
    with pytest.raises(NonFiniteLossError, match=r"step 3 of 8.*the batch's x held NaN or infinite values: "
                                                 r"the training data is broken, not the settings") as err:
        trainer.train()
    assert err.value.good_step == 2 and err.value.result.final_step == 2
    assert "learning rate" not in str(err.value)


def test_nan_gradient_is_caught_before_the_update(tmp_path):
    s = Setup()
    inner = s.step_fn
    up = s.net.lora_up("0")

    def poisoned(x, gen):
        out = inner(x, gen)
        if s.calls == 2:  # sqrt(0) has value 0 and an infinite derivative: loss finite, gradient NaN
            return Out(out.loss + torch.sqrt((up * 0).sum()), out.metrics)
        return out

    trainer = Trainer(s.net, poisoned, s.batch_source, cfg(checkpoint_dir=str(tmp_path), checkpoint_every=1))
    with pytest.raises(NonFiniteLossError, match="gradient norm .* at step 2"):
        trainer.train()
    assert torch.isfinite(up).all()
    assert [p.name for _, p in pio.list_checkpoints(tmp_path)] == ["step_000001"]


def _first_step_grads(grad_accum: int) -> dict[str, torch.Tensor]:
    s = Setup()
    data = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    target = torch.randn(8, 2, generator=torch.Generator().manual_seed(4))
    micro = 8 // grad_accum
    served = []

    def batch_source(step, gen):
        i = len(served)
        served.append(i)
        return data[i * micro:(i + 1) * micro], target[i * micro:(i + 1) * micro]

    def step_fn(batch, gen):
        x, y = batch
        return Out((s.model(x) - y).square().mean(dim=1))

    grads = {}

    def grab(event):
        grads.update({k: p.grad.clone() for k, p in s.net.named_lora_parameters()})

    config = TrainConfig(steps=1, lr=0.1, grad_accum=grad_accum, max_grad_norm=0.0, seed=0)
    Trainer(s.net, step_fn, batch_source, config, callback=grab).train()
    assert len(served) == grad_accum
    return grads


def test_gradient_accumulation_equals_one_step_on_the_concatenated_batch():
    accumulated, whole = _first_step_grads(2), _first_step_grads(1)
    assert any(g.abs().max() > 1e-3 for g in whole.values())
    for k in whole:
        torch.testing.assert_close(accumulated[k], whole[k], atol=1e-6, rtol=0)


def test_linear_warmup_then_constant_lr():
    s = Setup()
    lrs = []
    s.trainer(cfg(steps=6, lr=0.03, warmup_steps=3), callback=lambda e: lrs.append(e.lr)).train()
    assert lrs == pytest.approx([0.01, 0.02, 0.03, 0.03, 0.03, 0.03], rel=1e-12)


def test_clipping_bounds_the_gradient_norm():
    s = Setup()
    inner = s.step_fn
    big = lambda x, gen: Out(inner(x, gen).loss * 1e4)  # noqa: E731
    norms = []

    def grab(event):
        total = torch.sqrt(sum(p.grad.square().sum() for p in s.net.parameters() if p.grad is not None))
        norms.append((event.metrics["grad_norm"], float(total)))

    Trainer(s.net, big, s.batch_source, cfg(steps=3, max_grad_norm=0.5), callback=grab).train()
    assert all(before > 0.5 for before, _ in norms)  # clipping was needed ...
    assert all(after <= 0.5 * (1 + 1e-5) for _, after in norms)  # ... and bounded the norm


def test_refresh_runs_exactly_at_the_configured_steps():
    s = Setup()
    log = []
    batch_source = s.batch_source

    def logged_batches(step, gen):
        log.append(("batch", step))
        return batch_source(step, gen)

    trainer = Trainer(s.net, s.step_fn, logged_batches, cfg(steps=7, ref_refresh_every=3),
                      refresh_fn=lambda step, gen: log.append(("refresh", step)))
    trainer.train()
    assert [st for kind, st in log if kind == "refresh"] == [0, 3, 6]
    assert log[log.index(("refresh", 3)) + 1] == ("batch", 3)  # before that step's batches
    assert [st for kind, st in log if kind == "batch"] == list(range(7))


def test_fp16_on_cpu_is_refused_with_alternatives():
    s = Setup()
    with pytest.raises(ValueError, match="fp16.*CUDA.*'bf16' or 'no'"):
        s.trainer(cfg(mixed_precision="fp16"))


def test_bf16_autocast_trains_on_cpu():
    s = Setup()
    result = s.trainer(cfg(steps=2, mixed_precision="bf16")).train()
    assert all(math.isfinite(v) for v in result.loss_history)
    assert any(torch.count_nonzero(p) for p in s.net.up.values())  # the adapter moved


def test_adamw8bit_without_bitsandbytes_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    s = Setup()
    with pytest.raises(ImportError, match=r"pip install bitsandbytes.*optimizer='adamw'"):
        s.trainer(cfg(optimizer="adamw8bit"))


def test_fresh_run_refuses_a_folder_with_another_runs_checkpoints(tmp_path):
    Setup().trainer(cfg(steps=2, checkpoint_dir=str(tmp_path))).train()
    with pytest.raises(pio.CheckpointError, match="already holds checkpoints"):
        Setup().trainer(cfg(steps=2, checkpoint_dir=str(tmp_path))).train()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"steps": 0}, "steps=0 must be an integer >= 1"),
    ({"lr": 0.0}, "lr=0.0 must be a finite number > 0"),
    ({"optimizer": "sgd"}, "choose one of ['adamw', 'adamw8bit']"),
    ({"mixed_precision": "fp8"}, "choose one of ['bf16', 'fp16', 'no']"),
    ({"checkpoint_every": 5}, "needs a checkpoint_dir"),
])
def test_config_errors_name_the_bad_value(kwargs, message):
    with pytest.raises(ValueError) as err:
        TrainConfig(**kwargs)
    assert message in str(err.value)


def test_loss_must_be_per_sample_and_differentiable():
    s = Setup()
    scalar = lambda x, gen: Out(s.step_fn(x, gen).loss.mean())  # noqa: E731
    with pytest.raises(ValueError, match=r"\(B,\) tensor"):
        Trainer(s.net, scalar, s.batch_source, cfg(steps=1)).train()
    s.handle.remove()  # the adapter is no longer in the graph
    with pytest.raises(ValueError, match="does not require grad"):
        s.trainer(cfg(steps=1)).train()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a GradScaler needs CUDA")
def test_fp16_with_grad_scaler_trains_on_cuda():
    s = Setup()
    s.model.cuda()
    s.net.cuda()
    s.w_true = s.w_true.cuda()
    s.pool.offset = s.pool.offset.cuda()
    batch_source = lambda step, gen: torch.randn(6, 4, generator=gen).cuda()  # noqa: E731

    def step_fn(x, gen):
        y = torch.tanh(x @ s.w_true) + 0.1 * torch.randn(x.shape[0], 2, generator=gen).cuda()
        return Out((s.model(x).float() - y).square().mean(dim=1))

    before = [p.detach().clone() for p in s.net.parameters()]
    result = Trainer(s.net, step_fn, batch_source, cfg(steps=4, mixed_precision="fp16")).train()
    assert all(math.isfinite(v) for v in result.loss_history)
    assert any(not torch.equal(b, p) for b, p in zip(before, s.net.parameters(), strict=True))


def test_nan_right_after_a_resume_blames_the_checkpoint_and_sets_nothing_aside(tmp_path):
    s = Setup()
    s.trainer(cfg(steps=4, checkpoint_dir=str(tmp_path), checkpoint_every=2)).train()
    r = Setup()
    inner = r.step_fn

    def poisoned(x, gen):
        out = inner(x, gen)
        return Out(out.loss * float("nan"), out.metrics)

    trainer = Trainer(r.net, poisoned, r.batch_source, cfg(steps=8, checkpoint_dir=str(tmp_path)))
    with pytest.raises(NonFiniteLossError, match=r"step 5 of 8.*resumed at step 4.*resume from an older "
                                                 r"step_NNNNNN checkpoint") as err:
        trainer.train(resume_from=tmp_path)
    assert err.value.result is None and err.value.good_step == 0
    assert [p.name for _, p in pio.list_checkpoints(tmp_path)] == ["step_000002", "step_000004"]


# ---- the moving average of the adapter (TrainConfig.ema_decay) ----------------------------------


def _weights(net) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _raw_trajectory(steps: int, **kw) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The starting weights and the raw weights after each step of a run without averaging."""
    s = Setup()
    start = _weights(s.net)
    seen: list[dict[str, torch.Tensor]] = []
    s.trainer(cfg(steps=steps, **kw), callback=lambda e: seen.append(_weights(s.net))).train()
    return start, seen


def test_decay_warms_up_then_holds():
    assert ema_decay_at(0, 0.99) == pytest.approx(0.1)
    assert ema_decay_at(40, 0.99) == pytest.approx(41 / 50)
    assert ema_decay_at(10_000, 0.99) == 0.99
    assert ema_decay_at(5, 0.3) == 0.3


def test_result_is_the_moving_average_of_the_raw_weights():
    start, raw = _raw_trajectory(8)
    expected = {k: v.float().clone() for k, v in start.items()}
    for n, weights in enumerate(raw):
        d = ema_decay_at(n, 0.9)
        for k in expected:
            expected[k] = d * expected[k] + (1 - d) * weights[k]
    s = Setup()
    result = s.trainer(cfg(steps=8, ema_decay=0.9)).train()
    assert result.averaged
    got = _weights(s.net)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7)
    # averaging changes only the result: the losses (raw weights during training) are those of a plain run
    plain = Setup()
    assert plain.trainer(cfg(steps=8)).train().loss_history == result.loss_history
    # ...and the average differs from the last raw weights
    assert any(not torch.allclose(got[k], raw[-1][k]) for k in got if raw[-1][k].abs().sum() > 0)


def test_off_by_default_leaves_the_last_weights():
    _, raw = _raw_trajectory(5)
    s = Setup()
    result = s.trainer(cfg(steps=5)).train()
    assert not result.averaged
    assert all(torch.equal(v, raw[-1][k]) for k, v in _weights(s.net).items())


def test_interrupted_and_resumed_run_ends_with_the_same_average(tmp_path):
    full = Setup()
    full.trainer(cfg(ema_decay=0.8)).train()

    stopped = Setup()

    def stop_at_3(event):
        if event.step == 3:
            raise StopTraining

    first = stopped.trainer(cfg(ema_decay=0.8, checkpoint_dir=str(tmp_path)), callback=stop_at_3).train()
    assert first.interrupted and first.averaged
    ckpt = pio.load_checkpoint(tmp_path)
    # the checkpoint keeps the raw weights (what a resume continues from) and the average beside them
    assert ckpt.state["ema"] is not None
    assert set(ckpt.state["ema"]) == set(ckpt.adapter)
    assert any(not torch.equal(ckpt.state["ema"][k].to(v.dtype), v) for k, v in ckpt.adapter.items())

    resumed = Setup()
    resumed.trainer(cfg(ema_decay=0.8, checkpoint_dir=str(tmp_path))).train(resume_from=tmp_path)
    for k, v in _weights(full.net).items():
        assert torch.equal(_weights(resumed.net)[k], v), k


def test_resume_of_a_run_without_average_starts_it_at_the_resumed_weights(tmp_path, caplog):
    s = Setup()
    s.trainer(cfg(steps=3, checkpoint_dir=str(tmp_path))).train()
    resumed_at = pio.load_checkpoint(tmp_path).adapter
    r = Setup()
    seen: list[dict[str, torch.Tensor]] = []
    with caplog.at_level(logging.WARNING, logger="pso.trainer"):
        r.trainer(cfg(steps=5, ema_decay=0.5, checkpoint_dir=str(tmp_path)),
                  callback=lambda e: seen.append(_weights(r.net))).train(resume_from=tmp_path)
    assert "without a moving average" in caplog.text
    expected = {k: v.float().clone() for k, v in resumed_at.items()}
    for n, weights in zip((3, 4), seen, strict=True):
        d = ema_decay_at(n, 0.5)
        for k in expected:
            expected[k] = d * expected[k] + (1 - d) * weights[k]
    for k, v in expected.items():
        torch.testing.assert_close(_weights(r.net)[k], v, rtol=1e-6, atol=1e-7)


def test_nan_rolls_the_average_back_with_the_weights():
    """Step 5's loss is NaN: the weights after step 3 are the good ones, and the result is the average
    of a clean 3-step run, not one that folded in the step-4 weights."""
    s = Setup()
    inner = s.step_fn

    def poisoned(x, gen):
        out = inner(x, gen)
        return Out(out.loss * float("nan"), out.metrics) if s.calls == 5 else out

    with pytest.raises(NonFiniteLossError) as err:
        Trainer(s.net, poisoned, s.batch_source, cfg(ema_decay=0.7)).train()
    assert err.value.good_step == 3 and err.value.result.averaged
    clean = Setup()
    clean.trainer(cfg(steps=3, ema_decay=0.7)).train()
    for k, v in _weights(clean.net).items():
        assert torch.equal(_weights(s.net)[k], v), k


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan"), True])
def test_bad_decay_is_refused_with_the_fix(bad):
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=bad)
