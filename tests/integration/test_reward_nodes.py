"""Reward loader, Pick-a-Pic import and PSO Evaluate in-process on the tiny SD1.5 fixture. Facts checked:
the loader finds each kind's files in models/pso_rewards (a transformers folder through its
model.safetensors, ImageReward.pt with its tokenizer folder beside it) and refuses missing ones naming
the file, the folder and the source; a Pick-a-Pic parquet written here gives exactly the labelled pairs,
winner as target, each encoded as the VAE encodes the resized winner, with ties, unlabelled rows, missing
and unreadable images reported by row and none silently lost; the saved dataset lists every kept pair
with its source and is never overwritten; a JSONL table gives the same pairs as the parquet; paths
outside ComfyUI's folders are refused. PSO Evaluate's table is the mean of the rewards' scores of its own
sampled images, identical on a second run, with a chart image whose bars are drawn.
"""

from __future__ import annotations

import importlib
import io as _io
import json
import re

import numpy as np
import pytest
import tiny_rewards
import torch
from PIL import Image

from extension_loader import load_package

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def ext(comfy_inprocess):
    load_package()
    return {m: importlib.import_module(f"comfyui-pso.nodes.{m}")
            for m in ("reward_nodes", "pickapic_nodes", "eval_nodes", "dataset_nodes")}


@pytest.fixture(scope="module")
def bundle(comfy_inprocess):
    from pso.schedules import few_step_sigmas
    from pso_test_fixtures import tiny_models

    with torch.inference_mode():
        b = tiny_models.build_bundle("sd15", seed=5)
        sigmas = few_step_sigmas(b.model.get_model_object("model_sampling"), "dmd2")
    return b, sigmas


@pytest.fixture()
def reward_dir(tmp_path, ext):
    import folder_paths

    folder = tmp_path / "pso_rewards"
    tiny_rewards.save_hpsv2(folder / "HPS_v2_compressed.pt")
    tiny_rewards.save_open_clip(folder / "open_clip_model.safetensors", seed=3)
    tiny_rewards.save_aesthetic_head(folder / "sac+logos+ava1-l14-linearMSE.pth", dim=32)
    tiny_rewards.save_hf_clip(folder / "PickScore_v1", seed=1)
    tiny_rewards.save_image_reward(folder / "ImageReward")  # ImageReward.pt + bert-base-uncased/ beside it
    key = ext["reward_nodes"].FOLDER
    old = folder_paths.folder_names_and_paths[key]
    folder_paths.folder_names_and_paths[key] = ([str(folder)], old[1])
    folder_paths.filename_list_cache.pop(key, None)
    yield folder
    folder_paths.folder_names_and_paths[key] = old
    folder_paths.filename_list_cache.pop(key, None)


@pytest.fixture()
def input_dir(tmp_path, comfy_inprocess):
    import folder_paths

    old = folder_paths.get_input_directory()
    folder = tmp_path / "input"
    folder.mkdir()
    folder_paths.set_input_directory(str(folder))
    yield folder
    folder_paths.set_input_directory(old)


def _load(ext, kind, model_file, head="(none)"):
    with torch.inference_mode():
        return ext["reward_nodes"].PSORewardModelLoader.execute(kind, model_file, head, 4, "auto").result[0]


def test_loader_lists_and_loads_every_kind_from_the_rewards_folder(ext, reward_dir):
    files = ext["reward_nodes"].reward_files()
    assert {"HPS_v2_compressed.pt", "open_clip_model.safetensors", "sac+logos+ava1-l14-linearMSE.pth",
            "PickScore_v1/model.safetensors", "ImageReward/ImageReward.pt"} <= set(files)
    images = torch.rand(3, 40, 40, 3, generator=torch.Generator().manual_seed(0))
    prompts = ["a fox", "a boat", "a tree"]
    for kind, file, head in [("hpsv2", "HPS_v2_compressed.pt", "(none)"),
                             ("clip_score", "open_clip_model.safetensors", "(none)"),
                             ("aesthetic", "open_clip_model.safetensors", "sac+logos+ava1-l14-linearMSE.pth"),
                             ("pickscore", "PickScore_v1/model.safetensors", "(none)"),
                             ("image_reward", "ImageReward/ImageReward.pt", "(none)")]:
        reward = _load(ext, kind, file, head)
        assert reward.name.startswith(kind)
        scores = reward.score(images, prompts)
        assert scores.shape == (3,) and scores.dtype == torch.float32
        assert not scores.is_inference()
        assert torch.isfinite(scores).all()
    pick = _load(ext, "pickscore", "PickScore_v1/model.safetensors")
    assert type(pick.backbone).__name__ == "_HFClipBackbone"


def test_loader_names_the_missing_file_its_folder_and_its_source(ext, reward_dir):
    with pytest.raises(ValueError) as err:
        _load(ext, "hpsv2", "(no files in models/pso_rewards)")
    msg = str(err.value)
    assert "HPS_v2_compressed.pt or HPS_v2.1_compressed.pt" in msg and str(reward_dir) in msg
    assert "xswu/HPSv2" in msg and "never downloads" in msg
    with pytest.raises(ValueError, match=r"head file '\(none\)'.*sac\+logos.*christophschuhmann"):
        _load(ext, "aesthetic", "open_clip_model.safetensors", "(none)")


# -- Pick-a-Pic import -----------------------------------------------------------------------------

_png, write_parquet = tiny_rewards.png_bytes, tiny_rewards.write_pickapic_parquet
ROWS, KEPT = tiny_rewards.PICKAPIC_ROWS, tiny_rewards.PICKAPIC_KEPT


def _import(ext, b, sigmas, source, name="", size=64, max_pairs=0):
    with torch.inference_mode():
        return ext["pickapic_nodes"].PSOImportPreferencePairs.execute(
            source, b.model, b.clip, b.vae, sigmas, size, max_pairs, name)


def _expected_latents(b, colors):
    from pso.images import resize_center_crop

    pixels = torch.stack([resize_center_crop(torch.from_numpy(
        np.asarray(Image.open(_io.BytesIO(_png(c))).convert("RGB"), dtype=np.float32) / 255.0), 64)
        for c in colors])
    with torch.inference_mode():
        return b.model.model.process_latent_in(b.vae.encode(pixels).float().cpu())


def test_parquet_import_keeps_labelled_pairs_and_reports_every_skipped_row(ext, bundle, input_dir,
                                                                           output_dir):
    b, sigmas = bundle
    write_parquet(input_dir / "pickapic" / "train-00000.parquet")
    assert "pickapic/train-00000.parquet" in ext["pickapic_nodes"].list_sources()
    out = _import(ext, b, sigmas, "pickapic/train-00000.parquet", name="pickapic_small")
    pairs, report = out.result
    assert len(pairs) == 3
    assert pairs.prompts == ["a red square", "a blue square"] and pairs.prompt_index.tolist() == [0, 1, 0]
    winners = [ROWS[i][1 + w] for i, w in KEPT.items()]
    losers = [ROWS[i][2 - w] for i, w in KEPT.items()]
    torch.testing.assert_close(pairs.target, _expected_latents(b, winners))
    torch.testing.assert_close(pairs.reference, _expected_latents(b, losers))
    assert pairs.policy == "euler" and pairs.reference_traj is None
    assert report.splitlines()[0] == "pickapic/train-00000.parquet: 7 row(s) read, 3 pair(s) kept, 4 skipped"
    assert "- 1 tie(s) (equal labels) skipped: row 1" in report
    assert "- 1 unlabelled row(s) (has_label false) skipped: row 5" in report
    assert "- 1 row(s) with a missing image skipped: row 3 (image 1 empty)" in report
    assert re.search(r"- 1 row\(s\) with an unreadable image skipped: row 4 \(UnidentifiedImageError", report)
    assert out.ui["text"] == [report]
    # the saved dataset: every kept pair, in order, with its Pick-a-Pic image ids
    from pso.dataset import PairDataset

    ds = PairDataset.open(output_dir / "pso_pairs" / "pickapic_small")
    assert len(ds) == 3
    assert [r.prompt for r in ds.records] == ["a red square", "a blue square", "a red square"]
    assert [(r.target_source, r.reference_source) for r in ds.records] == [
        ("uid0a", "uid0b"), ("uid2b", "uid2a"), ("uid6a", "uid6b")]
    torch.testing.assert_close(ds.get([0, 1, 2])["target"], pairs.target)
    assert ds.fingerprint.sampler == "euler"
    with pytest.raises(ValueError, match="already exists and is not empty"):  # never overwritten
        _import(ext, b, sigmas, "pickapic/train-00000.parquet", name="pickapic_small")


def test_max_pairs_stops_early_and_says_so(ext, bundle, input_dir):
    b, sigmas = bundle
    write_parquet(input_dir / "p.parquet")
    pairs, report = _import(ext, b, sigmas, "p.parquet", max_pairs=2).result
    assert len(pairs) == 2 and "3 row(s) read, 2 pair(s) kept, 1 skipped" in report
    assert "stopped after max_pairs" in report


def test_a_jsonl_table_gives_the_same_pairs_as_the_parquet(ext, bundle, input_dir):
    b, sigmas = bundle
    write_parquet(input_dir / "p.parquet")
    folder = input_dir / "prefs"
    (folder / "imgs").mkdir(parents=True)
    lines = []
    for i, (caption, c0, c1, l0, l1, has) in enumerate(ROWS):
        names = []
        for k, c in enumerate((c0, c1)):
            name = f"imgs/r{i}_{k}.png"
            if c == "junk":
                (folder / name).write_bytes(b"\x00notanimage")
            elif c is not None:
                (folder / name).write_bytes(_png(c))
            names.append(name)
        lines.append(json.dumps({"caption": caption, "image_0": names[0], "image_1": names[1], "label_0": l0,
                                 "label_1": l1, "has_label": has}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    table_pairs, report = _import(ext, b, sigmas, "prefs/pairs.jsonl").result
    parquet_pairs, _ = _import(ext, b, sigmas, "p.parquet").result
    torch.testing.assert_close(table_pairs.target, parquet_pairs.target)
    torch.testing.assert_close(table_pairs.reference, parquet_pairs.reference)
    assert "row 3 (image 1 r3_1.png not found)" in report and "unreadable image skipped: row 4" in report


def test_sources_outside_comfyuis_folders_are_refused(ext, bundle, input_dir, tmp_path):
    b, sigmas = bundle
    write_parquet(tmp_path / "outside.parquet")
    with pytest.raises(ValueError, match=r"inside ComfyUI's input folder .* without '\.\.'"):
        _import(ext, b, sigmas, "../outside.parquet")
    (input_dir / "link.parquet").symlink_to(tmp_path / "outside.parquet")
    with pytest.raises(ValueError, match="outside .*copy the file"):
        _import(ext, b, sigmas, "link.parquet")
    (input_dir / "t").mkdir()
    (input_dir / "t" / "pairs.jsonl").write_text(json.dumps(
        {"caption": "x", "image_0": "../../outside.png", "image_1": "b.png", "label_0": 1}) + "\n")
    with pytest.raises(ValueError, match="must be a path relative to .* without '..'"):
        _import(ext, b, sigmas, "t/pairs.jsonl")
    (input_dir / "t" / "bad.csv").write_text("prompt,image_0,label_0\nx,a.png,1\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['image_1'\]"):
        _import(ext, b, sigmas, "t/bad.csv")


def test_a_file_with_only_ties_is_an_error_that_shows_the_report(ext, bundle, input_dir):
    b, sigmas = bundle
    pq.write_table(pa.table({"caption": ["a", "b"], "jpg_0": [_png((1, 1, 1))] * 2,
                             "jpg_1": [_png((9, 9, 9))] * 2,
                             "label_0": [0.5, 0.5], "label_1": [0.5, 0.5]}), str(input_dir / "ties.parquet"))
    with pytest.raises(ValueError, match=r"no usable pair(.|\n)*2 tie\(s\) .* row 0, 1"):
        _import(ext, b, sigmas, "ties.parquet")


# -- PSO Evaluate ----------------------------------------------------------------------------------

def test_evaluate_tabulates_each_rewards_scores_of_its_own_samples(ext, bundle, reward_dir):
    import comfy.samplers

    from pso_test_fixtures import tiny_models

    b, _ = bundle
    with torch.inference_mode():
        other = tiny_models.build_bundle("sd15", seed=9).model
    hps = _load(ext, "hpsv2", "HPS_v2_compressed.pt")
    aes = _load(ext, "aesthetic", "open_clip_model.safetensors", "sac+logos+ava1-l14-linearMSE.pth")
    sampler = comfy.samplers.sampler_object("lcm")
    prompts = "a red fox\n\na lighthouse at dusk\n"

    def run():
        with torch.inference_mode():
            return ext["eval_nodes"].PSOEvaluate.execute(
                prompts, b.clip, b.vae, sampler, "trailing", "1,2", 3, 64, 64, b.model, "base", hps,
                other, "other", None, "model 3", None, "model 4", aes).result

    table, chart, images = run()
    lines = table.splitlines()
    assert lines[0] == f"| model | steps | {hps.name} | {aes.name} |" and len(lines) == 2 + 4
    assert [ln.split("|")[1:3] for ln in lines[2:]] == [[" base ", " 1 "], [" base ", " 2 "],
                                                       [" other ", " 1 "], [" other ", " 2 "]]
    assert images.shape == (8, 64, 64, 3)
    # row "other, 2 steps" is the mean of each reward's scores of the images the node sampled for it
    cell = images[6:8]
    for col, reward in ((3, hps), (4, aes)):
        mean = float(reward.score(cell, ["a red fox", "a lighthouse at dusk"]).mean())
        shown = float(lines[5].split("|")[col].split("±")[0])
        assert shown == pytest.approx(mean, abs=2e-3 if col == 4 else 2e-4)
    assert not torch.equal(images[0], images[4]), "the two models must sample different images"
    assert chart.ndim == 4 and chart.shape[0] == 1 and chart.shape[-1] == 3
    blue = torch.tensor([66, 133, 244]) / 255.0  # model 1's bar colour
    assert ((chart[0] - blue).abs().sum(-1) < 1e-3).sum() > 50, "the bars are drawn"
    table2, _, images2 = run()
    assert table2 == table and torch.equal(images2, images)


def test_evaluate_refuses_bad_step_lists_and_duplicate_labels(ext, bundle, reward_dir):
    import comfy.samplers

    b, _ = bundle
    hps = _load(ext, "hpsv2", "HPS_v2_compressed.pt")
    sampler = comfy.samplers.sampler_object("lcm")
    node = ext["eval_nodes"].PSOEvaluate
    with torch.inference_mode():
        with pytest.raises(ValueError, match="'x' is not an integer; write e.g. 1,2,4"):
            node.execute("a", b.clip, b.vae, sampler, "trailing", "1,x", 0, 64, 64, b.model, "m", hps)
        with pytest.raises(ValueError, match=r"model labels must differ, got \['m', 'm'\]"):
            node.execute("a", b.clip, b.vae, sampler, "trailing", "1", 0, 64, 64, b.model, "m", hps, b.model,
                         "m")
        with pytest.raises(ValueError, match="prompt list is empty"):
            node.execute(" \n", b.clip, b.vae, sampler, "trailing", "1", 0, 64, 64, b.model, "m", hps)


def test_evaluate_stops_when_the_user_cancels(ext, bundle, reward_dir):
    import comfy.model_management as mm
    import comfy.samplers

    b, _ = bundle
    hps = _load(ext, "hpsv2", "HPS_v2_compressed.pt")
    mm.interrupt_current_processing(True)
    try:
        with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
            ext["eval_nodes"].PSOEvaluate.execute("a\nb", b.clip, b.vae, comfy.samplers.sampler_object("lcm"),
                                                  "trailing", "1", 0, 64, 64, b.model, "m", hps)
    finally:
        mm.interrupt_current_processing(False)


def test_evaluate_paper_preset_reads_a_prompt_file_and_prints_table1_and_win_rates(ext, bundle, reward_dir,
                                                                                   input_dir):
    """preset 'paper': steps 1 and 4 whatever the steps box says, prompts from a Pick-a-Pic parquet in the
    input folder (unique captions, first prompt_limit), Table 1's columns in the paper's order (the CLIP
    score as the cosine), and model 2's win rate over model 1 from the same per-prompt scores."""
    import comfy.samplers

    b, _ = bundle
    pq.write_table(pa.table({"caption": ["a red fox", "a boat", "a red fox", "a tree", "a cat"]}),
                   str(input_dir / "test-00000-of-00001.parquet"))
    clip = _load(ext, "clip_score", "open_clip_model.safetensors")
    aes = _load(ext, "aesthetic", "open_clip_model.safetensors", "sac+logos+ava1-l14-linearMSE.pth")
    with torch.inference_mode():
        table, _, images = ext["eval_nodes"].PSOEvaluate.execute(
            "ignored", b.clip, b.vae, comfy.samplers.sampler_object("lcm"), "trailing", "2", 5, 64, 64,
            b.model, "base", aes, b.model, "same", None, "model 3", None, "model 4", clip, None, None, None,
            "paper", "test-00000-of-00001.parquet", 3).result
    lines = table.splitlines()
    assert lines[0] == "| Dataset | Method | Inference Steps | CLIP Score | Aesthetic Score |"
    assert [ln.split("|")[2:4] for ln in lines[2:6]] == [[" base ", " 1 "], [" base ", " 4 "],
                                                         [" same ", " 1 "], [" same ", " 4 "]]
    assert images.shape == (3 * 2 * 2, 64, 64, 3), "3 unique prompts x 2 models x steps 1 and 4"
    prompts = ["a red fox", "a boat", "a tree"]
    cos = float(clip.score(images[3:6], prompts).mean()) / 100   # base, 4 steps, CLIP score as the cosine
    assert float(lines[3].split("|")[4]) == pytest.approx(cos, abs=1e-4)
    # the same model twice: every prompt ties, so the win rate is exactly one half
    assert "| prompts | 1 | CLIP Score | 0.500 | [0.500, 0.500] | 0 / 3 / 0 |" in table
