"""Reward models: an image batch and its prompts in, one score per image out (higher = better).

Online PSO (Eq. 7) labels each pair of the model's own samples with a reward model; the evaluation
node tabulates rewards the way the paper's Table 1 does. Every reward here implements one contract
(``nodes/types.py`` ``PSO_REWARD``)::

    reward.name: str
    reward.score(images, prompts) -> scores
        images  (B, H, W, 3) float in [0, 1]  (a ComfyUI IMAGE batch)
        prompts B strings
        scores  (B,) float32 on the CPU

Weights are only ever read from files the caller names (nothing is downloaded). The kinds, the
files each needs and where users usually get them are the registry :data:`REWARD_KINDS`, the single
source of truth for the loader node's combo, the dispatch and the error messages:

- ``pickscore`` (Kirstain et al. 2023): a transformers ``CLIPModel`` folder (CLIP-H);
  score = ``exp(logit_scale) * cos(image, text)``, as PickScore's reference code computes it.
- ``hpsv2`` (Wu et al. 2023): open_clip ViT-H-14 with the HPS v2 / v2.1 checkpoint;
  score = ``cos(image, text)``, as HPSv2's ``score`` returns it.
- ``aesthetic`` (LAION improved aesthetic predictor): CLIP ViT-L/14 image embedding, L2-normalised,
  through the linear MLP head of ``sac+logos+ava1-l14-linearMSE.pth``; the prompt is ignored.
- ``clip_score`` (Hessel et al. 2021, as torchmetrics' ``CLIPScore``): ``100 * max(cos, 0)``
  under any CLIP model (open_clip file or transformers folder).

- ``image_reward`` (Xu et al. 2023): ImageReward's BLIP on transformers' BLIP classes, from
  ``ImageReward.pt`` plus the ``bert-base-uncased`` tokenizer folder beside it (:mod:`pso.reward_blip`);
  score = ``(MLP(BLIP text-with-image [CLS]) - mean) / std`` as ``ImageReward.score`` computes it.

Architectures are read off the checkpoint's tensor shapes (:func:`infer_open_clip_config`), so the
real ViT-H-14 / ViT-L-14 files and small random files saved in the same layout load through the same
code. Preprocessing runs in torch on the IMAGE tensor (:func:`preprocess`): resize the shorter side
(bicubic, antialiased), centre-crop, normalise with the model's mean and std. open_clip and
transformers are imported inside the functions that need them.

Pair labelling for online PSO: :func:`label_pairs` (one reward) and :func:`pareto_label_pairs`
(several rewards must agree, as the PSO authors' online code labels DMD2 pairs).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "REWARD_KINDS",
    "UNSUPPORTED",
    "RewardError",
    "RewardKind",
    "RewardModel",
    "canonical_kind",
    "infer_open_clip_config",
    "label_pairs",
    "load_reward",
    "load_state_dict_file",
    "pareto_label_pairs",
    "preprocess",
]

#: OpenAI CLIP's image normalisation (open_clip's OPENAI_DATASET_MEAN / _STD; also laion's CLIP-H).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
#: The CLIP BPE vocabulary size that open_clip's SimpleTokenizer and the CLIP tokenizer produce.
CLIP_VOCAB = 49408
_STATE_DICT_SUFFIXES = (".safetensors", ".sft", ".pt", ".pth", ".bin", ".ckpt")


class RewardError(ValueError):
    """A reward model file, kind or input a user has to fix; the message says what and how."""


# --------------------------------------------------------------------------------------------
# Pair labelling (online PSO, Eq. 7)
# --------------------------------------------------------------------------------------------
def label_pairs(scores: torch.Tensor, margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Winner and loser of each group of samples from their reward scores (online PSO, Eq. 7).

    For prompt p with K samples, the winner is the highest-scoring sample and the loser the lowest;
    the pair is kept only when ``max - min > margin`` (a strict inequality, so exact ties are never
    kept, even with ``margin = 0``). Among equal maxima / minima the lowest index wins / loses.

    Args:
        scores: (P, K) float, K >= 2 samples per prompt (higher = better).
        margin: >= 0, in the reward's own units (e.g. PickScore ~0.1-0.5, HPSv2 ~0.001-0.01).

    Returns:
        winner (P,) long, loser (P,) long (sample indices in 0..K-1; winner != loser where kept),
        kept (P,) bool.
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise RewardError(f"scores must have shape (prompts, samples >= 2), got {tuple(scores.shape)}")
    if not margin >= 0 or math.isinf(margin):
        raise RewardError(f"margin must be a finite number >= 0, got {margin!r}")
    s = scores.detach().float()
    winner = s.argmax(dim=1)
    loser = s.argmin(dim=1)
    gap = s.gather(1, winner[:, None])[:, 0] - s.gather(1, loser[:, None])[:, 0]
    kept = (gap > margin) & torch.isfinite(gap)
    return winner, loser, kept


def pareto_label_pairs(scores: torch.Tensor, margins: Sequence[float] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Label pairs by Pareto dominance over several rewards: a sample wins only if every reward
    prefers it by more than that reward's margin (the PSO authors' online DMD2 labelling).

    Args:
        scores: (R, P, 2) float: R rewards, P pairs, the two samples of each pair.
        margins: R margins >= 0 (default 0 each).

    Returns:
        winner (P,) long, loser (P,) long (0 or 1), kept (P,) bool (False where the rewards disagree
        or any gap is within its margin).
    """
    if scores.ndim != 3 or scores.shape[2] != 2:
        raise RewardError(f"scores must have shape (rewards, pairs, 2), got {tuple(scores.shape)}")
    r = scores.shape[0]
    m = torch.zeros(r) if margins is None else torch.tensor([float(x) for x in margins])
    if m.numel() != r or bool((m < 0).any()):
        raise RewardError(f"need {r} margins >= 0 (one per reward), got {list(margins or [])}")
    diff = scores.detach().float()[..., 0] - scores.detach().float()[..., 1]  # (R, P)
    first = (diff > m[:, None]).all(dim=0)
    second = (-diff > m[:, None]).all(dim=0)
    winner = torch.where(second, 1, 0).long()
    return winner, 1 - winner, first | second


# --------------------------------------------------------------------------------------------
# Preprocessing (torch, on the ComfyUI IMAGE tensor)
# --------------------------------------------------------------------------------------------
def preprocess(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """CLIP's evaluation transform on a ComfyUI IMAGE batch.

    Resize so the shorter side is ``size`` (bicubic, antialiased, like PIL's BICUBIC resize the
    reference processors use), centre-crop to ``size`` x ``size``, clamp to [0, 1], normalise.

    Shapes: images (B, H, W, C>=3) in [0, 1] -> (B, 3, size, size) float32.
    """
    if images.ndim != 4 or images.shape[-1] < 3:
        raise RewardError(f"images must be a ComfyUI IMAGE batch (B, H, W, 3), got {tuple(images.shape)}")
    x = images[..., :3].movedim(-1, 1).float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, :, top:top + size, left:left + size].clamp(0.0, 1.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a torch file read with ``weights_only=True``.

    A torch file's ``state_dict`` entry is used when present (HPSv2's checkpoints), and a
    ``module.`` prefix (DataParallel) is removed. Non-tensor entries are dropped.
    """
    path = Path(path)
    if path.suffix.lower() in (".safetensors", ".sft"):
        import safetensors.torch

        sd: Any = safetensors.torch.load_file(str(path), device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError) as exc:
            raise RewardError(
                f"{path.name} cannot be read as plain tensors (torch.load(weights_only=True): {exc}). It may "
                "be a TorchScript archive (OpenAI's own ViT-L-14.pt is one) or a pickle holding code: use "
                "the open_clip / safetensors version of the weights instead (e.g. "
                "open_clip_model.safetensors "
                "from the model's Hugging Face repository)") from exc
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise RewardError(f"{path.name} holds a {type(sd).__name__}, not a dict of tensors")
    out = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise RewardError(f"{path.name} holds no tensors")
    return out


def _count_blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    found = {int(k[len(prefix):].split(".", 1)[0]) for k in sd if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def _known_heads(vision: dict, text: dict, embed_dim: int) -> tuple[int, int, str] | None:
    """(vision head width, text heads, config name) of an open_clip config with these shapes."""
    import open_clip

    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        if v.get("timm_model_name") or t.get("hf_model_name") or not isinstance(v.get("layers"), int):
            continue
        same = (cfg.get("embed_dim") == embed_dim and v.get("width") == vision["width"]
                and v.get("layers") == vision["layers"] and v.get("patch_size") == vision["patch_size"]
                and v.get("image_size") == vision["image_size"] and t.get("width") == text["width"]
                and t.get("layers") == text["layers"]
                and t.get("context_length", 77) == text["context_length"]
                and t.get("vocab_size", CLIP_VOCAB) == text["vocab_size"])
        if same:
            return int(v.get("head_width", 64)), int(t.get("heads", 8)), name
    return None


def infer_open_clip_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """open_clip ``CLIP(embed_dim, vision_cfg, text_cfg)`` arguments read off a state dict's shapes.

    Widths, layer counts, patch size, image size, MLP ratio, embedding size, vocabulary and context
    length come from tensor shapes. Head counts cannot: they are taken from the open_clip config with
    exactly these shapes (ViT-H-14: 16 heads of 80 in the image tower), else OpenAI's convention of
    heads of width 64 is used (and logged).

    Returns: {"embed_dim": int, "vision_cfg": dict, "text_cfg": dict, "matched": str | None}.
    """
    if "visual.conv1.weight" not in sd or "token_embedding.weight" not in sd:
        sample = ", ".join(sorted(sd)[:6])
        if any(k.startswith("vision_model.") or k.startswith("text_model.") for k in sd):
            hint = "it looks like a transformers CLIPModel: put it in a folder with its config.json"
        elif any(k.startswith("visual.trunk.") or k.startswith("text.transformer.") for k in sd):
            hint = "it is an open_clip model with a timm or Hugging Face tower, which is not supported"
        else:
            hint = "it is not an open_clip CLIP ViT state dict"
        raise RewardError(f"no visual.conv1.weight / token_embedding.weight in the file ({hint}); first "
                          "keys: "
                          f"{sample}")
    if any(k.startswith("visual.attn_pool") for k in sd):
        raise RewardError("this open_clip model uses an attentional pooler (CoCa), which is not supported")
    conv = sd["visual.conv1.weight"]
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    grid = math.isqrt(int(sd["visual.positional_embedding"].shape[0]) - 1)
    v_layers = _count_blocks(sd, "visual.transformer.resblocks.")
    vision = {"width": width, "layers": v_layers, "patch_size": patch, "image_size": grid * patch,
              "mlp_ratio": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
              "no_ln_pre": "visual.ln_pre.weight" not in sd}
    tok = sd["token_embedding.weight"]
    t_width = int(tok.shape[1])
    text = {"width": t_width, "layers": _count_blocks(sd, "transformer.resblocks."),
            "context_length": int(sd["positional_embedding"].shape[0]), "vocab_size": int(tok.shape[0]),
            "mlp_ratio": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / t_width}
    embed_dim = int(sd["visual.proj"].shape[1]) if "visual.proj" in sd else width
    known = _known_heads(vision, text, embed_dim)
    if known is None:
        if width % 64 or t_width % 64:
            raise RewardError(f"cannot tell the attention heads of this CLIP (image width {width}, text "
                              "width "
                              f"{t_width}): it matches no open_clip config and its widths are not "
                              "multiples of "
                              "64 (OpenAI's head width)")
        vision["head_width"], text["heads"], matched = 64, t_width // 64, None
        logger.info("reward CLIP: no open_clip config matches %s / %s; using heads of width 64", vision, text)
    else:
        vision["head_width"], text["heads"], matched = known
    return {"embed_dim": embed_dim, "vision_cfg": vision, "text_cfg": text, "matched": matched}


# --------------------------------------------------------------------------------------------
# CLIP backbones: open_clip state dict or transformers folder
# --------------------------------------------------------------------------------------------
class _Backbone(torch.nn.Module):
    """image_features (B, 3, S, S) -> (B, D); text_features (B strings) -> (B, D) (not normalised)."""

    image_size: int
    embed_dim: int
    arch: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def logit_scale_value(self) -> torch.Tensor:
        return self.logit_scale.detach().float().exp()


class _OpenClipBackbone(_Backbone):
    def __init__(self, path: Path, quick_gelu: bool) -> None:
        super().__init__()
        try:
            import open_clip
            from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
        except ImportError as exc:
            raise RewardError(f"open_clip is needed to load {path.name}: pip install open_clip_torch "
                              f"(with the Python that runs ComfyUI) ({exc})") from exc
        sd = load_state_dict_file(path)
        for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI state-dict extras
            sd.pop(key, None)
        for key in [k for k in sd if k == "attn_mask" or k.endswith(".attn_mask")]:  # rebuilt by CLIP()
            sd.pop(key)
        cfg = infer_open_clip_config(sd)
        if cfg["text_cfg"]["vocab_size"] != CLIP_VOCAB:
            raise RewardError(f"{path.name} has a text vocabulary of {cfg['text_cfg']['vocab_size']} tokens; "
                              f"only CLIP's BPE vocabulary ({CLIP_VOCAB}) is supported")
        self.model = CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]),
                          CLIPTextCfg(**cfg["text_cfg"]),
                          quick_gelu=quick_gelu)
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise RewardError(f"{path.name} does not fit the CLIP inferred from its shapes "
                              f"({cfg['matched'] or 'custom'}): missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}")
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
        self.image_size = cfg["vision_cfg"]["image_size"]
        self.mean, self.std = OPENAI_MEAN, OPENAI_STD
        self.logit_scale = self.model.logit_scale
        self.embed_dim = int(cfg["embed_dim"])
        self.arch = cfg["matched"] or "custom"

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.logit_scale.device)
        return self.model.encode_text(tokens)


class _HFClipBackbone(_Backbone):
    def __init__(self, folder: Path, tokenizer_fallback: Path | None) -> None:
        super().__init__()
        try:
            import transformers
        except ImportError as exc:
            raise RewardError(f"transformers is needed to load {folder.name}: pip install transformers "
                              f"({exc})") from exc
        self.model = transformers.CLIPModel.from_pretrained(str(folder), local_files_only=True,
                                                            dtype=torch.float32)
        self.model.eval().requires_grad_(False)
        tok_dir = folder if _has_tokenizer(folder) else tokenizer_fallback
        if tok_dir is None:
            raise RewardError(f"{folder} has no tokenizer files (vocab.json + merges.txt or "
                              "tokenizer.json) and no "
                              "fallback CLIP tokenizer was given; copy them from the CLIP model's repository")
        if tok_dir != folder:
            logger.info("reward %s: no tokenizer files in the folder; using the CLIP BPE tokenizer in %s",
                        folder.name, tok_dir)
        self.tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        self.context_length = int(self.model.config.text_config.max_position_embeddings)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.mean, self.std = OPENAI_MEAN, OPENAI_STD
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            info = json.loads(pre.read_text(encoding="utf-8"))
            self.mean = tuple(info.get("image_mean", self.mean))
            self.std = tuple(info.get("image_std", self.std))
        self.logit_scale = self.model.logit_scale
        self.embed_dim = int(self.model.config.projection_dim)
        self.arch = f"transformers CLIP (vision {self.model.config.vision_config.hidden_size} x " \
                    f"{self.model.config.vision_config.num_hidden_layers})"

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return self.model.visual_projection(pooled)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.context_length, return_tensors="pt")
        device = self.logit_scale.device
        pooled = self.model.text_model(input_ids=enc["input_ids"].to(device),
                                       attention_mask=enc["attention_mask"].to(device)).pooler_output
        return self.model.text_projection(pooled)


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file()
                                                      and (folder / "merges.txt").is_file())


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _backbone(path: Path, quick_gelu: bool, tokenizer_fallback: Path | None, kind: str) -> _Backbone:
    if _is_hf_folder(path):
        return _HFClipBackbone(path, tokenizer_fallback)
    if path.is_dir():
        raise RewardError(f"{kind}: {path} is a folder without config.json; a transformers model folder "
                          "needs "
                          f"its config.json, or choose a single {'/'.join(_STATE_DICT_SUFFIXES)} file")
    return _OpenClipBackbone(path, quick_gelu)


class _LinearMLP(torch.nn.Module):
    """The improved aesthetic predictor's head: ``layers.{i}`` Linear layers applied in order with no
    activation between them (its Dropout layers are identities at evaluation time).

    Shapes: (B, D) -> (B,).
    """

    def __init__(self, sd: dict[str, torch.Tensor], name: str) -> None:
        super().__init__()
        idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.") and k.endswith(".weight")})
        if not idx:
            raise RewardError(f"{name} has no layers.<i>.weight tensors (first keys: {sorted(sd)[:5]}); "
                              "expected "
                              "the improved aesthetic predictor's MLP head "
                              "(sac+logos+ava1-l14-linearMSE.pth)")
        self.linears = torch.nn.ModuleList()
        for i in idx:
            w = sd[f"layers.{i}.weight"]
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=f"layers.{i}.bias" in sd)
            lin.weight.data.copy_(w)
            if lin.bias is not None:
                lin.bias.data.copy_(sd[f"layers.{i}.bias"])
            self.linears.append(lin)
        if self.linears[-1].out_features != 1:
            raise RewardError(f"{name}: the last layer gives {self.linears[-1].out_features} outputs, not "
                              "1 score")
        self.in_features = self.linears[0].in_features
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin in self.linears:
            x = lin(x)
        return x[:, 0]


# --------------------------------------------------------------------------------------------
# The reward model
# --------------------------------------------------------------------------------------------
def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity in float32. Shapes: (B, D), (B, D) -> (B,)."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def _pickscore(bb: _Backbone, head, pixels, prompts) -> torch.Tensor:
    return bb.logit_scale_value() * _cosine(bb.image_features(pixels), bb.text_features(prompts))


def _hpsv2(bb: _Backbone, head, pixels, prompts) -> torch.Tensor:
    return _cosine(bb.image_features(pixels), bb.text_features(prompts))


def _clip_score(bb: _Backbone, head, pixels, prompts) -> torch.Tensor:
    return 100.0 * _cosine(bb.image_features(pixels), bb.text_features(prompts)).clamp(min=0.0)


def _aesthetic(bb: _Backbone, head, pixels, prompts) -> torch.Tensor:
    emb = F.normalize(bb.image_features(pixels).float(), dim=-1)
    return head(emb.to(next(head.parameters()).dtype)).float()


def _image_reward(bb, head, pixels, prompts) -> torch.Tensor:
    from .reward_blip import image_reward_score

    return image_reward_score(bb, head, pixels, prompts)


def _build_image_reward(path: Path, tokenizer: Path | None):
    from .reward_blip import load_image_reward

    return load_image_reward(path, tokenizer)


@dataclass(frozen=True)
class RewardKind:
    """One reward architecture.

    Attributes:
        score: ``score(backbone, head, pixels (B, 3, S, S), prompts) -> (B,)``.
        files: what the model file (or folder) is. source: where users usually get it.
        head_files / head_source: the second file (aesthetic head), or "" when none is needed.
        quick_gelu: the activation of its CLIP (OpenAI-trained CLIPs use QuickGELU); None: ask
            the file name ("openai" in it -> QuickGELU).
        description: for tooltips and the README.
        build: ``build(path, tokenizer folder or None) -> (backbone, head)`` for kinds that are not a
            CLIP backbone (+ optional head file); None: the CLIP loaders.
    """

    score: Callable[..., torch.Tensor]
    files: str
    source: str
    description: str
    head_files: str = ""
    head_source: str = ""
    quick_gelu: bool | None = False
    build: Callable[..., tuple[Any, torch.nn.Module | None]] | None = None


#: Reward kind -> how to load and score it. The single source of truth for the kinds.
REWARD_KINDS: dict[str, RewardKind] = {
    "pickscore": RewardKind(
        _pickscore,
        files="a transformers CLIPModel folder (config.json + model.safetensors or pytorch_model.bin), e.g. "
              "PickScore_v1/",
        source="Hugging Face yuvalkirstain/PickScore_v1 (tokenizer files optional: ComfyUI's bundled CLIP "
               "tokenizer is used when the folder has none)",
        description="PickScore (CLIP-H trained on Pick-a-Pic): exp(logit_scale) * cos(image, prompt), "
                    "~18-23"),
    "hpsv2": RewardKind(
        _hpsv2,
        files="HPS_v2_compressed.pt or HPS_v2.1_compressed.pt (open_clip ViT-H-14 weights)",
        source="Hugging Face xswu/HPSv2",
        description="Human Preference Score v2 / v2.1: cos(image, prompt) under the HPS-tuned ViT-H-14, "
                    "~0.2-0.35"),
    "aesthetic": RewardKind(
        _aesthetic,
        files="OpenAI CLIP ViT-L/14 as an open_clip file (open_clip_model.safetensors / "
              "open_clip_pytorch_model"
              ".bin) or a transformers folder (clip-vit-large-patch14/)",
        source="Hugging Face timm/vit_large_patch14_clip_224.openai or openai/clip-vit-large-patch14",
        head_files="sac+logos+ava1-l14-linearMSE.pth",
        head_source="GitHub christophschuhmann/improved-aesthetic-predictor",
        quick_gelu=True,
        description="LAION aesthetic predictor: MLP on the normalised CLIP ViT-L/14 image embedding (prompt "
                    "ignored), ~1-10"),
    "clip_score": RewardKind(
        _clip_score,
        files="any open_clip CLIP ViT file (e.g. open_clip_pytorch_model.bin) or transformers CLIPModel "
              "folder",
        source="Hugging Face, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K or openai/clip-vit-large-patch14",
        quick_gelu=None,
        description="CLIP score: 100 * max(cos(image, prompt), 0) as torchmetrics' CLIPScore, ~20-40"),
    "image_reward": RewardKind(
        _image_reward,
        files="ImageReward.pt, with the bert-base-uncased tokenizer (vocab.txt, tokenizer_config.json) in "
              "a folder named bert-base-uncased beside it",
        source="Hugging Face THUDM/ImageReward (ImageReward.pt) and google-bert/bert-base-uncased "
               "(tokenizer)",
        build=_build_image_reward,
        description="ImageReward (BLIP trained on human rankings): standardised reward, ~-2..2"),
}

#: Kinds users ask for that are not offered, with the reason (used in error messages). ImageReward,
#: refused before for its hub-fetched tokenizer, is now ``image_reward`` (the tokenizer is a local folder).
UNSUPPORTED: dict[str, str] = {}


def canonical_kind(kind: str) -> str:
    """The :data:`REWARD_KINDS` key for ``kind``, ignoring case, '-' and '_' ("ImageReward" ->
    "image_reward"); unknown kinds raise with the valid ones."""
    if kind in REWARD_KINDS:
        return kind
    key = kind.lower().replace("-", "").replace("_", "")
    for name in REWARD_KINDS:
        if name.replace("_", "") == key:
            return name
    _kind(kind)
    raise AssertionError("unreachable")


def _kind(kind: str) -> RewardKind:
    if kind in REWARD_KINDS:
        return REWARD_KINDS[kind]
    key = kind.lower().replace("-", "_")
    for name, reason in UNSUPPORTED.items():
        if name.replace("_", "") == key.replace("_", ""):
            raise RewardError(reason)
    for name in REWARD_KINDS:
        if name.replace("_", "") == key.replace("_", ""):
            return REWARD_KINDS[name]
    raise RewardError(f"unknown reward kind {kind!r}; valid kinds: {sorted(REWARD_KINDS)}")


def missing_file_message(kind: str, what: str, folders: Sequence[str | os.PathLike],
                         head: bool = False) -> str:
    """The error text for a missing reward file: the file, the folder to put it in, where to get it."""
    spec = _kind(kind)
    files, source = (spec.head_files, spec.head_source) if head else (spec.files, spec.source)
    where = " or ".join(str(f) for f in folders) or "(no folder configured)"
    return (f"{kind} reward: {what} not found. Put {files} into {where}; users usually get it from {source}. "
            "comfyui-pso never downloads weights; restart or refresh ComfyUI after copying the file.")


class RewardModel:
    """A loaded reward model (the ``PSO_REWARD`` contract): ``name`` and ``score(images, prompts)``.

    Scores in batches of ``batch_size``; on CUDA the weights are fp16 and scoring runs under fp16
    autocast. With ``offload_device`` set, the model moves to ``device`` for each call and back after.
    """

    def __init__(self, name: str, kind: str, backbone: _Backbone, head: torch.nn.Module | None,
                 device: str | torch.device = "cpu", batch_size: int = 8,
                 offload_device: str | torch.device | None = None) -> None:
        if batch_size < 1:
            raise RewardError(f"batch_size must be >= 1, got {batch_size}")
        self.name, self.kind = name, kind
        self.backbone, self.head = backbone, head
        self.device = torch.device(device)
        self.offload_device = None if offload_device is None else torch.device(offload_device)
        self.batch_size = int(batch_size)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self._score = REWARD_KINDS[kind].score
        self._to(self.offload_device or self.device)

    def __repr__(self) -> str:
        return (f"RewardModel({self.name!r}, kind={self.kind!r}, arch={self.backbone.arch!r}, "
                f"device={self.device})")

    @property
    def memory_bytes(self) -> int:
        """Bytes of the weights at the scoring dtype (for the host's memory manager)."""
        n = sum(p.numel() for p in self.backbone.parameters())
        return n * torch.finfo(self.dtype).bits // 8

    def _to(self, device: torch.device) -> None:
        self.backbone.to(device=device, dtype=self.dtype if device.type == "cuda" else torch.float32)
        if self.head is not None:
            self.head.to(device=device, dtype=torch.float32)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Score B images against their prompts.

        Shapes: images (B, H, W, 3) in [0, 1]; prompts B strings -> (B,) float32 on the CPU.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if images.ndim != 4 or images.shape[0] != len(prompts):
            raise RewardError(f"{self.name}: {tuple(images.shape)} images for {len(prompts)} prompt(s); "
                              "give a "
                              "(B, H, W, 3) IMAGE batch and one prompt per image")
        if images.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32)
        out = []
        try:
            if self.offload_device is not None:
                self._to(self.device)
            autocast = torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else _null()
            with torch.no_grad(), autocast:
                for i in range(0, images.shape[0], self.batch_size):
                    chunk = images[i:i + self.batch_size].to(self.device)
                    bb = self.backbone
                    pixels = preprocess(chunk, bb.image_size, bb.mean, bb.std)
                    scores = self._score(self.backbone, self.head, pixels.to(self.dtype),
                                         list(prompts[i:i + self.batch_size]))
                    out.append(scores.detach().float().cpu())
        finally:
            if self.offload_device is not None:
                self._to(self.offload_device)
        return torch.cat(out)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _check_path(path: str | os.PathLike | None, kind: str, what: str, head: bool) -> Path:
    if path is None or not str(path).strip():
        raise RewardError(missing_file_message(kind, what, [], head))
    p = Path(path)
    if not p.exists():
        raise RewardError(missing_file_message(kind, f"{what} {p.name!r} ({p})", [p.parent], head))
    return p


def load_reward(kind: str, path: str | os.PathLike, head_path: str | os.PathLike | None = None, *,
                name: str | None = None, device: str | torch.device = "cpu", batch_size: int = 8,
                quick_gelu: bool | None = None, tokenizer_fallback: str | os.PathLike | None = None,
                offload_device: str | torch.device | None = None,
                tokenizer: str | os.PathLike | None = None) -> RewardModel:
    """Load a reward model of ``kind`` from local files only.

    Args:
        kind: a :data:`REWARD_KINDS` key.
        path: the model file (open_clip state dict: safetensors or a torch file read with
            ``weights_only=True``) or a transformers CLIPModel folder (with config.json).
        head_path: the aesthetic MLP head file (``aesthetic`` only).
        quick_gelu: the CLIP's activation; None uses the kind's default (for ``clip_score``:
            QuickGELU when "openai" is in the file name, as OpenAI-trained CLIPs use it).
        tokenizer_fallback: a folder with CLIP's vocab.json + merges.txt for transformers folders
            that ship none (ComfyUI's ``comfy/sd1_tokenizer``).
        device, batch_size, offload_device: see :class:`RewardModel`.
        tokenizer: ``image_reward`` only: the BERT tokenizer folder (default: ``bert-base-uncased/``
            beside the model file).
    """
    kind = canonical_kind(kind)
    spec = _kind(kind)
    path = _check_path(path, kind, "model file", head=False)
    if spec.build is not None:
        backbone, head = spec.build(path, None if tokenizer is None else Path(tokenizer))
        return RewardModel(name or f"{kind}:{path.name}", kind, backbone, head, device=device,
                           batch_size=batch_size, offload_device=offload_device)
    head = None
    if spec.head_files:
        hp = _check_path(head_path, kind, "head file", head=True)
        head = _LinearMLP(load_state_dict_file(hp), hp.name)
    act = spec.quick_gelu if quick_gelu is None else quick_gelu
    if act is None:
        act = "openai" in path.name.lower() or "openai" in path.parent.name.lower()
    fallback = None if tokenizer_fallback is None else Path(tokenizer_fallback)
    backbone = _backbone(path, bool(act), fallback, kind)
    if head is not None:
        dim = backbone.embed_dim
        if dim != head.in_features:
            raise RewardError(f"{kind}: the head {Path(head_path).name} takes {head.in_features}-d "
                              "embeddings but "
                              f"{path.name} gives {dim}-d ones; the aesthetic head needs CLIP ViT-L/14 "
                              "(768-d)")
    logger.info("reward %s: %s (%s) loaded from %s", kind, backbone.arch, "QuickGELU" if act else "GELU",
                path)
    return RewardModel(name or f"{kind}:{path.name}", kind, backbone, head, device=device,
                       batch_size=batch_size, offload_device=offload_device)
