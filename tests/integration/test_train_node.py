"""The PSO node chain in-process on the tiny models: references -> pairs -> train."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch
from tiny_training import sampled_pairs_chain, train_node

from extension_loader import load_package


@pytest.fixture(scope="module")
def ext(comfy_inprocess):
    load_package()
    names = ("data_nodes", "train_nodes", "types")
    return {m: importlib.import_module(f"comfyui-pso.nodes.{m}") for m in names}


@pytest.fixture(scope="module")
def chain(ext):
    return sampled_pairs_chain(ext["data_nodes"], ext["types"])


def test_pairs_join_targets_and_references_by_prompt(chain):
    b, targets, refs, pairs = chain
    assert len(refs.prompts) == 6 and refs.trajectory.latents.shape == (6, 5, 4, 8, 8)
    assert len(pairs) == 6 and pairs.prompts == ["a red circle", "a blue square"]
    assert pairs.prompt_index.tolist() == [0, 0, 0, 0, 1, 1]
    assert pairs.policy == "renoise" and pairs.fingerprint["model_class"] == "BaseModel"
    inner = b.model.model.process_latent_in(targets.latents)
    assert torch.equal(pairs.target[0], inner[0]) and torch.equal(pairs.target[1], inner[1])


def test_mismatched_counts_are_refused_with_the_prompt_named(chain, ext):
    b, targets, refs, _ = chain
    fewer = ext["types"].TargetSet(latents=targets.latents[:2], prompts=["a red circle", "a green star"],
                                   sources=["a.png", "d.png"])
    with pytest.raises(ValueError, match="no references for the target prompt 'a green star'"):
        ext["data_nodes"].PSOBuildPairs.execute(b.model, fewer, refs)
    three = ext["types"].TargetSet(latents=targets.latents, prompts=["a red circle"] * 3, sources=list("abc"))
    with pytest.raises(ValueError, match="has 3 target\\(s\\) but 4 reference\\(s\\)"):
        ext["data_nodes"].PSOBuildPairs.execute(b.model, three, refs)


@pytest.mark.parametrize("method", ["pso_offline", "pso_full", "sft"])
def test_train_node_trains_and_returns_host_types(chain, ext, output_dir, method):
    b, _, _, pairs = chain
    with torch.inference_mode():
        out = ext["train_nodes"].PSOTrain.execute(
            b.model, pairs, method, 4, 1e-2, 10.0, 4, 2, 1, 0, 2, "float32", False, 0, 0, "attention").result
    trained, lora, loss_map, summary = out
    assert len(loss_map["loss"]) == 4
    assert all(k.startswith("diffusion_model.") for k in lora)
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_up" in k)
    info = json.loads(summary)
    assert info["method"] == method and info["settings"]["reference_refresh_every"] == 2
    ckpts = list((output_dir / "pso_checkpoints").glob("run_*/step_*"))
    assert ckpts, "a finished run leaves its final checkpoint"
    assert trained is not b.model and not b.model.weight_wrapper_patches


def test_bad_settings_are_refused_before_any_work(chain, ext, output_dir):
    b, _, _, pairs = chain
    train = ext["train_nodes"].PSOTrain.execute
    for args, msg in [((0, 1e-3, 10.0, 4), "steps=0"), ((2, 1e-3, -1.0, 4), "beta=-1.0"),
                      ((2, 1e-3, 10.0, 0), "lora_rank=0")]:
        with pytest.raises(ValueError, match=msg):
            train(b.model, pairs, "pso_offline", *args, 1, 1, 0, 0, "float32", False, 0, 0, "attention")
    assert not (output_dir / "pso_checkpoints").exists()


def test_pairs_survive_a_save_and_load_and_other_families_are_refused(chain, ext, output_dir):
    from pso_test_fixtures import tiny_models

    ds = importlib.import_module("comfyui-pso.nodes.dataset_nodes")
    b, _, _, pairs = chain
    with torch.inference_mode():
        assert ds.PSOSavePairs.execute(pairs, "style/run one", False).result[0] == "style/run one"
        loaded = ds.PSOLoadPairs.execute("style/run one", b.model, b.clip).result[0]
    assert (output_dir / "pso_pairs" / "style" / "run one" / "manifest.json").is_file()
    assert torch.equal(loaded.target, pairs.target) and torch.equal(loaded.reference, pairs.reference)
    assert torch.equal(loaded.reference_traj.latents, pairs.reference_traj.latents)
    assert loaded.prompts == pairs.prompts and torch.equal(loaded.prompt_index, pairs.prompt_index)
    assert ds.list_datasets() == ["style/run one"]
    with pytest.raises(Exception, match="not empty|already|exists"):
        ds.PSOSavePairs.execute(pairs, "style/run one", False)
    with torch.inference_mode():
        sdxl = tiny_models.build_bundle("sdxl")
        with pytest.raises(Exception, match="SD15.*SDXL|SDXL.*SD15"):
            ds.PSOLoadPairs.execute("style/run one", sdxl.model, sdxl.clip)
    for bad in ("../escape", "/abs/path", "a/../../b"):
        with pytest.raises(ValueError, match="not allowed"):
            ds.PSOSavePairs.execute(pairs, bad, False)


def _train(ext, b, pairs, steps, **kw):
    return train_node(ext["train_nodes"], b, pairs, steps, **kw)


@pytest.mark.parametrize("refresh", [2, 1], ids=["refresh_every_2", "defaults_fresh_and_mixed"])
def test_resuming_a_stopped_run_continues_exactly(chain, ext, output_dir, refresh):
    """Also with the defaults: references re-sampled every step and step-count mixing (their ages,
    the pool and the generator are in the checkpoint)."""
    b, _, _, pairs = chain
    full = _train(ext, b, pairs, 6, reference_refresh_every=refresh)
    first = _train(ext, b, pairs, 3, reference_refresh_every=refresh)
    run = json.loads(first[3])["checkpoint"]
    run_name = Path(run).parent.name if Path(run).name.startswith("step_") else Path(run).name
    resumed = _train(ext, b, pairs, 6, resume_from=run_name, reference_refresh_every=refresh)
    assert resumed[2]["loss"] == full[2]["loss"], (resumed[2]["loss"], full[2]["loss"])
    assert all(torch.equal(resumed[1][k], full[1][k]) for k in full[1])
    with pytest.raises(ValueError, match="no such run"):
        _train(ext, b, pairs, 6, resume_from="run_99999")
    with pytest.raises(ValueError, match="must be a run folder name"):
        _train(ext, b, pairs, 6, resume_from="../../etc")


def test_nan_in_training_stops_with_the_step_named_and_no_bad_checkpoint(chain, ext, output_dir):
    # the extension's own copy of pso (the host imports the package by path, as "comfyui-pso")
    NonFiniteLossError = importlib.import_module("comfyui-pso.pso.trainer").NonFiniteLossError  # noqa: N806
    b, _, _, pairs = chain
    bad = dataclasses.replace(pairs, target=pairs.target.clone())
    bad.target[:] = float("nan")
    with pytest.raises(NonFiniteLossError, match="non-finite .* at step 1 of 5"):
        _train(ext, b, bad, 5, checkpoint_every=1)
    run = sorted((output_dir / "pso_checkpoints").glob("run_*"))[-1]
    assert not list(run.glob("step_*")), "a NaN step must not be checkpointed"


def test_reduction_reaches_the_loss(chain, ext, output_dir):
    """The paper's sum-inside log-sigmoid and the authors' per-transition one give different losses;
    with one transition per pair they would coincide, so the 4-step pairs' 3 levels are used. At step 1
    the adapter is zero (every logit 0, loss log 2 either way), so step 2 is compared."""
    b, _, _, pairs = chain
    plain = dict(reference_refresh_every=0, target_sft_weight=0.0)  # the paper's losses as written
    inside = _train(ext, b, pairs, 2, reduction="sum_inside", **plain)[2]["loss"]
    per = _train(ext, b, pairs, 2, reduction="per_transition", **plain)[2]["loss"]
    assert inside[0] == pytest.approx(per[0]) == pytest.approx(0.6931472)
    assert inside[1] != pytest.approx(per[1], rel=1e-4)
    default = _train(ext, b, pairs, 2, **plain)[2]["loss"]
    assert default == inside, "the documented default is the paper's sum inside the log-sigmoid"


def test_step_count_mixing_is_on_by_default_and_recorded(chain, ext, output_dir):
    """'auto' mixes in the 1- and 2-step schedules inside the 4-step one (the summary says which);
    'none' trains the 4-step schedule alone, and the runs differ."""
    b, _, _, pairs = chain
    plain = _train(ext, b, pairs, 3, reference_refresh_every=1, reference_step_counts="none")
    mixed = _train(ext, b, pairs, 3, reference_refresh_every=1, reference_step_counts="auto")
    assert json.loads(mixed[3])["mixed_step_counts"] == [1, 2]
    assert json.loads(plain[3])["mixed_step_counts"] == []
    assert mixed[2]["loss"] != plain[2]["loss"]
    # auto does not apply where references are not re-sampled every step; the summary says so
    stale = _train(ext, b, pairs, 2, reference_refresh_every=0, reference_step_counts="auto")
    assert json.loads(stale[3])["mixed_step_counts"] == []


def test_reference_step_counts_are_refused_where_they_cannot_apply(chain, ext, output_dir):
    b, _, _, pairs = chain
    train_nodes = ext["train_nodes"]
    for kw, msg in [(dict(reference_step_counts="3", reference_refresh_every=1),
                     r"3-step schedule out of a 4-step one"),
                    (dict(reference_step_counts="1", reference_refresh_every=0),
                     "reference_refresh_every to 1"),
                    (dict(reference_step_counts="2", method="pso_full"), "forward-noised references")]:
        with pytest.raises(ValueError, match=msg):
            _train(ext, b, pairs, 2, **kw)
    with pytest.raises(ValueError, match="'one, two' is not a list of step counts"):
        train_nodes.TrainSettings.parse_step_counts("one, two")
    assert train_nodes.TrainSettings.parse_step_counts(" 2; 1, 2 ") == (1, 2)
    assert train_nodes.TrainSettings.parse_step_counts("auto") is None
    parse = train_nodes.TrainSettings.parse_step_counts
    assert parse("none") == parse("") == ()
    with pytest.raises(ValueError, match="beta=0.0 is invalid; it must be > 0: 10 for references the model"):
        _train(ext, b, pairs, 2, beta=0.0)
    assert not (output_dir / "pso_checkpoints").exists()


def test_the_output_lora_is_the_moving_average_by_default(chain, ext, output_dir):
    """ema_decay (default 0.99): the same training (identical losses), but the LoRA handed on is the
    trainer's average of the weights, which the summary and the text under the node say; 0 hands on
    the last step's weights. A resume may not change it (the average is part of the run)."""
    b, _, _, pairs = chain
    default = _train(ext, b, pairs, 4)
    last = _train(ext, b, pairs, 4, ema_decay=0.0)
    assert default[2]["loss"] == last[2]["loss"]
    assert any(not torch.allclose(default[1][k], last[1][k]) for k in last[1] if "lora_up" in k)
    info, plain = json.loads(default[3]), json.loads(last[3])
    assert info["averaged"] is True and info["settings"]["ema_decay"] == 0.99
    assert plain["averaged"] is False and plain["settings"]["ema_decay"] == 0.0
    assert "LoRA = average (ema 0.99)" in ext["train_nodes"].summary_line(default[3])
    assert "average" not in ext["train_nodes"].summary_line(last[3])
    run = Path(info["checkpoint"])
    run_name = run.parent.name if run.name.startswith("step_") else run.name
    with pytest.raises(ValueError, match="ema_decay: run 0.99, now 0.5"):
        _train(ext, b, pairs, 6, resume_from=run_name, ema_decay=0.5)


def test_anchor_levels_reach_the_loss_and_the_summary(chain, ext, output_dir):
    """'final' (default) also anchors the targets at the last step's input level: another loss than
    'pair' from the first step (the anchor's mean takes one more level); the summary records it. With
    target_sft_weight 0 there is no anchor and the choice changes nothing."""
    b, _, _, pairs = chain
    final = _train(ext, b, pairs, 2, reference_refresh_every=0)
    pair = _train(ext, b, pairs, 2, reference_refresh_every=0, anchor_levels="pair")
    assert final[2]["loss"][0] != pytest.approx(pair[2]["loss"][0], rel=1e-6)
    assert json.loads(final[3])["settings"]["anchor_levels"] == "final"
    assert json.loads(pair[3])["settings"]["anchor_levels"] == "pair"
    off = dict(reference_refresh_every=0, target_sft_weight=0.0)
    unanchored = _train(ext, b, pairs, 2, **off)[2]["loss"]
    assert unanchored == _train(ext, b, pairs, 2, anchor_levels="pair", **off)[2]["loss"]
    with pytest.raises(ValueError, match="anchor_levels 'continuous' is unknown"):
        _train(ext, b, pairs, 2, anchor_levels="continuous")
