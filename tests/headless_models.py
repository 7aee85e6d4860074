"""Tiny diffusers models and pair datasets for the headless trainer's tests (no download, no host).

The UNet has the shape of the ComfyUI fixture's tiny SD1.5 model (``tests/fixtures/pso_test_fixtures/
tiny_models.py``: model_channels 32, channel_mult [1, 2], one res block and one transformer per level,
heads 16 wide, context 32), so a ComfyUI checkpoint of it converts to this diffusers config and back.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def launch_env() -> dict[str, str]:
    """Environment for an ``accelerate launch`` of ``pso_train.cli`` in a test: offline hubs, one
    thread, CPU processes, this checkout importable."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for accelerate's main process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": [2, 4],  # heads per level (diffusers' legacy name): the fixture's 16-wide heads
    "norm_num_groups": 32,
    "use_linear_projection": False,
}
TEXT_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
               "projection_dim": 32, "max_position_embeddings": 77}
SCHEDULER_CONFIG = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
                    "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
                    "prediction_type": "epsilon"}
LATENT = (4, 8, 8)


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte -> printable character table (GPT-2 BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: Path) -> int:
    """A character-level CLIP tokenizer (no merges) that CLIPTokenizer reads offline; returns its
    vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}),
        encoding="utf-8")
    return len(vocab)


def write_config_folder(folder: Path) -> None:
    """A diffusers SD1.5-layout folder with configs and tokenizer only (what a single-file checkpoint
    needs as ``model_config``)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"]}), encoding="utf-8")
    for sub, cfg in (("unet", UNET_CONFIG), ("scheduler", SCHEDULER_CONFIG)):
        (folder / sub).mkdir(exist_ok=True)
        name = "scheduler_config.json" if sub == "scheduler" else "config.json"
        (folder / sub / name).write_text(json.dumps(cfg), encoding="utf-8")
    import transformers

    text_cfg = transformers.CLIPTextConfig(vocab_size=vocab_size, bos_token_id=vocab_size - 2,
                                           eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                                           **TEXT_CONFIG)
    (folder / "text_encoder").mkdir(exist_ok=True)
    text_cfg.to_json_file(str(folder / "text_encoder" / "config.json"))


def build_unet(seed: int = 0):
    """The tiny diffusers UNet with diffusers' default init, seeded, and non-zero output layers."""
    import diffusers

    torch.manual_seed(seed)
    cfg = {k: v for k, v in UNET_CONFIG.items() if not k.startswith("_")}
    unet = diffusers.UNet2DConditionModel(**cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make the output layer lively
        unet.conv_out.weight.copy_(torch.randn(unet.conv_out.weight.shape, generator=gen) * 0.05)
    return unet


def build_text_encoder(folder: Path, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig.from_pretrained(folder / "text_encoder")
    return transformers.CLIPTextModel(cfg)


def write_diffusers_model(folder: Path, seed: int = 0) -> Path:
    """A complete tiny diffusers folder (UNet + text encoder weights, tokenizer, scheduler)."""
    write_config_folder(folder)
    build_unet(seed).save_pretrained(folder / "unet")
    build_text_encoder(folder, seed).save_pretrained(folder / "text_encoder")
    return folder


PROMPTS = ["a red fox", "a blue lighthouse", "green hills at dawn", "an old clock", "two cats", "a boat"]


def write_pairs(folder: Path, n_pairs: int = 24, shard_size: int = 4, seed: int = 0,
                family: str = "SD15") -> Path:
    """A pair dataset of random 4x8x8 targets / references with prompts (offline PSO needs no more)."""
    from pso.dataset import DatasetFingerprint, PairDatasetWriter
    from pso.schedules import DiscreteSchedule, few_step_sigmas

    sigmas = few_step_sigmas(DiscreteSchedule(), "dmd2")
    fp = DatasetFingerprint(family, *LATENT, latent_format=family, sigmas=sigmas, sampler="lcm")
    gen = torch.Generator().manual_seed(seed)
    with PairDatasetWriter(folder, fp, shard_size=shard_size) as writer:
        for i in range(n_pairs):
            target = torch.randn(LATENT, generator=gen) * 0.5 + 0.3
            reference = torch.randn(LATENT, generator=gen) * 0.8 - 0.2
            writer.add(target, reference, PROMPTS[i % len(PROMPTS)] + f" #{i}")
    return folder


SDXL_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [32, 64], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 64, "attention_head_dim": [2, 4], "norm_num_groups": 32,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}


def write_sdxl_model(folder: Path, seed: int = 0) -> Path:
    """A tiny SDXL-class diffusers folder: pooled-text + size-id UNet, CLIP-L and CLIP-G-shaped encoders."""
    import diffusers
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(folder / "tokenizer")
    write_tokenizer(folder / "tokenizer_2")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
    torch.manual_seed(seed)
    diffusers.UNet2DConditionModel(**{k: v for k, v in SDXL_UNET_CONFIG.items() if not k.startswith("_")}
                                   ).save_pretrained(folder / "unet")
    ids = {"bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1}
    cfg = transformers.CLIPTextConfig(vocab_size=vocab_size, **ids, **TEXT_CONFIG)
    transformers.CLIPTextModel(cfg).save_pretrained(folder / "text_encoder")
    transformers.CLIPTextModelWithProjection(cfg).save_pretrained(folder / "text_encoder_2")
    return folder


VAE_CONFIG = {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
              "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
              "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 8,
              "sample_size": 64, "scaling_factor": 0.18215}


def write_vae(folder: Path, seed: int = 0) -> None:
    """A tiny AutoencoderKL (factor 8, 4 latent channels) in ``folder/vae``."""
    import diffusers

    torch.manual_seed(seed)
    diffusers.AutoencoderKL(**VAE_CONFIG).save_pretrained(folder / "vae")


def jpeg(seed: int, size: tuple[int, int]) -> bytes:
    """A random RGB JPEG of ``size`` (width, height)."""
    import io

    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_pickapic_parquet(path: Path, labels: list[tuple[float, float]]) -> list[dict]:
    """A parquet file in Pick-a-Pic's layout (caption, jpg_0, jpg_1, label_0, label_1, plus a column
    the importer ignores); returns the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"caption": f"prompt {i}", "jpg_0": jpeg(2 * i, (80, 64)), "jpg_1": jpeg(2 * i + 1, (64, 96)),
             "label_0": l0, "label_1": l1, "best_image_uid": f"uid{i}"} for i, (l0, l1) in enumerate(labels)]
    pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=2)
    return rows
