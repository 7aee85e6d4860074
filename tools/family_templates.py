"""Example workflows for the newer few-step families, derived from ``pso_style_transfer.json``.

``python -m tools.family_templates`` writes

- ``example_workflows/pso_zimage_turbo_style.json``: the style-transfer graph on **Z-Image-Turbo**
  (Load Diffusion Model + Load CLIP (Qwen3-4B, type lumina2) + Load VAE (FLUX.1's ae) instead of Load
  Checkpoint; PSO Few-Step Sigmas ``zimage_turbo_8``, sampler euler, 1024 px, Empty SD3 Latent Image);
- ``example_workflows/pso_wan22_video.json``: the same graph on **Wan 2.2 TI2V-5B** with its 4-step Turbo
  LoRA applied by the stock Load LoRA (``wan_lightning_4``, euler); the target images train as one-frame
  clips and the before / after samples are 49-frame videos (Wan 2.2 Image to Video Latent, saved as
  animated WEBP).

The style example keeps its node ids, links, groups and layout; its Load Checkpoint becomes the
family's loaders (stacked in group 1, which grows to hold them), and every link that came from the
checkpoint comes from the loader of that output. Model file names are the ones ComfyUI's own examples
and the repackaged repositories use; each loader lists its file for the frontend's missing-models
dialog. The workflows carry no workflow ``id`` (tests/integration/test_example_workflows.py).
Development only.
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

from tools.comfy_host import REPO_ROOT

EXAMPLES = REPO_ROOT / "example_workflows"
STYLE_EXAMPLE = EXAMPLES / "pso_style_transfer.json"
CHECKPOINT = 3  # the style example's Load Checkpoint node
CORE = {"cnr_id": "comfy-core", "ver": "0.3.75"}
GAP = 120  # between a loader's bottom and the next loader's top (title bar and source badge included)
HF = "https://huggingface.co"


def _model(name: str, url: str, directory: str) -> dict[str, str]:
    return {"name": name, "url": url, "directory": directory}


def _loader(kind: str, title: str, widgets: list, height: int, model: dict, outputs: list[tuple[str, int]],
            inputs: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    """A loader node spec: outputs are (type, slot of the checkpoint it stands in for or -1)."""
    return {"type": kind, "title": title, "widgets": widgets, "height": height, "model": model,
            "outputs": outputs, "inputs": inputs}


_ZI = f"{HF}/Comfy-Org/z_image_turbo/resolve/main/split_files"
_WAN22 = f"{HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files"
_WAN21 = f"{HF}/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
ZIMAGE_LOADERS = [
    _loader("UNETLoader", "Load Diffusion Model: Z-Image-Turbo",
            ["z_image_turbo_bf16.safetensors", "default"], 82,
            _model("z_image_turbo_bf16.safetensors",
                   f"{_ZI}/diffusion_models/z_image_turbo_bf16.safetensors", "diffusion_models"),
            [("MODEL", 0)]),
    _loader("CLIPLoader", "Load CLIP: Qwen3-4B", ["qwen_3_4b.safetensors", "lumina2", "default"], 106,
            _model("qwen_3_4b.safetensors", f"{_ZI}/text_encoders/qwen_3_4b.safetensors", "text_encoders"),
            [("CLIP", 1)]),
    _loader("VAELoader", "Load VAE: ae (FLUX.1)", ["ae.safetensors"], 58,
            _model("ae.safetensors", f"{_ZI}/vae/ae.safetensors", "vae"), [("VAE", 2)]),
]
WAN_LORA = "Wan22_TI2V_5B_Turbo_lora_rank_64_fp16.safetensors"
WAN_LOADERS = [
    _loader("UNETLoader", "Load Diffusion Model: Wan 2.2 TI2V-5B",
            ["wan2.2_ti2v_5B_fp16.safetensors", "default"], 82,
            _model("wan2.2_ti2v_5B_fp16.safetensors",
                   f"{_WAN22}/diffusion_models/wan2.2_ti2v_5B_fp16.safetensors", "diffusion_models"),
            [("MODEL", -1)]),
    _loader("LoraLoader", "Load LoRA: 4-step Turbo (distillation)", [WAN_LORA, 1.0, 1.0], 130,
            _model(WAN_LORA, f"{HF}/Kijai/WanVideo_comfy/resolve/main/LoRAs/Wan22-Turbo/{WAN_LORA}", "loras"),
            [("MODEL", 0), ("CLIP", 1)], inputs=(("model", "MODEL"), ("clip", "CLIP"))),
    _loader("CLIPLoader", "Load CLIP: UMT5-XXL",
            ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"], 106,
            _model("umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                   f"{_WAN21}/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders"),
            [("CLIP", -1)]),
    _loader("VAELoader", "Load VAE: Wan 2.2", ["wan2.2_vae.safetensors"], 58,
            _model("wan2.2_vae.safetensors", f"{_WAN22}/vae/wan2.2_vae.safetensors", "vae"), [("VAE", 2)]),
]
#: LoraLoader's inputs come from the loaders above it: (loader index, output slot) per input.
WAN_LORA_INPUTS = {"model": (0, 0), "clip": (2, 0)}


class Graph:
    """A UI-format workflow being edited: nodes by id, links as the frontend saves them."""

    def __init__(self, workflow: dict):
        self.wf = copy.deepcopy(workflow)
        self.nodes = {n["id"]: n for n in self.wf["nodes"]}

    def new_node(self, kind: str, pos: list[float], size: list[float], widgets: list, title: str | None,
                 properties: dict | None = None) -> dict:
        self.wf["last_node_id"] += 1
        node = {"id": self.wf["last_node_id"], "type": kind, "pos": pos, "size": size, "flags": {},
                "order": len(self.wf["nodes"]), "mode": 0, "inputs": [], "outputs": [],
                "properties": {**CORE, "Node name for S&R": kind, **(properties or {})},
                "widgets_values": widgets}
        if title:
            node["title"] = title
        self.wf["nodes"].append(node)
        self.nodes[node["id"]] = node
        return node

    def link(self, src: int, slot: int, dst: int, name: str, kind: str) -> None:
        """A new link from output ``slot`` of ``src`` to input ``name`` of ``dst`` (added if absent)."""
        self.wf["last_link_id"] += 1
        lid = self.wf["last_link_id"]
        self.wf["links"].append([lid, src, slot, dst, self._input_slot(dst, name, kind), kind])
        self._output(src, slot, kind)["links"].append(lid)

    def _input_slot(self, dst: int, name: str, kind: str) -> int:
        inputs = self.nodes[dst]["inputs"]
        for i, inp in enumerate(inputs):
            if inp["name"] == name:
                inp["link"] = self.wf["last_link_id"]
                return i
        inputs.append({"name": name, "type": kind, "link": self.wf["last_link_id"]})
        return len(inputs) - 1

    def _output(self, src: int, slot: int, kind: str) -> dict:
        outputs = self.nodes[src]["outputs"]
        while len(outputs) <= slot:
            outputs.append({"name": kind, "type": kind, "links": [], "slot_index": len(outputs)})
        return outputs[slot]

    def move_links(self, old: int, old_slot: int, new: int, new_slot: int) -> None:
        """Every link from output ``old_slot`` of ``old`` now leaves output ``new_slot`` of ``new``."""
        for link in self.wf["links"]:
            if link[1] == old and link[2] == old_slot:
                link[1], link[2] = new, new_slot
                self._output(new, new_slot, link[5])["links"].append(link[0])

    def remove(self, node_id: int) -> None:
        self.wf["nodes"] = [n for n in self.wf["nodes"] if n["id"] != node_id]
        del self.nodes[node_id]

    def retype(self, node_id: int, kind: str, widgets: list, size: list[float] | None = None) -> dict:
        node = self.nodes[node_id]
        node["type"], node["widgets_values"] = kind, widgets
        node["properties"]["Node name for S&R"] = kind
        if size:
            node["size"] = size
        return node


def _swap_checkpoint(g: Graph, loaders: list[dict], lora_inputs: dict[str, tuple[int, int]] | None = None
                     ) -> list[dict]:
    """Replace Load Checkpoint by ``loaders``, stacked where it stood; group 1 grows to hold them."""
    ckpt = g.nodes[CHECKPOINT]
    x, y = ckpt["pos"]
    made = []
    for spec in loaders:
        node = g.new_node(spec["type"], [x, y], [340, spec["height"]], spec["widgets"], spec["title"],
                          {"models": [spec["model"]]})
        for name, kind in spec["inputs"]:
            node["inputs"].append({"name": name, "type": kind, "link": None})
        for slot, (kind, _) in enumerate(spec["outputs"]):
            node["outputs"].append({"name": kind, "type": kind, "links": [], "slot_index": slot})
        made.append(node)
        y += spec["height"] + GAP
    for spec, node in zip(loaders, made, strict=True):
        for slot, (_, ckpt_slot) in enumerate(spec["outputs"]):
            if ckpt_slot >= 0:
                g.move_links(CHECKPOINT, ckpt_slot, node["id"], slot)
    for name, (index, slot) in (lora_inputs or {}).items():
        lora = next(n for n in made if n["type"] == "LoraLoader")
        g.link(made[index]["id"], slot, lora["id"], name, made[index]["outputs"][slot]["type"])
    g.remove(CHECKPOINT)
    group = next(gr for gr in g.wf["groups"] if gr["title"].startswith("1."))
    group["bounding"][3] = max(group["bounding"][3], y - GAP + 60 - group["bounding"][1])
    return made


def _set(g: Graph, kind: str, widgets: list) -> None:
    for node in g.wf["nodes"]:
        if node["type"] == kind:
            node["widgets_values"] = copy.deepcopy(widgets)


def _titled(g: Graph, title: str) -> dict:
    return next(n for n in g.wf["nodes"] if n.get("title") == title)


def _notes(g: Graph, texts: dict[int, str]) -> None:
    for node_id, text in texts.items():
        assert g.nodes[node_id]["type"] == "MarkdownNote", node_id
        g.nodes[node_id]["widgets_values"] = [text]


def _prefixes(g: Graph, stem: str) -> None:
    _set(g, "PSOSaveLoRA", [f"pso/{stem}"])
    _set(g, "LossGraphNode", [f"pso/{stem}_loss"])
    _set(g, "PSOLoraLoader", [f"pso/{stem}_00001.safetensors", 1.0])
    for title, suffix in (("Save: before (original model)", "before"),
                          ("Save: after (PSO-trained model)", "after"),
                          ("Save: with the saved LoRA", "with_lora")):
        node = _titled(g, title)
        node["widgets_values"][0] = f"pso/{stem}_{suffix}"


_RUN = ("## Run\nPress **Queue**. Groups 2-5 run in order: targets, references, training, then a "
        "before/after "
        "{what} pair in `output/pso/`. Training shows a progress bar and a preview every 50 steps; "
        "**Cancel** "
        "stops after the current step and leaves a checkpoint in `output/pso_checkpoints/`.\n\n"
        "Group 6 is muted: it samples with the saved LoRA file once you have one (see its note).")
_TARGETS = ("## Before the first run\n1. Put 10-50 images of the style into `ComfyUI/input/pso_style/`.\n"
            "2. Give each image a caption file with the same name (`harbour.png` + `harbour.txt`) that "
            "says **what "
            "is in the image**, not the style: \"a harbour with fishing boats at sunrise\". The "
            "references are "
            "sampled from these captions, so what differs between the two sides of a pair is the style.\n"
            "3. Press **R** in ComfyUI so the folder appears in *PSO Target Images (folder)*, and select it.")
_PSO = ("This workflow fine-tunes a **timestep-distilled** model toward the style of your example images "
        "with "
        "Pairwise Sample Optimization (PSO; Miao et al., arXiv 2410.03190). Plain diffusion-loss "
        "fine-tuning makes "
        "such models blurry. PSO instead trains a LoRA so that the model **prefers your images over its own "
        "samples** for the same captions while staying close to the original model, and it trains on "
        "exactly the "
        "few steps you sample with.")


def zimage() -> dict:
    g = Graph(json.loads(STYLE_EXAMPLE.read_text(encoding="utf-8")))
    _swap_checkpoint(g, ZIMAGE_LOADERS)
    _set(g, "PSOFewStepSigmas", ["zimage_turbo_8"])
    _set(g, "KSamplerSelect", ["euler"])
    for node in [n for n in g.wf["nodes"] if n["type"] == "EmptyLatentImage"]:
        g.retype(node["id"], "EmptySD3LatentImage", [1024, 1024, 1])
    target = next(n for n in g.wf["nodes"] if n["type"] == "PSOTargetImagesFromFolder")
    target["widgets_values"][2] = 1024
    _prefixes(g, "zimage_style")
    _notes(g, {
        1: "# PSO style transfer: teach Z-Image-Turbo a style\n\n" + _PSO + "\n\n"
           "## Models to load (from huggingface.co/Comfy-Org/z_image_turbo, `split_files/`)\n"
           "- `z_image_turbo_bf16.safetensors` in `ComfyUI/models/diffusion_models/` (**Load Diffusion "
           "Model**)\n"
           "- `qwen_3_4b.safetensors` in `ComfyUI/models/text_encoders/` (**Load CLIP**, type `lumina2`)\n"
           "- `ae.safetensors` (the FLUX.1 VAE) in `ComfyUI/models/vae/` (**Load VAE**)\n\n"
           "Z-Image-Turbo makes 1024x1024 images in 8 steps without classifier-free guidance, which is "
           "why this "
           "graph uses **BasicGuider** (no negative prompt), **PSO Few-Step Sigmas** `zimage_turbo_8` (8 "
           "steps "
           "of ComfyUI's simple scheduler on the model's own flow sampling, shift 3) and the `euler` "
           "sampler.\n\n"
           + _TARGETS + "\n\n" + _RUN.format(what="image") + "\n\n"
           "## Memory\nTraining runs with `training_dtype` bf16 and `gradient_checkpointing` on (Z-Image "
           "is a 6B "
           "model: a 24 GB GPU at 1024 px). On a GPU without bf16 support choose float32.",
        2: "### 1. Model\n**Load Diffusion Model**, **Load CLIP** and **Load VAE**: Z-Image-Turbo (see "
           "*Read me "
           "first*). Its MODEL is trained, the CLIP (Qwen3-4B) encodes the captions and the VAE encodes "
           "the target "
           "images and decodes the samples.",
        4: "### 2. Target images\n**PSO Target Images (folder)** reads every image in "
           "`ComfyUI/input/<folder>/` "
           "with its caption (`<image name>.txt`), resizes the short side to `size` and centre-crops "
           "(1024 is "
           "Z-Image-Turbo's resolution), and VAE-encodes them once. `default_prompt` is used for images "
           "without "
           "a caption; left empty, every image needs one.\n\n**Preview** shows exactly the images that are "
           "trained on.",
        11: _train_note("zimage_style"),
        16: _before_after_note("zimage_style", "images", "png"),
    })
    return g.wf


def wan22() -> dict:
    g = Graph(json.loads(STYLE_EXAMPLE.read_text(encoding="utf-8")))
    made = _swap_checkpoint(g, WAN_LOADERS, WAN_LORA_INPUTS)
    vae = made[-1]["id"]
    _set(g, "PSOFewStepSigmas", ["wan_lightning_4"])
    _set(g, "KSamplerSelect", ["euler"])
    for node in [n for n in g.wf["nodes"] if n["type"] == "EmptyLatentImage"]:
        g.retype(node["id"], "Wan22ImageToVideoLatent", [704, 704, 49, 1], size=[340, 190])
        node["inputs"] = []
        g.link(vae, 0, node["id"], "vae", "VAE")
        node["inputs"].append({"name": "start_image", "type": "IMAGE", "link": None})
    below = next(n for n in g.wf["nodes"] if n["type"] == "RandomNoise" and n["mode"] == 2)
    below["pos"][1] += 60  # room for the taller latent node above it in group 6
    group6 = next(gr for gr in g.wf["groups"] if gr["title"].startswith("6."))
    group6["bounding"][3] += 60
    for node in [n for n in g.wf["nodes"] if n["type"] == "SaveImage"]:
        g.retype(node["id"], "SaveAnimatedWEBP", [node["widgets_values"][0], 24.0, False, 90, "default"],
                 size=[340, 400])
    target = next(n for n in g.wf["nodes"] if n["type"] == "PSOTargetImagesFromFolder")
    target["widgets_values"][2] = 704
    _prefixes(g, "wan22_style")
    _notes(g, {
        1: "# PSO on video: teach Wan 2.2 (TI2V-5B + 4-step LoRA) a look\n\n" + _PSO + "\n\n"
           "## Models to load\n"
           "- `wan2.2_ti2v_5B_fp16.safetensors` in `ComfyUI/models/diffusion_models/` (**Load Diffusion "
           "Model**; "
           "huggingface.co/Comfy-Org/Wan_2.2_ComfyUI_Repackaged, `split_files/diffusion_models/`)\n"
           f"- `{WAN_LORA}` in `ComfyUI/models/loras/` (**Load LoRA**: the 4-step distillation of TI2V-5B, "
           "extracted from Wan2.2-TI2V-5B-Turbo; huggingface.co/Kijai/WanVideo_comfy, `LoRAs/Wan22-Turbo/`)\n"
           "- `umt5_xxl_fp8_e4m3fn_scaled.safetensors` in `ComfyUI/models/text_encoders/` (**Load CLIP**, "
           "type "
           "`wan`; huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged, `split_files/text_encoders/`)\n"
           "- `wan2.2_vae.safetensors` in `ComfyUI/models/vae/` (**Load VAE**; "
           "Comfy-Org/Wan_2.2_ComfyUI_Repackaged, "
           "`split_files/vae/`)\n\n"
           "The base model with the Turbo LoRA samples in 4 steps at CFG 1: **BasicGuider**, **PSO Few-Step "
           "Sigmas** `wan_lightning_4` (4 steps of the simple scheduler on the model's own flow sampling) "
           "and "
           "`euler`. PSO trains on top of that MODEL: the saved PSO LoRA holds only the new adapter; load "
           "both "
           "LoRAs to use it.\n\n"
           "**Not Wan 2.2 A14B**: ComfyUI loads its high-noise and low-noise experts as one class "
           "(WAN21_T2V) that "
           "PSO cannot tell apart, and one expert trained alone would learn from references the two-expert "
           "sampler never makes, so PSO Train refuses them.\n\n"
           + _TARGETS + "\n\n"
           "Each target **image** is encoded as a one-frame clip (Wan is trained on images and videos): "
           "the LoRA "
           "learns the look from stills, and the before/after samples are 49-frame videos.\n\n"
           + _RUN.format(what="video") + "\n\n"
           "## Memory\nTraining runs with `training_dtype` bf16 and `gradient_checkpointing` on (a 5B "
           "model: a "
           "24 GB GPU at 704 px). On a GPU without bf16 support choose float32.",
        2: "### 1. Model\n**Load Diffusion Model** (Wan 2.2 TI2V-5B) with the 4-step Turbo LoRA applied "
           "by the stock "
           "**Load LoRA**, **Load CLIP** (UMT5-XXL) and **Load VAE** (Wan 2.2). The MODEL with the Turbo "
           "LoRA is "
           "trained (the LoRA is part of the frozen reference), the CLIP encodes the captions, the VAE "
           "encodes "
           "the targets and decodes the videos.",
        4: "### 2. Target images\n**PSO Target Images (folder)** reads every image in "
           "`ComfyUI/input/<folder>/` "
           "with its caption (`<image name>.txt`), resizes the short side to `size` and centre-crops (704: "
           "TI2V-5B's 1280x704 height), and VAE-encodes each image as a one-frame clip, once. "
           "`default_prompt` "
           "is used for images without a caption; left empty, every image needs one.\n\n**Preview** shows "
           "exactly the images that are trained on.",
        11: _train_note("wan22_style"),
        16: _before_after_note("wan22_style", "videos (49 frames at 24 fps, Wan 2.2 Image to Video Latent)",
                               "webp"),
    })
    return g.wf


def _train_note(stem: str) -> str:
    return ("### 4. Train and save\n**PSO Build Pairs** joins targets and references by caption.\n\n**PSO "
            "Train "
            "LoRA** with `pso_offline` (Eq. 6 of the paper) re-samples the references from the model being "
            "trained every `reference_refresh_every` steps. 500 steps at learning rate 1e-4, rank 16. "
            "`beta` 10 "
            "(for references the model samples itself; must be > 0): raise it to stay closer to the original "
            "model, lower it for a stronger style. Its previews show what the model makes as training "
            "goes. Its "
            "`model` output is the trained model (used by group 5).\n\n"
            f"**PSO Save LoRA** writes `models/loras/pso/{stem}_00001.safetensors` (a new number on every "
            f"run; "
            "nothing is overwritten) with kohya-style key names (`lora_unet_...`), which ComfyUI's Load LoRA "
            "reads. **Plot Loss Graph** saves the loss curve into `output/pso/`.")


def _before_after_note(stem: str, what: str, ext: str) -> str:
    return ("### 5. Before and after\nThe test prompt is sampled twice with the same noise (seed 42, "
            "fixed) and "
            f"the same steps: with the original model and with the trained one, as {what}, saved as "
            f"`output/pso/{stem}_before_*.{ext}` and `output/pso/{stem}_after_*.{ext}`. Use a subject "
            f"that is "
            "not in your captions to see whether the style carries over.")


BUILDERS = {"pso_zimage_turbo_style": zimage, "pso_wan22_video": wan22}


def main(argv: list[str] | None = None) -> int:
    from pso.io import atomic_write_bytes

    for name, build in BUILDERS.items():
        text = json.dumps(build(), indent=2, ensure_ascii=False) + "\n"
        atomic_write_bytes(EXAMPLES / f"{name}.json", text.encode("utf-8"))
    print(f"wrote {len(BUILDERS)} workflows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
