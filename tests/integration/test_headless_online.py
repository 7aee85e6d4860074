"""Online PSO headless (``pso-train`` with ``prompts``): two processes under ``accelerate launch`` (gloo,
CPU) sample, score, label and train what one process does; a checkpoint taken inside a round resumes on
one process and serves the same batches; a resume with other round settings is refused; and on the
tiny model with a tiny aesthetic reward the reward of the model's own samples rises over the rounds and
on the held-out test round (same prompts and seeds before and after training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("open_clip")

import headless_models as hm  # noqa: E402
import tiny_rewards  # noqa: E402

from pso import io as pso_io  # noqa: E402
from pso_train.config import ConfigError, config_from_dict, load_config  # noqa: E402

PROMPTS = [*hm.PROMPTS, "a green tree", "a yellow car"]
SHORT = {"loss": "pso_online", "rank": 4, "target": "all", "steps": 4, "steps_per_round": 2,
         "prompts_per_round": 4, "samples_per_prompt": 2, "global_batch": 4, "lr": 0.01, "beta": 5.0,
         "seed": 3, "checkpoint_every": 1, "timesteps": "dmd2", "sampler": "renoise", "resolution": 64,
         "reward": "aesthetic"}


def _write_config(folder: Path, root: Path, **overrides) -> Path:
    cfg = {"model": str(root / "model"), "prompts": str(root / "prompts.txt"), "output_dir": "out",
           "reward_model": str(root / "rw" / "open_clip_model.safetensors"),
           "reward_head": str(root / "rw" / "sac+logos+ava1-l14-linearMSE.pth"), **SHORT, **overrides}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def _run(config: Path):
    from pso_train.online import train_online

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return train_online(load_config(config))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _lora(out: Path) -> dict[str, torch.Tensor]:
    (path,) = sorted(out.glob("pso_lora_*.safetensors"))
    return safetensors.torch.load_file(str(path))


def _delta_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max |difference| of the applied weight deltas, largest delta)."""
    mods = sorted(k[:-len(".lora_up.weight")] for k in a if k.endswith(".lora_up.weight"))

    def delta(lora, m):
        up, down = lora[m + ".lora_up.weight"].flatten(1), lora[m + ".lora_down.weight"].flatten(1)
        return float(lora[m + ".alpha"]) / down.shape[0] * up @ down

    da, db = (torch.cat([delta(x, m).flatten() for m in mods]) for x in (a, b))
    return (da - db).abs().max().item(), da.abs().max().item()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    torch.set_num_threads(1)
    hm.write_diffusers_model(root / "model")
    hm.write_vae(root / "model")
    tiny_rewards.save_open_clip(root / "rw" / "open_clip_model.safetensors", seed=3)
    tiny_rewards.save_aesthetic_head(root / "rw" / "sac+logos+ava1-l14-linearMSE.pth", dim=32)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def runs(root):
    """A 2-process run beside the same config on 1 process; then the 2-process checkpoint after step 3
    (inside round 1) resumed on 1 process."""
    two = _write_config(root / "two", root)
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(hm.free_port()), "-m", "pso_train.cli", str(two)]
    proc = subprocess.Popen(cmd, cwd=two.parent, env=hm.launch_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        one = _run(_write_config(root / "one", root))
        one_seconds = time.monotonic() - t0
        log, _ = proc.communicate(timeout=540)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-4000:]
    assert '"processes": 2' in log, log[-2000:]
    resumed = _run(_write_config(root / "resumed", root,
                                 resume_from=str(root / "two" / "out" / "checkpoints" / "step_000003")))
    print(f"\nonline headless: 1 process {one_seconds:.1f} s")
    return {"one": one, "resumed": resumed}


def test_two_processes_sample_score_and_train_what_one_process_does(root, runs):
    one_rewards, two_rewards = (_jsonl(root / d / "out" / "rewards.jsonl") for d in ("one", "two"))
    assert [r["round"] for r in one_rewards] == [2.0, 0.0, 1.0, 2.0]      # baseline, rounds 0-1, final
    assert one_rewards[0]["baseline"] == 1.0 and one_rewards[-1]["final"] == 1.0
    for a, b in zip(one_rewards, two_rewards, strict=True):                # the same samples and pairs
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-5)
        assert a.get("kept_pairs") == b.get("kept_pairs")
    two_ckpt = pso_io.load_checkpoint(root / "two" / "out" / "checkpoints")
    loss_one, loss_two = runs["one"].loss_history, [float(v) for v in two_ckpt.state["loss_history"]]
    assert len(loss_one) == len(loss_two) == 4
    assert abs(loss_one[0] - 0.6931472) < 1e-5    # a fresh adapter (B = 0): -log sigmoid(0)
    assert len({round(v, 4) for v in loss_one}) > 2, loss_one
    assert max(abs(a - b) for a, b in zip(loss_one, loss_two, strict=True)) < 1e-4, (loss_one, loss_two)
    lora_one, lora_two = _lora(root / "one" / "out"), _lora(root / "two" / "out")
    diff, moved = _delta_diff(lora_one, lora_two)
    va, vb = (torch.cat([d[k].flatten() for k in sorted(lora_one)]) for d in (lora_one, lora_two))
    rel = ((va - vb).norm() / va.norm()).item()
    print(f"\n1 vs 2 processes (online): LoRA delta max |diff| {diff:.2e} of largest {moved:.2e}; LoRA "
          f"tensors relative L2 diff {rel:.2e}")
    # Measured on this 2-core EPYC (2026-12-06): delta diff 3.3e-3 x the largest delta at lr 0.01 and 0.05
    # (the offline trainer: 1.2e-3): gloo sums in another order, Adam amplifies the rounding in entries
    # whose gradient is near 0, and round 1 is sampled from those weights; relative L2 well under 1e-3.
    assert moved > 1e-3 and diff < 1e-2 * moved
    assert rel < 1e-3, rel


def test_a_checkpoint_inside_a_round_resumes_with_the_same_batches(root, runs):
    ckpt = pso_io.load_checkpoint(root / "two" / "out" / "checkpoints" / "step_000003")
    assert "pairs" in ckpt.state["extra"]["online"], "inside round 1: its pairs are in the checkpoint"
    at_boundary = pso_io.load_checkpoint(root / "two" / "out" / "checkpoints" / "step_000002")
    assert "pairs" not in at_boundary.state["extra"]["online"], "a boundary checkpoint re-samples instead"
    resumed, two = runs["resumed"], pso_io.load_checkpoint(root / "two" / "out" / "checkpoints")
    assert resumed.world_size == 1 and resumed.steps == 4
    assert resumed.loss_history[3] == pytest.approx(float(two.state["loss_history"][3]), abs=1e-4)
    diff, moved = _delta_diff(_lora(root / "two" / "out"), _lora(root / "resumed" / "out"))
    assert diff < 3e-3 * moved
    final_two = _jsonl(root / "two" / "out" / "rewards.jsonl")[-1]
    final_resumed = _jsonl(root / "resumed" / "out" / "rewards.jsonl")[-1]
    assert final_resumed["reward_mean"] == pytest.approx(final_two["reward_mean"], abs=1e-5)


def test_resume_refuses_other_round_settings_and_configs_are_checked(root, runs, tmp_path):
    bad = _write_config(tmp_path / "bad", root, samples_per_prompt=4,
                        resume_from=str(root / "two" / "out" / "checkpoints"))
    with pytest.raises(pso_io.CheckpointError, match=r"samples_per_prompt.*\(2, 4\)"):
        _run(bad)
    base = json.loads(_write_config(tmp_path / "c", root).read_text())
    with pytest.raises(ConfigError, match="needs a stochastic step policy"):
        config_from_dict({**base, "sampler": "euler"})
    with pytest.raises(ConfigError, match="set timesteps"):
        config_from_dict({**base, "timesteps": None})
    with pytest.raises(ConfigError, match="leave datasets out"):
        config_from_dict({**base, "datasets": ["pairs"]})
    with pytest.raises(ConfigError, match=r"trains \['pso_online', 'pso_online_clipped'\]"):
        config_from_dict({**base, "loss": "pso_offline"})


def test_the_reward_rises_over_rounds_and_on_the_test_round(root, tmp_path):
    """24 steps, 8 prompts x 4 samples a round, 3 steps a round, lr 0.01: the tiny aesthetic reward of
    the model's own samples. Measured 2026-12-06 on an AMD EPYC machine with seeds 0-3: the test round
    (same prompts and seeds before and after) rose 1.16x, 1.18x, 1.37x, 1.17x; the mean of the last 3
    rounds over the first 3 1.19x, 1.17x, 1.24x, 1.25x. This test runs seed 3 (the other tests' seed).

    Why lr 0.01: at lr 0.05 (this test's setting until then) the same seeds gave test rounds of 1.83x,
    1.40x, 1.46x, 1.41x on the machine it was tuned on and 0.76x, 1.61x, 1.29x, 0.63x on the AMD one
    (rewards rising, then collapsing): the step was so large that float differences between CPUs decided
    the result. At 0.01 the reward climbs steadily on every seed."""
    cfg = _write_config(tmp_path / "long", root, lr=0.01, steps=24, steps_per_round=3, prompts_per_round=8,
                        samples_per_prompt=4, global_batch=8, checkpoint_every=0)
    _run(cfg)
    hist = _jsonl(tmp_path / "long" / "out" / "rewards.jsonl")
    before, rounds, after = hist[0], hist[1:-1], hist[-1]
    assert before["baseline"] == 1.0 and after["final"] == 1.0 and len(rounds) == 8
    first = sum(r["reward_mean"] for r in rounds[:3]) / 3
    last = sum(r["reward_mean"] for r in rounds[-3:]) / 3
    print(f"\nonline reward: rounds 0-2 {first:.4f}, last 3 {last:.4f}; test round "
          f"{before['reward_mean']:.4f} -> {after['reward_mean']:.4f}")
    assert last > first * 1.10, [r["reward_mean"] for r in rounds]
    assert after["reward_mean"] > before["reward_mean"] * 1.10
