"""Facts about pso.train_settings and pso.online_settings, the host-free settings of PSO Train and PSO
Online Train: every input is checked once with a message naming it and the fix, a method is refused
where the pairs cannot serve it, and a resume continues only the run it names."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import pytest
import torch

import pso.io as pio
from pso import online_settings as ons
from pso import runs
from pso import train_settings as ts


@dataclass
class _Pairs:
    """A pair set as the node's PAIR_SET carries it (pso.train_settings.Pairs)."""

    target: torch.Tensor
    reference: torch.Tensor
    prompt_index: torch.Tensor
    prompts: list[str]
    sigmas: torch.Tensor
    policy: str = "renoise"
    reference_traj: object = "trajectories"

    def __len__(self) -> int:
        return self.target.shape[0]


def _pairs(steps: int = 4, **kw) -> _Pairs:
    g = torch.Generator().manual_seed(0)
    base = dict(target=torch.randn(3, 2, 4, 4, generator=g), reference=torch.randn(3, 2, 4, 4, generator=g),
                prompt_index=torch.tensor([0, 1, 0]), prompts=["a", "b"],
                sigmas=torch.linspace(10.0, 0.0, steps + 1))
    return _Pairs(**{**base, **kw})


@pytest.mark.parametrize("field,value,message", [
    ("steps", 0, "PSO Train: steps=0 is invalid; it must be at least 1"),
    ("learning_rate", float("nan"), "learning_rate=nan is invalid; it must be > 0"),
    ("beta", 0.0, "beta=0.0 is invalid; it must be > 0: 10 for references the model sampled itself"),
    ("target_sft_weight", -1.0, "target_sft_weight=-1.0 is invalid; it must be >= 0"),
    ("ema_decay", 1.0, r"ema_decay=1.0 is invalid; it must be >= 0 and < 1 \(0 = off"),
    ("ema_decay", -0.5, "ema_decay=-0.5 is invalid"),
    ("method", "dpo", "method 'dpo' is unknown"),
    ("training_dtype", "fp8", "training_dtype 'fp8' is unknown"),
    ("reference_step_counts", (0, 2), r"reference_step_counts \[0, 2\] must all be >= 1"),
])
def test_train_settings_name_the_bad_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        ts.TrainSettings(**{field: value})


def test_train_settings_build_the_method_config_and_anchor_only_offline_pso():
    cfg = ts.TrainSettings(beta=3.0, target_sft_weight=0.5).method_config()
    assert (cfg.loss, cfg.beta, cfg.target_sft_weight) == ("pso_offline", 3.0, 0.5)
    assert ts.TrainSettings(method="pso_full", target_sft_weight=0.5).effective_target_sft_weight == 0.0
    assert ts.PRECISIONS == {"float32": "no", "bf16": "bf16", "fp16": "fp16"}
    run = ts.TrainSettings(steps=7, learning_rate=2e-4, grad_accumulation=3, seed=5, training_dtype="bf16",
                           checkpoint_every=2, reference_refresh_every=4, lora_rank=8,
                           lora_target="all_linear")
    cfg = run.train_config("/runs/run_00001")
    assert (cfg.steps, cfg.lr, cfg.grad_accum, cfg.seed, cfg.mixed_precision, cfg.checkpoint_every,
            cfg.checkpoint_dir, cfg.ref_refresh_every) == (7, 2e-4, 3, 5, "bf16", 2, "/runs/run_00001", 1)
    assert replace(run, reference_refresh_every=0).train_config("d").ref_refresh_every == 0
    assert (run.lora_config().rank, run.lora_config().target) == (8, "all_linear")


def test_step_counts_parse_and_resolve_against_the_pairs():
    assert ts.TrainSettings.parse_step_counts(" 2; 1, 2 ") == (1, 2)
    assert ts.TrainSettings.parse_step_counts("auto") is None and ts.TrainSettings.parse_step_counts("") == ()
    with pytest.raises(ValueError, match="'one' is not a list of step counts"):
        ts.TrainSettings.parse_step_counts("one")
    auto = ts.TrainSettings()
    assert ts.mixed_step_counts(auto, _pairs(4)) == [1, 2]
    assert ts.mixed_step_counts(auto, _pairs(8)) == [1, 2, 4]
    assert ts.mixed_step_counts(replace(auto, reference_refresh_every=0), _pairs(4)) == []
    assert ts.mixed_step_counts(replace(auto, reference_step_counts=(1, 4)), _pairs(4)) == [1]
    with pytest.raises(ValueError, match="set reference_refresh_every to 1"):
        ts.mixed_step_counts(replace(auto, reference_step_counts=(1,), reference_refresh_every=0), _pairs(4))
    with pytest.raises(ValueError, match="needs forward-noised references"):
        ts.mixed_step_counts(ts.TrainSettings(method="pso_full", reference_step_counts=(2,)), _pairs(4))


def test_methods_are_refused_where_the_pairs_cannot_serve_them():
    with pytest.raises(ValueError, match="set reference_refresh_every to 0"):
        ts.check_method_fits_pairs(ts.TrainSettings(), _pairs(reference_traj=None))
    with pytest.raises(ValueError, match="'pso_full' needs a stochastic sampler's Gaussian policy"):
        ts.check_method_fits_pairs(ts.TrainSettings(method="pso_full"), _pairs(policy="euler"))
    ts.check_method_fits_pairs(ts.TrainSettings(method="pso_full"), _pairs())  # renoise: Gaussian steps


def _checkpoint(run_dir, step: int):
    return pio.save_checkpoint(run_dir, step, {"w": torch.zeros(1)}, {})


def test_a_train_resume_continues_only_its_own_run(tmp_path):
    settings, pairs = ts.TrainSettings(steps=4), _pairs()
    with contextlib.ExitStack() as held:
        _, run_dir, _ = runs.open_run(held, str(tmp_path), "", "PSO Train",
                                      record=lambda: ts.run_record(settings, pairs), check_resume=None)
    step = _checkpoint(run_dir, 2)
    more = replace(settings, steps=6, resume_from=run_dir.name)  # steps may change
    assert ts.check_resume(run_dir, step, more, pairs) == 2
    with pytest.raises(ValueError, match="is already at step 2, and steps=2 leaves nothing to train"):
        ts.check_resume(run_dir, step, replace(more, steps=2), pairs)
    with pytest.raises(ValueError, match="other settings \\(lora_rank: run 16, now 8\\)"):
        ts.check_resume(run_dir, step, replace(more, lora_rank=8), pairs)
    other = _pairs(target=pairs.target + 1)
    assert ts.pairs_digest(other) != ts.pairs_digest(pairs) == ts.pairs_digest(_pairs())
    with pytest.raises(ValueError, match="was trained on other pairs"):
        ts.check_resume(run_dir, step, more, other)


@pytest.mark.parametrize("field,value,message", [
    ("method", "pso_offline", "PSO Online Train: method 'pso_offline' is unknown"),
    ("beta", -1.0, "PSO Online Train: beta=-1.0 is invalid; it must be > 0: 50 for pso_online_clipped"),
    ("seed", -1, r"seed=-1 is invalid; it must be in \[0, 2\*\*63\)"),
    ("lora_target", "everything", "lora_target 'everything' is unknown"),
])
def test_online_settings_name_the_bad_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        ons.OnlineSettings(**{field: value})


def test_online_settings_build_the_trainers_schedule():
    run = ons.OnlineSettings(rounds=3, steps_per_round=2, learning_rate=3e-5, seed=9, lora_rank=4)
    cfg = run.train_config("d")
    assert (cfg.steps, cfg.lr, cfg.seed, cfg.checkpoint_every, cfg.checkpoint_dir, cfg.ref_refresh_every) == (
        6, 3e-5, 9, 2, "d", 2)  # checkpoint_every 0: one checkpoint per round
    assert replace(run, checkpoint_every=5).train_config("d").checkpoint_every == 5
    assert run.lora_config().rank == 4 and run.method_config().beta == ons.BETA_ONLINE_CLIPPED == 50.0
    assert run.method_config().loss == "pso_online_clipped"  # the default method (bench/README.md)


def test_online_prompts_and_reward_contract():
    assert ons.parse_prompts(" a\n\nb\na \n") == ["a", "b"]
    with pytest.raises(ValueError, match="prompts is empty"):
        ons.parse_prompts("\n  \n")

    class Reward:
        name = "r"

        def __init__(self, scores):
            self.scores = scores

        def score(self, images, prompts):
            return self.scores

    assert ons.check_reward(Reward([1.0])) == "r"
    with pytest.raises(ValueError, match="the reward input is a str, not a PSO_REWARD"):
        ons.check_reward("reward")
    images = torch.zeros(2, 4, 4, 3)
    assert ons.reward_scores(Reward([1, 2]), images, ["a", "a"]).tolist() == [1.0, 2.0]
    for bad in ([1.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="it must return one finite score per image"):
            ons.reward_scores(Reward(bad), images, ["a", "a"])


def test_an_online_resume_continues_only_its_own_run(tmp_path):
    settings = ons.OnlineSettings(rounds=2, steps_per_round=2, prompts_per_round=1, batch_size=1)
    sigmas = torch.tensor([10.0, 5.0, 0.0])
    record = ons.run_record(settings, ["a"], "r", "renoise", sigmas, (2, 4, 4))
    with contextlib.ExitStack() as held:
        _, run_dir, _ = runs.open_run(held, str(tmp_path), "", "PSO Online Train", record=lambda: record,
                                      check_resume=None)
    step = _checkpoint(run_dir, 2)
    more = replace(settings, rounds=3, resume_from=run_dir.name)
    assert ons.check_resume(run_dir, step, more, ons.run_record(more, ["a"], "r", "renoise", sigmas,
                                                                  (2, 4, 4))) == 2
    with pytest.raises(ValueError, match=r"already at step 2 \(round 1\), and rounds=1"):
        ons.check_resume(run_dir, step, replace(more, rounds=1), record)
    with pytest.raises(ValueError, match="other inputs \\(reward: run 'r', now 's'\\)"):
        ons.check_resume(run_dir, step, more, ons.run_record(more, ["a"], "s", "renoise", sigmas, (2, 4, 4)))
    pio.atomic_write_json(run_dir / runs.RUN_RECORD, {"kind": "pso-train-run"})
    with pytest.raises(ValueError, match="is not an online run"):
        ons.check_resume(run_dir, step, more, record)


def test_an_online_run_recorded_before_first_step_weight_resumes_only_without_it(tmp_path):
    """Runs started before first_step_weight existed trained the paper's loss: their record lacks the key;
    resuming with the default 0 continues them, resuming with the first step held would change the loss
    mid-run and is refused."""
    settings = ons.OnlineSettings(rounds=2, steps_per_round=2, prompts_per_round=1, batch_size=1)
    sigmas = torch.tensor([10.0, 5.0, 0.0])
    old = ons.run_record(settings, ["a"], "r", "renoise", sigmas, (2, 4, 4))
    del old["settings"]["first_step_weight"]
    with contextlib.ExitStack() as held:
        _, run_dir, _ = runs.open_run(held, str(tmp_path), "", "PSO Online Train", record=lambda: old,
                                      check_resume=None)
    step = _checkpoint(run_dir, 2)
    off = replace(settings, rounds=3, resume_from=run_dir.name)
    record = ons.run_record(off, ["a"], "r", "renoise", sigmas, (2, 4, 4))
    assert ons.check_resume(run_dir, step, off, record) == 2
    on = replace(off, first_step_weight=ons.FIRST_STEP_SUGGESTED)
    with pytest.raises(ValueError, match=r"other inputs \(first_step_weight: run '0.0', now '0.01'\)"):
        ons.check_resume(run_dir, step, on, ons.run_record(on, ["a"], "r", "renoise", sigmas, (2, 4, 4)))
