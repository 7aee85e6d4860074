"""``pso-eval`` on a tiny diffusers model, a LoRA written by the headless trainer, tiny local prompt files
and the four reward kinds of the paper's Table 1 (tiny random weights in the real layouts).

Facts checked: the command writes Table 1 (one row per dataset, model and step count; the paper's
columns), every per-prompt score, and the LoRA-vs-base win rates; the LoRA's images are what the
trainer's own LoRA-adapted UNet samples from the same seed (so diffusers' loader read the file right)
and differ from the base model's; an image does not depend on the batch it is sampled in; a used
output folder is refused before any work.
"""

from __future__ import annotations

import csv

import headless_models as hm
import pytest
import tiny_rewards
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("open_clip")
pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import diffusers
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pso import lora_format
    from pso.headless import adapter
    from tools.comfy_host import host_path

    root = tmp_path_factory.mktemp("eval")
    model = hm.write_diffusers_model(root / "model")
    hm.write_vae(model)
    unet = diffusers.UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    net = adapter.add_lora(unet, 4, 4.0, "attention", 0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for path in net.paths:
            up = net.lora_up(path)
            up.copy_(torch.randn(up.shape, generator=g) * 0.2)
    lora = lora_format.save_lora_file(net.lora_state_dict(), root / "loras", "pso", family="SD15",
                                          prediction="eps", latent_channels=4, ldm_shapes=None, settings={})
    pq.write_table(pa.table({"caption": ["a red fox", "two cats", "a red fox", "a boat"]}),
                   str(root / "test-00000-of-00001.parquet"))
    (root / "PartiPrompts.tsv").write_text("Prompt\tCategory\nbond\tAbstract\na lighthouse\tArtifacts\n",
                                           encoding="utf-8")
    rw = root / "rewards"
    files = {"pickscore": str(tiny_rewards.save_hf_clip(rw / "PickScore_v1", seed=1)),
             "clip_score": str(tiny_rewards.save_open_clip(rw / "open_clip_model.safetensors", seed=3)),
             "image_reward": str(tiny_rewards.save_image_reward(rw / "ImageReward"))}
    head = tiny_rewards.save_aesthetic_head(rw / "sac+logos+ava1-l14-linearMSE.pth", dim=32)
    files["aesthetic"] = f"{files['clip_score']},{head}"
    return {"root": root, "model": model, "lora": lora, "unet": unet, "rewards": files,
            "tokenizer": host_path() / "comfy" / "sd1_tokenizer"}


def _csv(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _args(s, out, batch=2):
    args = ["--model", str(s["model"]), "--lora", f"pso={s['lora']}",
            "--prompts", f"Pickapic Test={s['root'] / 'test-00000-of-00001.parquet'}",
            "--prompts", f"Parti-Prompts={s['root'] / 'PartiPrompts.tsv'}",
            "--steps", "1,4", "--size", "64", "--batch-size", str(batch), "--bootstrap", "200", "--seed", "7",
            "--tokenizer-fallback", str(s["tokenizer"]), "--device", "cpu", "--out", str(out)]
    for kind, path in s["rewards"].items():
        args += ["--reward", f"{kind}={path}"]
    return args


def test_the_command_writes_table1_scores_and_the_paired_comparison(setup, capsys):
    from pso_train import evaluate

    out = setup["root"] / "out"
    assert evaluate.main(_args(setup, out)) == 0
    table = (out / "table1.md").read_text().splitlines()
    assert table[0] == ("| Dataset | Method | Inference Steps | PickScore | CLIP Score | ImageReward | "
                        "Aesthetic Score |")
    assert [tuple(c.strip() for c in line.split("|")[2:4]) for line in table[2:]] == \
        [(m, n) for _ in range(2) for m in ("base", "pso") for n in ("1", "4")]
    rows = _csv(out / "scores.csv")
    assert len(rows) == (3 + 2) * 2 * 2 * 4     # prompts x models x step counts x rewards
    assert {r["prompt"] for r in rows if r["dataset"] == "Pickapic Test"} == {"a red fox", "two cats",
                                                                               "a boat"}
    assert all(int(r["seed"]) == 7 + int(r["prompt_index"]) for r in rows)
    cmp_rows = _csv(out / "comparison.csv")
    assert len(cmp_rows) == 2 * 2 * 4 and all(0 <= float(r["low"]) <= float(r["win_rate"]) <= float(r["high"])
                                               <= 1 for r in cmp_rows)
    score = {(r["dataset"], r["model"], r["steps"], r["reward"], r["prompt_index"]): float(r["score"])
             for r in rows}
    base = [v for k, v in score.items() if k[1] == "base"]
    lora = [score[(k[0], "pso", *k[2:])] for k in score if k[1] == "base"]
    assert max(abs(a - b) for a, b in zip(base, lora, strict=True)) > 1e-4, "the LoRA changes the images"
    assert "| Pickapic Test | base | 1 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists and is not empty"):
        evaluate.main(_args(setup, out))


def test_lora_images_are_the_trainers_own_and_do_not_depend_on_the_batch(setup):
    from pso_train import evaluate
    from pso_train.model import load_model

    spec = evaluate.ModelSpec(str(setup["model"]))
    loaded = load_model(spec, torch.device("cpu"), (64, 64))
    vae = evaluate.load_vae(spec, None, torch.device("cpu"))
    sampler = evaluate.Sampler(loaded, vae, {"pso": str(setup["lora"])}, "trailing", "renoise", (64, 64),
                               torch.device("cpu"))
    prompts, seeds = ["a red fox", "two cats", "a boat"], [7, 8, 9]
    together = sampler("pso", prompts, seeds, 4)
    alone = torch.cat([sampler("pso", [p], [s], 4) for p, s in zip(prompts, seeds, strict=True)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    base = sampler("base", prompts, seeds, 4)
    assert (base - together).abs().max() > 1e-3
    # the trainer's LoRA-adapted UNet (the adapter the file was written from), same text encoder and seeds
    loaded.unet = setup["unet"]
    own = evaluate.Sampler(loaded, vae, {}, "trailing", "renoise", (64, 64), torch.device("cpu"))
    torch.testing.assert_close(own("base", prompts, seeds, 4), together, rtol=1e-4, atol=1e-4)
