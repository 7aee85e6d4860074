"""ImageReward (Xu et al. 2023) from local files, on transformers' BLIP classes.

ImageReward scores an image against its prompt with BLIP's image-grounded text encoder: the prompt's
tokens attend to the ViT's image tokens through cross-attention, the first ([CLS]) token's final
hidden state goes through a 5-layer linear MLP, and the result is standardised with the constants the
authors measured on their training set (THUDM/ImageReward, ``ImageReward.score``)::

    h     = BertEncoder(tokens(prompt), cross=ViT(image))[:, 0]     (B, 768)
    score = (MLP(h) - 0.16717362830052426) / 1.0333394966054072       (B,)

What the user puts into the rewards folder (nothing is downloaded):

- ``ImageReward.pt``: the authors' state dict (keys ``blip.visual_encoder.*`` in BLIP's timm-style ViT
  layout, ``blip.text_encoder.*`` in BLIP's ``med.py`` BERT layout, ``mlp.layers.{0,2,4,6,7}.*``);
- beside it, the ``bert-base-uncased`` tokenizer folder (``vocab.txt``, optionally
  ``tokenizer_config.json``), which the original package fetches from the hub at load time.

Why transformers rather than the ``image-reward`` package: transformers' ``BlipVisionModel`` and
``BlipTextModel`` are BLIP's architecture (adapted from the same ``med.py``), they are already a
dependency of the PickScore reward, and the package's constructor calls
``BertTokenizer.from_pretrained("bert-base-uncased")``, a hub download this project never does. The
text encoder's keys are the same in both layouts; the ViT's are renamed (:func:`vision_key`).

Sizes are read off the tensor shapes (ViT-L/16 at 224 px and BERT-base for the real file); heads are
64 wide, as in both BLIP towers (ViT-L: 16 heads of 64, BERT-base: 12 of 64). Layer-norm epsilons are
BLIP's: 1e-6 in the ViT (timm's), 1e-12 in BERT.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from .rewards import OPENAI_MEAN, OPENAI_STD, RewardError, _LinearMLP, load_state_dict_file

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_REWARD_MEAN", "IMAGE_REWARD_STD", "MAX_TEXT_TOKENS", "TOKENIZER_FOLDERS",
           "ImageRewardBackbone", "find_tokenizer", "image_reward_score", "load_image_reward", "vision_key"]

#: ImageReward's score standardisation (THUDM/ImageReward ``ImageReward.__init__``).
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
#: Prompt tokens ImageReward reads (``padding="max_length", truncation=True, max_length=35``).
MAX_TEXT_TOKENS = 35
#: Where the BERT tokenizer is looked for, relative to the folder holding ImageReward.pt.
TOKENIZER_FOLDERS = ("bert-base-uncased", "tokenizer", ".")
HEAD_WIDTH = 64
_VISION = "blip.visual_encoder."
_TEXT = "blip.text_encoder."
_MLP = "mlp."


def vision_key(key: str) -> str:
    """BLIP's ViT key (timm layout) -> transformers ``BlipVisionModel`` key.

    ``cls_token`` -> ``embeddings.class_embedding``, ``pos_embed`` -> ``embeddings.position_embedding``,
    ``patch_embed.proj`` -> ``embeddings.patch_embedding``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,
    mlp.fc1,mlp.fc2}`` -> ``encoder.layers.i.{layer_norm1,self_attn.qkv,self_attn.projection,
    layer_norm2,mlp.fc1,mlp.fc2}``, ``norm`` -> ``post_layernorm``.
    """
    fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding"}
    if key in fixed:
        return fixed[key]
    if key.startswith("patch_embed.proj."):
        return "embeddings.patch_embedding." + key.removeprefix("patch_embed.proj.")
    if key.startswith("norm."):
        return "post_layernorm." + key.removeprefix("norm.")
    if key.startswith("blocks."):
        _, idx, rest = key.split(".", 2)
        for old, new in (("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."),
                         ("attn.qkv.", "self_attn.qkv."), ("attn.proj.", "self_attn.projection."),
                         ("mlp.", "mlp.")):
            if rest.startswith(old):
                return f"encoder.layers.{idx}.{new}{rest.removeprefix(old)}"
    raise RewardError(f"ImageReward: unknown ViT tensor blip.visual_encoder.{key}; the file is not "
                      "ImageReward.pt's BLIP layout")


def _blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    found = {int(k[len(prefix):].split(".", 1)[0]) for k in sd if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def _heads(width: int, what: str) -> int:
    if width % HEAD_WIDTH:
        raise RewardError(f"ImageReward: the {what} is {width} wide, not a multiple of BLIP's "
                          f"{HEAD_WIDTH}-wide attention heads")
    return width // HEAD_WIDTH


def split_checkpoint(sd: dict[str, torch.Tensor], name: str
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(ViT, text encoder, MLP head) tensors of an ImageReward state dict, prefixes removed.

    Other tensors the authors' checkpoint may carry (BLIP pre-training projections) are not used by
    ImageReward's score and are dropped, as the package's ``load_state_dict(strict=False)`` ignores them.
    """
    parts = [{k.removeprefix(p): v for k, v in sd.items() if k.startswith(p)} for p in (_VISION, _TEXT, _MLP)]
    if not all(parts):
        lacking = [p for p, part in zip((_VISION, _TEXT, _MLP), parts, strict=True) if not part]
        raise RewardError(f"{name} has no {', '.join(k + '*' for k in lacking)} tensors (first keys: "
                          f"{sorted(sd)[:5]}); the image_reward kind needs THUDM's ImageReward.pt")
    parts[1].pop("embeddings.position_ids", None)  # a buffer in older med.py checkpoints; rebuilt
    return parts[0], parts[1], parts[2]


def find_tokenizer(model_path: Path, tokenizer: Path | None = None) -> Path:
    """The BERT tokenizer folder (with ``vocab.txt``): ``tokenizer`` if given, else the first of
    :data:`TOKENIZER_FOLDERS` beside ``model_path`` that has one."""
    candidates = [tokenizer] if tokenizer is not None else [
        (model_path if model_path.is_dir() else model_path.parent) / sub for sub in TOKENIZER_FOLDERS]
    for folder in candidates:
        if (folder / "vocab.txt").is_file():
            return folder
    where = " or ".join(str(c) for c in candidates)
    raise RewardError(
        f"image_reward: no BERT tokenizer (vocab.txt) in {where}. ImageReward tokenizes prompts with "
        "bert-base-uncased: put that repository's vocab.txt and tokenizer_config.json into a folder "
        f"named bert-base-uncased beside {model_path.name} (Hugging Face google-bert/bert-base-uncased). "
        "comfyui-pso never downloads it.")


class ImageRewardBackbone(torch.nn.Module):
    """BLIP's ViT and image-grounded text encoder.

    ``features(pixels (B, 3, S, S), prompts B strings) -> (B, D)``: the [CLS] token's last hidden state.
    """

    def __init__(self, vision_sd: dict[str, torch.Tensor], text_sd: dict[str, torch.Tensor],
                 tokenizer_dir: Path, name: str) -> None:
        super().__init__()
        try:
            import transformers
            from transformers.models.blip.modeling_blip import BlipVisionModel
            from transformers.models.blip.modeling_blip_text import BlipTextModel
        except ImportError as exc:
            raise RewardError(f"transformers is needed to load {name}: pip install transformers "
                              f"({exc})") from exc
        vsd = {vision_key(k): v for k, v in vision_sd.items()}
        width = int(vsd["embeddings.patch_embedding.weight"].shape[0])
        patch = int(vsd["embeddings.patch_embedding.weight"].shape[-1])
        grid = round((int(vsd["embeddings.position_embedding"].shape[1]) - 1) ** 0.5)
        vcfg = transformers.BlipVisionConfig(
            hidden_size=width, intermediate_size=int(vsd["encoder.layers.0.mlp.fc1.weight"].shape[0]),
            num_hidden_layers=_blocks(vsd, "encoder.layers."), num_attention_heads=_heads(width, "ViT"),
            image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")
        words = text_sd["embeddings.word_embeddings.weight"]
        hidden = int(words.shape[1])
        cross = text_sd.get("encoder.layer.0.crossattention.self.key.weight")
        if cross is None:
            raise RewardError(f"{name}: the text encoder has no cross-attention to the image "
                              "(encoder.layer.0.crossattention.*); it is not ImageReward's BLIP")
        if int(cross.shape[1]) != width:
            raise RewardError(f"{name}: the text encoder attends to {int(cross.shape[1])}-d image tokens but "
                              f"the ViT gives {width}-d ones")
        self.tokenizer = transformers.BertTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        # BLIP's init_tokenizer adds [DEC] (bos) and [ENC]: ids 30522 and 30523 of the 30524-row embedding
        self.tokenizer.add_tokens(["[DEC]", "[ENC]"], special_tokens=True)
        if len(self.tokenizer) > int(words.shape[0]):
            raise RewardError(f"{name}: the tokenizer in {tokenizer_dir} has {len(self.tokenizer)} tokens "
                              f"but the text encoder only {int(words.shape[0])} embeddings; use "
                              "bert-base-uncased's vocab.txt")
        tcfg = transformers.BlipTextConfig(
            vocab_size=int(words.shape[0]), hidden_size=hidden,
            intermediate_size=int(text_sd["encoder.layer.0.intermediate.dense.weight"].shape[0]),
            num_hidden_layers=_blocks(text_sd, "encoder.layer."),
            num_attention_heads=_heads(hidden, "text encoder"),
            max_position_embeddings=int(text_sd["embeddings.position_embeddings.weight"].shape[0]),
            encoder_hidden_size=width, layer_norm_eps=1e-12, hidden_act="gelu", is_decoder=True,
            pad_token_id=self.tokenizer.pad_token_id, sep_token_id=self.tokenizer.sep_token_id,
            bos_token_id=self.tokenizer.convert_tokens_to_ids("[DEC]"))
        self.vision = BlipVisionModel(vcfg)
        self.text = BlipTextModel(tcfg, add_pooling_layer=False)
        for module, sd, what in ((self.vision, vsd, "ViT"), (self.text, text_sd, "text encoder")):
            missing, unexpected = module.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise RewardError(f"{name}: the {what} does not fit the BLIP read off its shapes: missing "
                                  f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
        self.eval().requires_grad_(False)
        self.image_size = int(vcfg.image_size)
        self.embed_dim = hidden
        self.mean, self.std = OPENAI_MEAN, OPENAI_STD
        self.arch = (f"BLIP (ViT {width} x {vcfg.num_hidden_layers} at {self.image_size} px, text "
                     f"{hidden} x {tcfg.num_hidden_layers})")

    def features(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Shapes: pixels (B, 3, S, S), B prompts -> (B, D) ([CLS] state of the grounded text encoder)."""
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state            # (B, 1 + N, W)
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS,
                             return_tensors="pt")
        device = image_embeds.device
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        out = self.text(input_ids=enc["input_ids"].to(device),
                        attention_mask=enc["attention_mask"].to(device),
                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
        return out.last_hidden_state[:, 0]


def image_reward_score(bb: ImageRewardBackbone, head: torch.nn.Module, pixels: torch.Tensor,
                       prompts: Sequence[str]) -> torch.Tensor:
    """ImageReward's score: the MLP on the grounded [CLS] feature (float32), standardised.

    Shapes: pixels (B, 3, S, S), B prompts -> (B,).
    """
    feats = bb.features(pixels, prompts).float()
    return (head(feats) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


def load_image_reward(path: Path, tokenizer: Path | None = None
                      ) -> tuple[ImageRewardBackbone, torch.nn.Module]:
    """(backbone, MLP head) from ``ImageReward.pt`` (or a folder holding it) and the BERT tokenizer."""
    if path.is_dir():
        path = path / "ImageReward.pt"
        if not path.is_file():
            raise RewardError(f"image_reward: {path.parent} has no ImageReward.pt; choose the file itself")
    tok = find_tokenizer(path, tokenizer)
    vision_sd, text_sd, mlp_sd = split_checkpoint(load_state_dict_file(path), path.name)
    head = _LinearMLP(mlp_sd, f"{path.name} (mlp.*)")
    backbone = ImageRewardBackbone(vision_sd, text_sd, tok, path.name)
    if head.in_features != backbone.embed_dim:
        raise RewardError(f"{path.name}: the MLP takes {head.in_features}-d features but the text encoder "
                          f"gives {backbone.embed_dim}-d ones")
    logger.info("reward image_reward: %s, tokenizer %s", backbone.arch, tok)
    return backbone, head
