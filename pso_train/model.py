"""A diffusers UNet (plus its text encoders) as the denoiser ``pso`` trains: ComfyUI's convention.

:class:`DiffusersDenoiser` makes ``denoiser(x, sigma, cond) -> x0`` from a ``UNet2DConditionModel``
exactly as ComfyUI runs an eps / v model: the network sees ``x / sqrt(sigma^2 + 1)`` at timestep
``model_sampling.timestep(sigma)`` (the nearest integer step), and x0 is
``model_sampling.calculate_denoised``. So a LoRA trained here behaves in ComfyUI as it did in
training, on pair datasets built in ComfyUI (whose latents are in that frame).

diffusers and transformers are imported inside functions: ``pso`` imports without them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pso.schedules import DiscreteSchedule, alphas_cumprod

from .config import HeadlessConfig

logger = logging.getLogger(__name__)

#: diffusers' scheduler ``prediction_type`` -> pso's parameterisation.
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v"}
#: ldm checkpoint prefix of the diffusion model's tensors (what ComfyUI's fingerprint hashes).
LDM_UNET_PREFIX = "model.diffusion_model."


def require(package: str, feature: str = "the headless trainer"):
    """Import ``package`` or raise an ImportError that says what to install."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(f"{feature} needs the {package!r} package ({exc}); install it with "
                          f"`pip install comfyui-pso[headless]` or `pip install {package}`.") from exc


def read_diffusers_config(path: Path) -> dict[str, Any]:
    """A config.json of a diffusers folder; a ValueError naming the file if it is missing or invalid."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path} ({exc}); the diffusers folder is incomplete.") from exc


def unet_config_of(config_dir: Path) -> dict[str, Any]:
    """The ``unet/config.json`` of a diffusers folder. A folder of a transformer model (SD3, FLUX,
    Qwen-Image, Wan, ...: ``transformer/config.json``, no ``unet/``) is refused by name: the headless
    trainer conditions UNet2DConditionModel families only (SD 1.x, SD 2.x, SDXL)."""
    transformer = config_dir / "transformer" / "config.json"
    if not (config_dir / "unet" / "config.json").is_file() and transformer.is_file():
        kind = read_diffusers_config(transformer).get("_class_name", "a transformer")
        raise ValueError(
            f"{config_dir} holds {kind} (transformer/), not a UNet: the headless trainer trains SD 1.x, "
            "SD 2.x and SDXL UNets only. Train SD3 / SD3.5, FLUX.1 / FLUX.2, Z-Image, Qwen-Image and Wan 2.2 "
            "in ComfyUI with PSO Train (README: the newer few-step families).")
    return read_diffusers_config(config_dir / "unet" / "config.json")


def detect_family(unet_config: dict[str, Any]) -> str:
    """ComfyUI's config class name for a diffusers UNet config: SDXL (pooled text + size ids), SD20
    (1024-wide text), else SD15."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "SDXL"
    return "SD20" if unet_config.get("cross_attention_dim") == 1024 else "SD15"


def schedule_from_config(scheduler_config: dict[str, Any], prediction: str) -> tuple[DiscreteSchedule, str]:
    """pso's :class:`DiscreteSchedule` from a diffusers scheduler config; ``prediction`` "auto" takes
    the config's ``prediction_type``."""
    kind = scheduler_config.get("beta_schedule", "scaled_linear")
    if kind == "squaredcos_cap_v2":
        kind = "cosine"
    abar = alphas_cumprod(kind, int(scheduler_config.get("num_train_timesteps", 1000)),
                          float(scheduler_config.get("beta_start", 0.00085)),
                          float(scheduler_config.get("beta_end", 0.012)))
    if prediction == "auto":
        raw = scheduler_config.get("prediction_type", "epsilon")
        if raw not in PREDICTION_TYPES:
            raise ValueError(f"the scheduler's prediction_type {raw!r} is not one the headless trainer "
                             f"trains ({sorted(PREDICTION_TYPES)}); set prediction = 'eps' or 'v'.")
        prediction = PREDICTION_TYPES[raw]
    return DiscreteSchedule(abar, prediction=prediction), prediction


@dataclass
class TextConditioner:
    """Prompts -> the UNet's conditioning, as diffusers' SD / SDXL pipelines compute it (no_grad).

    SD1.x / SD2.x: the text encoder's last hidden state. SDXL: both encoders' penultimate hidden
    states concatenated, the second encoder's pooled projection, and size ids
    ``(H, W, 0, 0, H, W)`` in pixels for the dataset's latent size.
    """

    tokenizers: list[Any]
    encoders: list[Any]
    family: str
    pixel_size: tuple[int, int] = (512, 512)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def _ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Shapes: -> hidden (B, L, D); SDXL adds text_embeds (B, P), time_ids (B, 6)."""
        if self.family != "SDXL":
            out = self.encoders[0](self._ids(self.tokenizers[0], prompts))
            return {"hidden": out.last_hidden_state}
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders, strict=True):
            out = enc(self._ids(tok, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
        h, w = self.pixel_size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=hidden[0].dtype, device=self.device)
        return {"hidden": torch.cat(hidden, dim=-1), "text_embeds": pooled,
                "time_ids": time_ids.expand(len(prompts), -1)}


class DiffusersDenoiser:
    """``denoiser(x, sigma, cond) -> x0`` for a diffusers UNet in ComfyUI's convention (see the
    module docstring). ``cond`` indexes :attr:`encoded`, the current batch's text conditioning.

    Shapes: x (B, C, H, W) in the variance-exploding frame; sigma (B,); cond (B,) int64 -> (B, C, H, W).
    """

    def __init__(self, unet: torch.nn.Module, schedule: DiscreteSchedule) -> None:
        self.unet, self.schedule = unet, schedule
        self.encoded: dict[str, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        ms = self.schedule
        xin = ms.calculate_input(sigma, x)
        t = ms.timestep(sigma).float()
        kwargs = {}
        if "text_embeds" in self.encoded:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.encoded["text_embeds"][cond],
                                           "time_ids": self.encoded["time_ids"][cond]}
        out = self.unet(xin, t, encoder_hidden_states=self.encoded["hidden"][cond], return_dict=False,
                        **kwargs)[0]
        return ms.calculate_denoised(sigma, out.float(), x)


@dataclass
class LoadedModel:
    unet: torch.nn.Module
    text: TextConditioner
    schedule: DiscreteSchedule
    family: str
    prediction: str
    #: the UNet's ldm-layout tensor shapes (ComfyUI's module paths) when the source was a single file
    ldm_shapes: dict[str, tuple[int, ...]] | None


def is_single_file(path: Path) -> bool:
    """Whether ``path`` is a single-file checkpoint (.safetensors / .sft) rather than a diffusers folder."""
    return path.is_file() and path.suffix.lower() in (".safetensors", ".sft")


def ldm_unet_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """``{ldm module path: shape}`` of the diffusion model in a single-file checkpoint (headers only)."""
    import safetensors

    out = {}
    with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            if key.startswith(LDM_UNET_PREFIX):
                out[key[len(LDM_UNET_PREFIX):]] = tuple(f.get_slice(key).get_shape())
    return out


def load_model(cfg: HeadlessConfig, device: torch.device, pixel_size: tuple[int, int]) -> LoadedModel:
    """Load the base UNet, text encoder(s) and tokenizer(s) with diffusers / transformers, offline.

    ``cfg.model`` is a diffusers folder (``model_index.json``), or a single-file checkpoint, which
    then needs ``cfg.model_config``: a local diffusers folder of the same family with its configs and
    tokenizers (the Hub is never asked).
    """
    require("diffusers")
    require("transformers")
    path = Path(cfg.model)
    if is_single_file(path):
        if cfg.model_config:
            unet_config_of(Path(cfg.model_config))  # a transformer family's folder: refused by name
        if not cfg.model_config or not Path(cfg.model_config, "unet", "config.json").is_file():
            raise ValueError(
                f"model = {path} is a single-file checkpoint: set model_config to a local diffusers folder "
                f"of the same model family (model_index.json, unet/config.json, scheduler/, tokenizer/, "
                f"text_encoder/config.json; no weights needed), got model_config = {cfg.model_config!r}.")
        config_dir = Path(cfg.model_config)
    elif (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
        config_dir = path
    else:
        raise ValueError(f"model = {path} is neither a .safetensors checkpoint nor a diffusers folder "
                         "(model_index.json / unet/config.json inside).")
    unet_config = unet_config_of(config_dir)
    family = detect_family(unet_config) if cfg.family == "auto" else cfg.family
    scheduler_config = read_diffusers_config(config_dir / "scheduler" / "scheduler_config.json")
    schedule, prediction = schedule_from_config(scheduler_config, cfg.prediction)
    if is_single_file(path):
        unet, encoders, tokenizers = _load_single_file(path, config_dir, family)
        ldm_shapes = ldm_unet_shapes(path)
    else:
        unet, encoders, tokenizers = _load_folder(path, family)
        ldm_shapes = None
    unet.requires_grad_(False).to(device)
    for enc in encoders:
        enc.requires_grad_(False).eval().to(device)
    text = TextConditioner(tokenizers, encoders, family, pixel_size, device)
    return LoadedModel(unet, text, schedule.to(device), family, prediction, ldm_shapes)


def _text_classes(family: str):
    import transformers

    if family == "SDXL":
        return [("text_encoder", "tokenizer", transformers.CLIPTextModel),
                ("text_encoder_2", "tokenizer_2", transformers.CLIPTextModelWithProjection)]
    return [("text_encoder", "tokenizer", transformers.CLIPTextModel)]


def _load_folder(path: Path, family: str):
    import diffusers
    import transformers

    unet = diffusers.UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
    encoders, tokenizers = [], []
    for enc_dir, tok_dir, cls in _text_classes(family):
        encoders.append(cls.from_pretrained(path, subfolder=enc_dir, local_files_only=True))
        tokenizers.append(transformers.CLIPTokenizer.from_pretrained(path, subfolder=tok_dir,
                                                                     local_files_only=True))
    return unet, encoders, tokenizers


def _load_single_file(path: Path, config_dir: Path, family: str):
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import (
        create_diffusers_clip_model_from_ldm,
        load_single_file_checkpoint,
    )

    unet = diffusers.UNet2DConditionModel.from_single_file(
        str(path), config=str(config_dir), subfolder="unet", local_files_only=True)
    checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    encoders, tokenizers = [], []
    for enc_dir, tok_dir, cls in _text_classes(family):
        encoders.append(create_diffusers_clip_model_from_ldm(cls, checkpoint, subfolder=enc_dir,
                                                             config=str(config_dir), local_files_only=True))
        tokenizers.append(transformers.CLIPTokenizer.from_pretrained(config_dir, subfolder=tok_dir,
                                                                     local_files_only=True))
    del checkpoint
    return unet, encoders, tokenizers
