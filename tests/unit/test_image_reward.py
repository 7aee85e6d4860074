"""ImageReward loads from ImageReward.pt + a local BERT tokenizer and computes the authors' score.

The tiny checkpoint (tests/tiny_rewards.py) is in the real layout: the ViT is built with timm's
VisionTransformer (BLIP's vit.py is timm's ViT), the text encoder's tensors are named as BLIP's med.py
names them. Facts checked: the score equals an independent computation (timm's ViT forward, a plain-torch
BERT layer with self- and cross-attention, the MLP, the authors' mean/std); long prompts are cut at 35
tokens as ImageReward does; a missing tokenizer, a wrong file and a too-large vocabulary are refused with
what to do; nothing is fetched (the tokenizer comes only from the folder given or beside the file).
"""

from __future__ import annotations

import math

import pytest
import tiny_rewards
import torch
import torch.nn.functional as F

from pso import reward_blip, rewards

pytest.importorskip("transformers")
pytest.importorskip("timm")


@pytest.fixture(scope="module")
def ir_path(tmp_path_factory):
    return tiny_rewards.save_image_reward(tmp_path_factory.mktemp("ir") / "ImageReward")


def _ln(x, sd, p, eps=1e-12):
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps)


def _lin(x, sd, p):
    return F.linear(x, sd[f"{p}.weight"], sd[f"{p}.bias"])


def _attention(x, ctx, mask, sd, p, heads):
    """BERT attention as med.py computes it: softmax(QK^T / sqrt(d) + mask) V, dense, residual, LayerNorm."""
    b, n, h = x.shape
    d = h // heads

    def split(t):
        return t.view(b, -1, heads, d).transpose(1, 2)

    q, k, v = split(_lin(x, sd, f"{p}.self.query")), split(_lin(ctx, sd, f"{p}.self.key")), \
        split(_lin(ctx, sd, f"{p}.self.value"))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) + (1.0 - mask[:, None, None, :].float()) * -1e9
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, h)
    return _ln(_lin(out, sd, f"{p}.output.dense") + x, sd, f"{p}.output.LayerNorm")


def _reference_score(state, pixels, ids, mask):
    vit = tiny_rewards.blip_vit()
    vit.load_state_dict({k.removeprefix("blip.visual_encoder."): v for k, v in state.items()
                         if k.startswith("blip.visual_encoder.")})
    image = vit.forward_features(pixels)                                    # (B, 1 + N, W), final norm
    sd = {k.removeprefix("blip.text_encoder."): v for k, v in state.items()
          if k.startswith("blip.text_encoder.")}
    heads = tiny_rewards.IR_TEXT["width"] // 64
    x = sd["embeddings.word_embeddings.weight"][ids] + \
        sd["embeddings.position_embeddings.weight"][:ids.shape[1]]
    x = _ln(x, sd, "embeddings.LayerNorm")
    ones = torch.ones(image.shape[:2])
    for i in range(tiny_rewards.IR_TEXT["layers"]):
        p = f"encoder.layer.{i}"
        x = _attention(x, x, mask, sd, f"{p}.attention", heads)
        x = _attention(x, image, ones, sd, f"{p}.crossattention", heads)
        x = _ln(_lin(F.gelu(_lin(x, sd, f"{p}.intermediate.dense")), sd, f"{p}.output.dense") + x, sd,
                f"{p}.output.LayerNorm")
    h = x[:, 0]
    for idx in (0, 2, 4, 6, 7):                                             # MLP: linear layers only
        h = _lin(h, state, f"mlp.layers.{idx}")
    return (h[:, 0] - 0.16717362830052426) / 1.0333394966054072


def test_score_is_the_authors_formula_on_an_independent_forward(ir_path):
    reward = rewards.load_reward("image_reward", ir_path, batch_size=2)
    images = torch.rand(3, 40, 48, 3, generator=torch.Generator().manual_seed(2))
    prompts = ["a red fox in snow", "two cats at night", "a lighthouse at dusk"]
    got = reward.score(images, prompts)
    tok = reward.backbone.tokenizer(prompts, padding="max_length", max_length=35, truncation=True,
                                    return_tensors="pt")
    assert tok.input_ids.shape == (3, 35) and tok.input_ids[0, 0] == 2          # [CLS] first, padded to 35
    pixels = rewards.preprocess(images, 32, rewards.OPENAI_MEAN, rewards.OPENAI_STD)
    with torch.no_grad():
        want = _reference_score(torch.load(ir_path, weights_only=True), pixels, tok.input_ids,
                                tok.attention_mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.std() > 0.05, "different images and prompts must get different scores"
    assert reward.backbone.image_size == 32 and reward.backbone.arch.startswith("BLIP (ViT 128 x 2")


def test_prompts_are_cut_at_35_tokens_and_the_image_matters(ir_path):
    reward = rewards.load_reward("ImageReward", ir_path)   # the paper's spelling names the same kind
    assert reward.kind == "image_reward"
    images = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    long = " ".join(["a red fox"] * 11)                     # 33 words + [CLS] + [SEP] > 35
    s = reward.score(images, [long, long + " in snow at night"])
    assert s[0] == s[1], "tokens past ImageReward's 35 are ignored"
    other = reward.score(torch.zeros(1, 32, 32, 3), [long])
    assert abs(float(other[0] - s[0])) > 1e-4


def test_missing_tokenizer_says_where_to_put_it(tmp_path):
    path = tiny_rewards.save_image_reward(tmp_path / "ir", tokenizer=False)
    with pytest.raises(rewards.RewardError, match=r"no BERT tokenizer \(vocab.txt\).*folder named "
                       r"bert-base-uncased beside ImageReward.pt.*never downloads"):
        rewards.load_reward("image_reward", path)
    tok = tiny_rewards.save_bert_tokenizer(tmp_path / "elsewhere" / "bert")
    assert rewards.load_reward("image_reward", path, tokenizer=tok).score(
        torch.rand(1, 32, 32, 3), ["two cats"]).shape == (1,)


def test_wrong_files_are_refused_with_what_they_are(tmp_path, ir_path):
    clip = tiny_rewards.save_open_clip(tmp_path / "open_clip_model.safetensors")
    tiny_rewards.save_bert_tokenizer(tmp_path / "bert-base-uncased")
    with pytest.raises(rewards.RewardError, match=r"no blip.visual_encoder.\*, blip.text_encoder.\*, mlp.\* "
                                                  "tensors.*THUDM's ImageReward.pt"):
        rewards.load_reward("image_reward", clip)
    big = tmp_path / "big"
    tiny_rewards.save_bert_tokenizer(big)
    with open(big / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("\n".join(f"extra{i}" for i in range(10)) + "\n")
    with pytest.raises(rewards.RewardError, match=r"has 43 tokens but the text encoder only 33 embeddings"):
        rewards.load_reward("image_reward", ir_path, tokenizer=big)
    with pytest.raises(rewards.RewardError, match="unknown ViT tensor blip.visual_encoder.head_dist"):
        reward_blip.vision_key("head_dist.weight")
