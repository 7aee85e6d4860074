"""Reward models load from files in the real layouts, score with the right shape, and batch invariantly.

The files are small random models saved exactly as the real ones are (tests/tiny_rewards.py). Facts
checked: each kind loads through ``load_reward`` and gives (B,) float32 CPU scores; scores do not
depend on the batch size or on the other images in a batch; the score formulas (PickScore's
exp(logit_scale) * cos, HPSv2's cos, CLIP score's clipped 100 * cos, the aesthetic MLP on the
normalised embedding) match an independent computation; the architecture is read off the shapes
(ViT-H-14's 80-wide heads from the open_clip config, tiny files by the 64-wide convention);
``label_pairs`` follows the scores and drops ties within the margin; missing files name the file,
the folder and where to get them.
"""

from __future__ import annotations

import math

import pytest
import tiny_rewards
import torch
import torch.nn.functional as F

from pso import rewards
from tools.comfy_host import host_path

pytest.importorskip("open_clip")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards")
    return {
        "hpsv2": tiny_rewards.save_hpsv2(root / "HPS_v2_compressed.pt"),
        "clip": tiny_rewards.save_open_clip(root / "open_clip_model.safetensors", seed=3),
        "clip_bin": tiny_rewards.save_open_clip(root / "open_clip_pytorch_model.bin", seed=3),
        "pick": tiny_rewards.save_hf_clip(root / "PickScore_v1", seed=1),
        "pick_tok": tiny_rewards.save_hf_clip(root / "PickScore_tok", seed=1,
                                              tokenizer_from=host_path() / "comfy" / "sd1_tokenizer"),
        "head": tiny_rewards.save_aesthetic_head(root / "sac+logos+ava1-l14-linearMSE.pth", dim=32),
        "image_reward": tiny_rewards.save_image_reward(root / "ImageReward"),
    }


def _tokenizer_dir():
    return host_path() / "comfy" / "sd1_tokenizer"


def _images(n: int, seed: int = 0, size=(40, 48)) -> torch.Tensor:
    return torch.rand(n, *size, 3, generator=torch.Generator().manual_seed(seed))


PROMPTS = ["a red fox in snow", "a lighthouse at dusk", "a bowl of ramen", "two cats", "an astronaut",
           "a watercolor forest", "a city at night"]


def _load(kind, files, batch_size=8):
    path = {"hpsv2": files["hpsv2"], "clip_score": files["clip"], "pickscore": files["pick"],
            "aesthetic": files["clip"], "image_reward": files["image_reward"]}[kind]
    head = files["head"] if kind == "aesthetic" else None
    return rewards.load_reward(kind, path, head, batch_size=batch_size, tokenizer_fallback=_tokenizer_dir())


@pytest.mark.parametrize("kind", sorted(rewards.REWARD_KINDS))
def test_each_kind_scores_one_float_per_image_independent_of_batching(kind, files):
    images = _images(7)
    full = _load(kind, files, batch_size=7).score(images, PROMPTS)
    assert full.shape == (7,) and full.dtype == torch.float32 and full.device.type == "cpu"
    assert torch.isfinite(full).all() and full.std() > 0, "random images must get different scores"
    chunked = _load(kind, files, batch_size=3).score(images, PROMPTS)
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-4)
    parts = torch.cat([_load(kind, files, batch_size=2).score(images[i:i + 2], PROMPTS[i:i + 2])
                       for i in range(0, 7, 2)])
    torch.testing.assert_close(parts, full, rtol=1e-4, atol=1e-4)


def _open_clip_model(path, quick_gelu=False):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    m = CLIP(32, CLIPVisionCfg(**tiny_rewards.VISION), CLIPTextCfg(**tiny_rewards.TEXT),
             quick_gelu=quick_gelu)
    m.load_state_dict(rewards.load_state_dict_file(path))
    return m.eval()


def _pixels(images, size=32):
    x = images.movedim(-1, 1)
    h, w = x.shape[-2:]
    s = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                      antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)
    mean, std = torch.tensor(rewards.OPENAI_MEAN), torch.tensor(rewards.OPENAI_STD)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def test_hpsv2_and_clip_score_are_the_cosines_of_the_open_clip_model(files):
    import open_clip

    images, prompts = _images(3, seed=4), PROMPTS[:3]
    model = _open_clip_model(files["hpsv2"])
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=77)(prompts)
    with torch.no_grad():
        cos = F.cosine_similarity(model.encode_image(_pixels(images)), model.encode_text(tokens))
    torch.testing.assert_close(_load("hpsv2", files).score(images, prompts), cos, rtol=1e-4, atol=1e-5)
    model = _open_clip_model(files["clip"])
    with torch.no_grad():
        cos = F.cosine_similarity(model.encode_image(_pixels(images)), model.encode_text(tokens))
    torch.testing.assert_close(_load("clip_score", files).score(images, prompts), 100 * cos.clamp(min=0),
                               rtol=1e-4, atol=1e-3)


def test_aesthetic_is_the_mlp_on_the_normalised_image_embedding_and_ignores_the_prompt(files):
    images = _images(3, seed=5)
    head = torch.load(files["head"], weights_only=True)
    model = _open_clip_model(files["clip"], quick_gelu=True)  # OpenAI ViT-L/14 uses QuickGELU
    with torch.no_grad():
        x = F.normalize(model.encode_image(_pixels(images)), dim=-1)
        for i in (0, 2, 4, 6, 7):
            x = x @ head[f"layers.{i}.weight"].T + head[f"layers.{i}.bias"]
    reward = _load("aesthetic", files)
    got = reward.score(images, PROMPTS[:3])
    torch.testing.assert_close(got, x[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reward.score(images, ["x", "y", "z"]), got)


def test_pickscore_is_logit_scale_times_cosine_of_the_transformers_model(files):
    from transformers import CLIPModel, CLIPTokenizer

    images, prompts = _images(3, seed=6), PROMPTS[:3]
    model = CLIPModel.from_pretrained(str(files["pick"])).eval()
    tok = CLIPTokenizer.from_pretrained(str(_tokenizer_dir()))
    enc = tok(prompts, padding=True, return_tensors="pt")  # pad to the longest: eos pooling ignores padding
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=_pixels(images)).pooler_output)
        txt = model.text_projection(model.text_model(**enc).pooler_output)
        want = model.logit_scale.exp() * F.cosine_similarity(img, txt)
    got = _load("pickscore", files).score(images, prompts)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the same folder with its own tokenizer files gives the same scores
    own = rewards.load_reward("pickscore", files["pick_tok"]).score(images, prompts)
    torch.testing.assert_close(own, got)


def test_a_safetensors_and_a_bin_file_of_one_model_score_alike(files):
    images = _images(2, seed=8)
    a = rewards.load_reward("clip_score", files["clip"]).score(images, PROMPTS[:2])
    b = rewards.load_reward("clip_score", files["clip_bin"]).score(images, PROMPTS[:2])
    torch.testing.assert_close(a, b)


def test_architecture_is_read_from_shapes_including_vit_h_heads():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    sd = tiny_rewards.open_clip_state_dict()
    cfg = rewards.infer_open_clip_config(sd)
    assert cfg["embed_dim"] == 32 and cfg["matched"] is None
    assert {k: cfg["vision_cfg"][k] for k in tiny_rewards.VISION} == tiny_rewards.VISION
    assert {k: cfg["text_cfg"][k] for k in tiny_rewards.TEXT} == tiny_rewards.TEXT
    # ViT-H-14's shapes (meta tensors: no memory) map to its config's 16 heads of 80, not 1280 / 64 = 20
    with torch.device("meta"):
        big = CLIP(1024, CLIPVisionCfg(image_size=224, layers=32, width=1280, head_width=80, patch_size=14),
                   CLIPTextCfg(context_length=77, vocab_size=49408, width=1024, heads=16, layers=24))
    cfg = rewards.infer_open_clip_config(big.state_dict())
    assert cfg["matched"] == "ViT-H-14"
    assert cfg["vision_cfg"]["head_width"] == 80 and cfg["text_cfg"]["heads"] == 16
    assert cfg["vision_cfg"]["image_size"] == 224 and cfg["vision_cfg"]["layers"] == 32
    assert math.isclose(cfg["vision_cfg"]["mlp_ratio"], 4.0)


def test_label_pairs_follow_the_scores_and_drop_ties_within_the_margin():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.5, 0.5], [0.30, 0.34]])
    winner, loser, kept = rewards.label_pairs(scores, margin=0.05)
    assert winner.tolist() == [1, 0, 0, 1] and loser.tolist() == [0, 1, 0, 0]
    assert kept.tolist() == [True, True, False, False]
    assert rewards.label_pairs(scores, margin=0.0)[2].tolist() == [True, True, False, True]
    w, l_, k = rewards.label_pairs(torch.tensor([[0.2, 0.7, 0.4, 0.1]]), 0.0)
    assert (w.item(), l_.item(), k.item()) == (1, 3, True)
    # labels from real reward scores: the winner's score is never below the loser's
    g = torch.Generator().manual_seed(0)
    s = torch.randn(50, 2, generator=g)
    w, l_, k = rewards.label_pairs(s, 0.1)
    assert (s[torch.arange(50), w] - s[torch.arange(50), l_])[k].min() > 0.1
    assert torch.equal(k, (s[:, 0] - s[:, 1]).abs() > 0.1)
    with pytest.raises(rewards.RewardError, match="margin must be a finite number >= 0, got -1"):
        rewards.label_pairs(s, -1)


def test_pareto_labels_need_every_reward_to_agree():
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],    # reward A
                      [[0.5, 0.1], [0.2, 0.9], [0.1, 0.5]]])   # reward B
    winner, loser, kept = rewards.pareto_label_pairs(s, [0.1, 0.1])
    assert kept.tolist() == [True, True, False]
    assert winner[:2].tolist() == [0, 1] and loser[:2].tolist() == [1, 0]


def test_labels_from_a_loaded_reward_follow_its_scores(files):
    reward = _load("hpsv2", files)
    images = _images(8, seed=11)
    prompts = [p for p in PROMPTS[:4] for _ in range(2)]
    scores = reward.score(images, prompts).view(4, 2)
    winner, loser, kept = rewards.label_pairs(scores, 0.0)
    assert torch.all(scores.gather(1, winner[:, None]) > scores.gather(1, loser[:, None]))
    assert kept.all()


def test_missing_files_name_the_file_the_folder_and_the_source(tmp_path, files):
    with pytest.raises(rewards.RewardError) as err:
        rewards.load_reward("hpsv2", tmp_path / "HPS_v2.1_compressed.pt")
    msg = str(err.value)
    assert "HPS_v2.1_compressed.pt" in msg and str(tmp_path) in msg and "xswu/HPSv2" in msg
    with pytest.raises(rewards.RewardError,
                       match=r"sac\+logos\+ava1-l14-linearMSE.pth.*improved-aesthetic-predictor"):
        rewards.load_reward("aesthetic", files["clip"], None)
    with pytest.raises(rewards.RewardError, match="valid kinds: \\['aesthetic', 'clip_score', 'hpsv2', "
                                                  "'image_reward', 'pickscore'\\]"):
        rewards.load_reward("laion", files["clip"])


def test_wrong_files_are_refused_with_what_they_are(tmp_path, files):
    with pytest.raises(rewards.RewardError, match="takes 32-d embeddings but .* gives 16-d"):
        small = tiny_rewards.save_open_clip(tmp_path / "small.safetensors", embed_dim=16)
        rewards.load_reward("aesthetic", small, files["head"])
    with pytest.raises(rewards.RewardError, match="no layers.<i>.weight"):
        rewards.load_reward("aesthetic", files["clip"], files["hpsv2"])
    with pytest.raises(rewards.RewardError, match="transformers CLIPModel: put it in a folder with its "
                                                  "config.json"):
        import safetensors.torch

        hf = tmp_path / "model.safetensors"
        safetensors.torch.save_file({"vision_model.x": torch.zeros(1), "text_model.y": torch.zeros(1)},
                                    str(hf))
        rewards.load_reward("clip_score", hf)
    with pytest.raises(rewards.RewardError, match=r"\(2, 8, 8, 3\) images for 3 prompt"):
        _load("hpsv2", files).score(torch.rand(2, 8, 8, 3), ["a", "b", "c"])


@pytest.mark.slow
@pytest.mark.parametrize("arch,kind,file", [("ViT-L-14", "aesthetic", "open_clip_model.safetensors"),
                                            ("ViT-H-14", "hpsv2", "HPS_v2.1_compressed.pt")])
def test_real_size_architectures_load_from_their_real_layouts(tmp_path, arch, kind, file):
    """Random weights at the real size and in the real file layout (ViT-L/14 open_clip safetensors +
    the 768-d aesthetic head; ViT-H-14 under HPSv2's 'state_dict' key) load and score at 224 px."""
    import open_clip
    import safetensors.torch

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=kind == "aesthetic")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    images = _images(2, seed=1, size=(256, 320))
    with torch.no_grad():
        want = F.normalize(model.eval().encode_image(_pixels(images, 224)), dim=-1)
    del model
    path = tmp_path / file
    if kind == "aesthetic":
        safetensors.torch.save_file(sd, str(path))
        head = tiny_rewards.save_aesthetic_head(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", dim=768)
    else:
        torch.save({"state_dict": sd}, path)
        head = None
    del sd
    reward = rewards.load_reward(kind, path, head, batch_size=1)
    assert reward.backbone.arch == arch and reward.backbone.image_size == 224
    with torch.no_grad():
        got = F.normalize(reward.backbone.image_features(_pixels(images, 224)), dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert reward.score(images, PROMPTS[:2]).shape == (2,)
