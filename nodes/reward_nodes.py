"""Reward models from the user's models folder (``models/pso_rewards``), as PSO_REWARD values.

The reward code is :mod:`pso.rewards`; this node picks the files, the device and the tokenizer
fallback (ComfyUI's bundled CLIP tokenizer) and never downloads anything.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths
import torch
from comfy_api.v0_0_2 import io

from ..pso import rewards
from .types import REWARD_TYPE

logger = logging.getLogger(__name__)

FOLDER = "pso_rewards"  # models/pso_rewards; more paths via extra_model_paths.yaml (key pso_rewards)
EXTENSIONS = {".safetensors", ".sft", ".pt", ".pth", ".bin"}
NO_HEAD = "(none)"
ACTIVATIONS = ("auto", "gelu", "quick_gelu")


def register_folder() -> None:
    """Register ``models/pso_rewards`` with the host (keeping paths a user configured)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[FOLDER]
        folder_paths.folder_names_and_paths[FOLDER] = (paths if default in paths else [default, *paths],
                                                       set(exts) | EXTENSIONS)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))


register_folder()


def reward_folders() -> list[str]:
    return list(folder_paths.get_folder_paths(FOLDER))


def _placeholder() -> str:
    return f"(no files in models/{FOLDER})"


def reward_files() -> list[str]:
    return folder_paths.get_filename_list(FOLDER) or [_placeholder()]


def resolve_file(kind: str, name: str, head: bool = False) -> Path:
    """The file (or transformers folder) behind a combo value; missing ones get the registry's message.

    A ``model.safetensors`` / ``pytorch_model.bin`` next to a ``config.json`` in a sub-folder stands for
    its whole transformers folder (PickScore's layout).
    """
    path = folder_paths.get_full_path(FOLDER, name) if name and not name.startswith("(") else None
    if path is None:
        what = f"{'head' if head else 'model'} file {name!r}"
        raise rewards.RewardError(rewards.missing_file_message(kind, what, reward_folders(), head=head))
    p = Path(path)
    if not head and (p.parent / "config.json").is_file() and p.parent.resolve() not in \
            {Path(f).resolve() for f in reward_folders()}:
        return p.parent
    return p


def tokenizer_fallback() -> Path:
    import comfy.sd1_clip  # the CLIP BPE tokenizer ComfyUI ships for SD1.x (comfy/sd1_tokenizer)

    return Path(comfy.sd1_clip.__file__).resolve().parent / "sd1_tokenizer"


def load_reward_model(kind: str, model_file: str, head_file: str, batch_size: int, activation: str):
    import comfy.model_management as mm

    spec = rewards.REWARD_KINDS.get(kind)
    if spec is None:
        raise rewards.RewardError(f"unknown reward kind {kind!r}; valid kinds: "
                                  f"{sorted(rewards.REWARD_KINDS)}")
    if activation not in ACTIVATIONS:
        raise rewards.RewardError(f"activation {activation!r} is not one of {list(ACTIVATIONS)}")
    path = resolve_file(kind, model_file)
    head = resolve_file(kind, head_file, head=True) if spec.head_files else None
    device = mm.get_torch_device()
    offload = mm.unet_offload_device() if device.type != "cpu" else None
    with torch.inference_mode(False):  # ordinary tensors: online training moves and uses them later
        return rewards.load_reward(
            kind, path, head, name=f"{kind} ({Path(model_file).name})", device=device, batch_size=batch_size,
            quick_gelu=None if activation == "auto" else activation == "quick_gelu",
            tokenizer_fallback=tokenizer_fallback(), offload_device=offload)


class PSORewardModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        kinds = list(rewards.REWARD_KINDS)
        files = reward_files()
        return io.Schema(
            node_id="PSORewardModelLoader",
            display_name="PSO Reward Model Loader",
            category="PSO/rewards",
            description=(
                f"Loads a reward model from ComfyUI's models/{FOLDER} folder (never downloads): it scores "
                "images against their prompts, higher = better, for online PSO and PSO Evaluate. Kinds: "
                + "; ".join(f"{k}: {v.description}" for k, v in rewards.REWARD_KINDS.items())
                + ". image_reward needs ImageReward.pt with the bert-base-uncased tokenizer folder beside it."
            ),
            inputs=[
                io.Combo.Input("kind", options=kinds, default="pickscore",
                               tooltip="Which reward: " + "; ".join(
                    f"{k}: {v.files} (from {v.source})" for k, v in rewards.REWARD_KINDS.items())),
                io.Combo.Input("model_file", options=files, tooltip=(
                    f"The reward model file in models/{FOLDER}. For a transformers folder (PickScore) pick "
                    "its model.safetensors / pytorch_model.bin: the folder with its config.json is loaded. "
                    "For image_reward pick ImageReward.pt (its tokenizer: the bert-base-uncased folder "
                    "beside it).")),
                io.Combo.Input("head_file", options=[NO_HEAD, *files], default=NO_HEAD, tooltip=(
                    "aesthetic only: the MLP head sac+logos+ava1-l14-linearMSE.pth; other kinds ignore it.")),
                io.Int.Input("batch_size", default=8, min=1, max=512, tooltip=(
                    "Images scored per forward pass (fp16 on a GPU); lower it if scoring runs out of "
                    "memory.")),
                io.Combo.Input("activation", options=list(ACTIVATIONS), default="auto", tooltip=(
                    "The CLIP's MLP activation, which a weight file does not record: auto uses QuickGELU for "
                    "aesthetic (OpenAI ViT-L/14) and for clip_score files with 'openai' in the name, GELU "
                    "otherwise (HPSv2, laion CLIPs). transformers folders use their config.json.")),
            ],
            outputs=[REWARD_TYPE.Output(display_name="reward", tooltip=(
                "The reward model, for PSO Evaluate and online PSO training."))],
        )

    @classmethod
    def fingerprint_inputs(cls, kind, model_file, head_file, batch_size, activation):
        stamps = []
        for name in (model_file, head_file):
            path = folder_paths.get_full_path(FOLDER, name) if name and not name.startswith("(") else None
            stamps.append(os.stat(path).st_mtime_ns if path else None)
        return tuple(stamps)

    @classmethod
    def execute(cls, kind, model_file, head_file, batch_size, activation) -> io.NodeOutput:
        reward = load_reward_model(kind, model_file, head_file, batch_size, activation)
        return io.NodeOutput(reward, ui={"text": [repr(reward)]})
