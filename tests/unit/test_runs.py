"""Facts about pso.runs, the host-free part of a training node's run: run folders are fresh and confined
to output/pso_checkpoints, a new run writes its record and a resume is checked instead, a busy folder is
refused, and the LOSS_MAP / summary pieces say what the run trained."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import pso.io as pio
from pso import online, runs
from pso.samplers import initial_latent, sample_trajectory
from pso.schedules import check_sigmas
from pso.trainer import TrainResult


def test_new_run_folders_count_up_and_never_reuse_a_name(tmp_path):
    first = runs.new_checkpoint_dir(str(tmp_path))
    assert first == tmp_path / runs.CHECKPOINT_SUBFOLDER / "run_00001" and first.is_dir()
    (tmp_path / runs.CHECKPOINT_SUBFOLDER / "run_00007").mkdir()
    (tmp_path / runs.CHECKPOINT_SUBFOLDER / "run_x").mkdir()  # not a run name: ignored
    assert runs.new_checkpoint_dir(str(tmp_path)).name == "run_00008"


@pytest.mark.parametrize("name", ["../x", "/etc", "run_00001/../../x", "a" * 101, "run_00001/other"])
def test_resume_refuses_paths_outside_the_checkpoint_folder(tmp_path, name):
    runs.new_checkpoint_dir(str(tmp_path))
    with pytest.raises(ValueError, match="must be a run folder name"):
        runs.resume_dir(str(tmp_path), name)


def test_resume_names_the_existing_runs_when_the_run_is_missing(tmp_path):
    runs.new_checkpoint_dir(str(tmp_path))
    with pytest.raises(ValueError, match=r"no such run .*\['run_00001'\]"):
        runs.resume_dir(str(tmp_path), "run_00002")


def test_run_folder_of_a_step_checkpoint_is_its_run(tmp_path):
    run = runs.new_checkpoint_dir(str(tmp_path))
    (run / "step_000004").mkdir()
    assert runs.run_folder(str(tmp_path), "run_00001/step_000004") == (run / "step_000004", run)
    assert runs.run_folder(str(tmp_path), "run_00001") == (run, run)
    resume, fresh = runs.run_folder(str(tmp_path), "")
    assert resume is None and fresh.name == "run_00002"


def test_open_run_writes_a_new_runs_record_and_checks_a_resume_instead(tmp_path):
    calls = []
    with contextlib.ExitStack() as held:
        resume, run_dir, start = runs.open_run(held, str(tmp_path), "", "Node", record=lambda: {"kind": "k"},
                                               check_resume=lambda *a: calls.append(a) or 5)
    assert (resume, start, calls) == (None, 0, [])
    assert pio.read_json(run_dir / runs.RUN_RECORD) == {"kind": "k"}

    def never():
        raise AssertionError("a resume writes no record")

    with contextlib.ExitStack() as held:
        got = runs.open_run(held, str(tmp_path), run_dir.name, "Node", record=never,
                            check_resume=lambda d, r: calls.append((d, r)) or 5)
    assert got == (run_dir, run_dir, 5) and calls == [(run_dir, run_dir)]


def test_open_run_refuses_a_folder_another_run_holds(tmp_path):
    with contextlib.ExitStack() as held:
        _, run_dir, _ = runs.open_run(held, str(tmp_path), "", "Node", record=dict, check_resume=None)
        busy = pytest.raises(ValueError, match=r"^Node: .*resume_from 'run_00001'")
        with contextlib.ExitStack() as other, busy:
            runs.open_run(other, str(tmp_path), run_dir.name, "Node", record=dict,
                          check_resume=lambda *a: pytest.fail("checked a busy run"))
    with contextlib.ExitStack() as held:  # released with its ExitStack
        assert runs.open_run(held, str(tmp_path), run_dir.name, "Node", record=dict,
                             check_resume=lambda *a: 3)[2] == 3


def _result(**kw) -> TrainResult:
    base = {"loss_history": [0.5, 0.25], "final_step": 7, "interrupted": False,
            "metrics_history": [{"margin": 1.0}, {"margin": 2.0, "implicit_accuracy": 0.75}]}
    return TrainResult(**{**base, **kw})


def test_metric_map_keeps_the_metrics_the_last_step_reported():
    loss_map = runs.metric_map(_result(), ("implicit_accuracy", "margin", "clipped_fraction"))
    assert list(loss_map) == ["loss", "implicit_accuracy", "margin"]
    assert loss_map["loss"] == [0.5, 0.25] and loss_map["margin"] == [1.0, 2.0]
    assert math.isnan(loss_map["implicit_accuracy"][0]) and loss_map["implicit_accuracy"][1] == 0.75
    assert runs.metric_map(_result(loss_history=[], metrics_history=[]), ("margin",)) == {"loss": []}


def test_summary_fields_say_what_the_run_trained():
    result = _result(stopped_reason="loss was nan", checkpoint_errors=["disk full"])
    assert runs.outcome(result, 4) == {"steps_trained": 7, "steps_this_run": 3, "stopped": "loss was nan",
                                       "checkpoint_errors": ["disk full"]}
    assert runs.outcome(_result(), 0) == {"steps_trained": 7, "steps_this_run": 7}
    assert runs.result_fields(result) == {"final_loss": 0.25, "final_metrics": result.metrics_history[-1],
                                          "averaged": False}
    assert runs.result_fields(_result(loss_history=[], metrics_history=[], averaged=True)) == {
        "final_loss": None, "final_metrics": {}, "averaged": True}
    fields = runs.sampling_fields("renoise", torch.tensor([14.6146, 1.0 / 3, 0.0]))
    assert fields == {"sampler_policy": "renoise", "sampler": "lcm",
                      "sigmas": [14.6146, 0.333333, 0.0]}


def test_reward_map_plots_the_mean_reward_and_zero_fills_the_evaluation_round():
    history = [{"reward_mean": 1.0, "reward_best": 2.0, "reward_worst": 0.0, "kept_pairs": 3.0,
                "skipped_ties": 1.0}, {"reward_mean": 1.5, "reward_best": 2.5, "reward_worst": 0.5}]
    got = online.reward_map(history)
    assert list(got) == ["loss", "reward_mean", "reward_best", "reward_worst", "kept_pairs", "skipped_ties"]
    assert got["loss"] == got["reward_mean"] == [1.0, 1.5]
    assert got["kept_pairs"] == [3.0, 0.0] and got["skipped_ties"] == [1.0, 0.0]


class _EpsModelSampling:
    """An eps model's sampling as comfy.model_sampling.EPS scales noise (initial_latent and euler use it)."""

    sigma_max = 14.6146

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        scale = torch.sqrt(1.0 + sigma ** 2.0) if max_denoise else sigma
        return noise * scale.reshape(-1, *([1] * (noise.ndim - 1))) + latent_image


def test_preview_sample_is_the_seeded_sample_of_the_first_prompt_decoded():
    sigmas = check_sigmas(torch.tensor([3.0, 1.5, 0.5, 0.0]))
    seen = []

    def denoiser(x, sigma, idx):
        seen.append(idx.tolist())
        return 0.5 * x

    decode = lambda z: z * 2  # noqa: E731
    ms = _EpsModelSampling()
    got = runs.preview_sample(denoiser, (2, 4, 4), "cpu", sigmas, "euler", ms, decode, seed=3)
    noise = torch.randn((1, 2, 4, 4), generator=torch.Generator().manual_seed(3))
    x = initial_latent(_EpsModelSampling(), sigmas, noise)
    want = sample_trajectory(denoiser, x, sigmas, torch.zeros(1, dtype=torch.long), _EpsModelSampling(),
                             "euler", None).final * 2
    assert torch.equal(got, want) and seen[0] == [0]
    other = runs.preview_sample(denoiser, (2, 4, 4), "cpu", sigmas, "euler", _EpsModelSampling(), decode,
                                seed=4)
    assert not torch.equal(got, other)


def test_previews_come_every_so_many_steps_and_after_the_last():
    assert [s for s in range(1, 8) if runs.preview_due(s, 3, 7)] == [3, 6, 7]
    assert not any(runs.preview_due(s, 0, 7) for s in range(1, 8))


def test_to_pil_shows_the_first_image_and_a_video_as_a_strip():
    images = torch.zeros(2, 3, 5, 3)
    images[0, 0, 0] = torch.tensor([1.0, 0.5, 2.0])  # clamped to 1
    pil = runs.to_pil(images)
    assert pil.size == (5, 3) and pil.getpixel((0, 0)) == (255, 128, 255)
    assert runs.to_pil(torch.rand(1, 4, 3, 5, 3)).size == (20, 3)
