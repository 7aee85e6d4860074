"""Small random reward-model files in the layouts of the real ones (the real weights cannot be fetched).

- open_clip CLIP ViT state dicts (what ``HPS_v2_compressed.pt`` and ``open_clip_pytorch_model.bin``
  hold): built with ``open_clip.model.CLIP`` at a small size, with CLIP's real 49408-token vocabulary
  and 77-token context so the bundled tokenizer applies;
- a transformers ``CLIPModel`` folder (config.json + model.safetensors), PickScore's layout;
- the improved aesthetic predictor's MLP head (``layers.0.weight`` ... ``layers.7.bias``).
"""

from __future__ import annotations

from pathlib import Path

import torch

VISION = {"width": 64, "layers": 2, "head_width": 64, "patch_size": 8, "image_size": 32}
TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}


def open_clip_state_dict(seed: int = 0, embed_dim: int = 32,
                         quick_gelu: bool = False) -> dict[str, torch.Tensor]:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(embed_dim, CLIPVisionCfg(**VISION), CLIPTextCfg(**TEXT), quick_gelu=quick_gelu)
    # open_clip zero-initialises nothing that matters here, but make the projections clearly non-trivial
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.visual.proj.copy_(torch.randn(model.visual.proj.shape, generator=g) * 0.2)
        model.text_projection.copy_(torch.randn(model.text_projection.shape, generator=g) * 0.2)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_hpsv2(path: Path, seed: int = 0) -> Path:
    """HPSv2's file layout: torch.save({'state_dict': <open_clip CLIP state dict>, ...})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": open_clip_state_dict(seed), "epoch": 1}, path)
    return path


def save_open_clip(path: Path, seed: int = 0, embed_dim: int = 32) -> Path:
    """An open_clip model file (safetensors or .bin, as open_clip's hub repositories ship both)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = open_clip_state_dict(seed, embed_dim)
    if path.suffix == ".safetensors":
        import safetensors.torch

        safetensors.torch.save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def save_hf_clip(folder: Path, seed: int = 0, tokenizer_from: Path | None = None) -> Path:
    """A transformers CLIPModel folder like yuvalkirstain/PickScore_v1 (no tokenizer files unless given)."""
    import shutil

    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=32)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    if tokenizer_from is not None:
        for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
            if (tokenizer_from / name).is_file():
                shutil.copy(tokenizer_from / name, folder / name)
    return folder


def save_aesthetic_head(path: Path, dim: int = 32, seed: int = 0) -> Path:
    """The improved aesthetic predictor's head: Linear layers at indices 0, 2, 4, 6, 7 (Dropouts between)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [dim, 64, 32, 16, 8, 1]
    sd = {}
    for idx, (i, o) in zip((0, 2, 4, 6, 7), zip(sizes, sizes[1:], strict=False), strict=True):
        sd[f"layers.{idx}.weight"] = torch.randn(o, i, generator=g) / i ** 0.5
        sd[f"layers.{idx}.bias"] = torch.randn(o, generator=g) * 0.1
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


# -- Pick-a-Pic-layout preference data ---------------------------------------------------------------

def png_bytes(color, size=(48, 40)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


#: caption, image 0 colour, image 1 colour, label_0, label_1, has_label; None colour: missing image,
#: "junk": bytes that are no image.
PICKAPIC_ROWS = [
    ("a red square", (220, 30, 30), (30, 30, 220), 1.0, 0.0, True),        # 0 kept, winner 0
    ("a tie", (10, 200, 10), (200, 200, 10), 0.5, 0.5, True),              # 1 tie
    ("a blue square", (200, 120, 0), (20, 40, 230), 0.0, 1.0, True),        # 2 kept, winner 1
    ("a missing one", (90, 90, 90), None, 1.0, 0.0, True),                  # 3 missing image
    ("a broken one", "junk", (120, 10, 60), 0.0, 1.0, True),                # 4 unreadable image
    ("unlabelled", (1, 2, 3), (4, 5, 6), 0.0, 0.0, False),                  # 5 unlabelled
    ("a red square", (250, 60, 60), (0, 0, 0), 1.0, 0.0, True),            # 6 kept, winner 0
]
PICKAPIC_KEPT = {0: 0, 2: 1, 6: 0}  # row -> winner


def _cell(color):
    return None if color is None else b"\x00notanimage" if color == "junk" else png_bytes(color)


def write_pickapic_parquet(path: Path, rows=PICKAPIC_ROWS) -> Path:
    """A parquet file with Pick-a-Pic v2's columns (caption, jpg_0/1 bytes, label_0/1, has_label, uids)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "caption": [r[0] for r in rows],
        "jpg_0": pa.array([_cell(r[1]) for r in rows], type=pa.binary()),
        "jpg_1": pa.array([_cell(r[2]) for r in rows], type=pa.binary()),
        "label_0": [r[3] for r in rows], "label_1": [r[4] for r in rows], "has_label": [r[5] for r in rows],
        "image_0_uid": [f"uid{i}a" for i in range(len(rows))],
        "image_1_uid": [f"uid{i}b" for i in range(len(rows))],
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path))
    return path


# -- ImageReward (BLIP) -------------------------------------------------------------------------------

#: A small BERT WordPiece vocabulary covering the test prompts (real: bert-base-uncased's 30522 lines).
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "fox", "in", "snow", "light",
              "##house", "at", "dusk", "bowl", "of", "ram", "##en", "two", "cats", "an", "astronaut",
              "water", "##color", "forest", "city", "night", "square", "blue", "the", "."]
IR_VISION = {"width": 128, "layers": 2, "heads": 2, "patch": 8, "image_size": 32}
IR_TEXT = {"width": 64, "layers": 2, "intermediate": 128, "positions": 40}
IR_MLP = [64, 32, 16, 8, 4, 1]


def blip_vit(seed: int = 0):
    """BLIP's visual encoder at a small size, built with timm's VisionTransformer (BLIP's vit.py is timm's
    ViT: same tensor names, LayerNorm eps 1e-6, qkv bias, class token, final norm)."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    v = IR_VISION
    vit = VisionTransformer(img_size=v["image_size"], patch_size=v["patch"], embed_dim=v["width"],
                            depth=v["layers"], num_heads=v["heads"], mlp_ratio=4.0, qkv_bias=True,
                            num_classes=0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    with torch.no_grad():  # timm initialises pos_embed/cls_token tiny; make them matter
        vit.pos_embed.normal_(0, 0.5)
        vit.cls_token.normal_(0, 0.5)
    return vit.eval()


def blip_text_state_dict(seed: int = 0, vocab: int = len(BERT_VOCAB) + 2) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped as BLIP's med.py BertModel with cross-attention to the ViT
    (``add_pooling_layer=False``); ``vocab`` includes BLIP's added [DEC] and [ENC] tokens."""
    g = torch.Generator().manual_seed(seed)
    t, enc = IR_TEXT, IR_VISION["width"]
    h, inter = t["width"], t["intermediate"]

    def w(o, i):
        return torch.randn(o, i, generator=g) / i ** 0.5

    def b(o):
        return torch.randn(o, generator=g) * 0.1

    def ln(prefix):
        return {f"{prefix}.weight": 1 + 0.1 * torch.randn(h, generator=g), f"{prefix}.bias": b(h)}

    sd = {"embeddings.word_embeddings.weight": torch.randn(vocab, h, generator=g),
          "embeddings.position_embeddings.weight": torch.randn(t["positions"], h, generator=g) * 0.5,
          "embeddings.position_ids": torch.arange(t["positions"])[None], **ln("embeddings.LayerNorm")}
    for i in range(t["layers"]):
        p = f"encoder.layer.{i}"
        for att, kv in (("attention", h), ("crossattention", enc)):
            sd |= {f"{p}.{att}.self.query.weight": w(h, h), f"{p}.{att}.self.query.bias": b(h),
                   f"{p}.{att}.self.key.weight": w(h, kv), f"{p}.{att}.self.key.bias": b(h),
                   f"{p}.{att}.self.value.weight": w(h, kv), f"{p}.{att}.self.value.bias": b(h),
                   f"{p}.{att}.output.dense.weight": w(h, h), f"{p}.{att}.output.dense.bias": b(h),
                   **ln(f"{p}.{att}.output.LayerNorm")}
        sd |= {f"{p}.intermediate.dense.weight": w(inter, h), f"{p}.intermediate.dense.bias": b(inter),
               f"{p}.output.dense.weight": w(h, inter), f"{p}.output.dense.bias": b(h),
               **ln(f"{p}.output.LayerNorm")}
    return sd


def image_reward_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """ImageReward.pt's layout: blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.{0,2,4,6,7}.*,
    plus BLIP pre-training tensors ImageReward's score never reads (vision_proj, text_proj)."""
    g = torch.Generator().manual_seed(seed + 7)
    sd = {f"blip.visual_encoder.{k}": v.detach().clone() for k, v in blip_vit(seed).state_dict().items()}
    sd |= {f"blip.text_encoder.{k}": v for k, v in blip_text_state_dict(seed).items()}
    for idx, (i, o) in zip((0, 2, 4, 6, 7), zip(IR_MLP, IR_MLP[1:], strict=False), strict=True):
        sd[f"mlp.layers.{idx}.weight"] = torch.randn(o, i, generator=g) / i ** 0.5
        sd[f"mlp.layers.{idx}.bias"] = torch.randn(o, generator=g) * 0.1
    sd["blip.vision_proj.weight"] = torch.randn(16, IR_VISION["width"], generator=g)
    sd["blip.text_proj.weight"] = torch.randn(16, IR_TEXT["width"], generator=g)
    return sd


def save_bert_tokenizer(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text('{"do_lower_case": true}', encoding="utf-8")
    return folder


def save_image_reward(folder: Path, seed: int = 0, tokenizer: bool = True) -> Path:
    """``folder/ImageReward.pt`` (a plain torch state dict, as THUDM ships it) and, unless told not to,
    ``folder/bert-base-uncased/`` with the tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ImageReward.pt"
    torch.save(image_reward_state_dict(seed), path)
    if tokenizer:
        save_bert_tokenizer(folder / "bert-base-uncased")
    return path
