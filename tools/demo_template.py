"""The "PSO demo (digits, CPU)" template: the demo of ``tools/demo.py`` as a workflow that runs as it opens.

``python -m tools.demo_template`` writes ``example_workflows/pso_demo_digits_cpu.json`` from

- ``example_workflows/pso_style_transfer.json`` (the same graph, node ids, links and layout), with
- its loader swapped for **PSO Demo Model** ``digits`` (``tools.demo.LOADER_SWAP``) and its
  target folder for **PSO Demo Targets** ``bold digits``, the demo's 40 bold digits shipped in
  ``demo_model/bold_digits/`` (``--targets`` re-writes them, and the shapes model's striped shapes in
  ``demo_model/striped_shapes/``, with ``tools.demo.write_targets``), and
- the demo's widget values, read from ``tools.demo.DEMO_SETTINGS`` (not copied: a test regenerates the
  template and compares, so a change to the demo's settings shows up as a stale template), with
  notes written for the demo.

The widget positions come from the running host's ``/object_info`` (``tools.workflow.widgets_of``),
as the frontend saves them. The template carries no workflow ``id``: the frontend gives every opened
copy a fresh one, so the training monitor never shows another copy's run.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from tools.comfy_host import REPO_ROOT
from tools.workflow import CONTROL_VALUES, default_value, widgets_of

STYLE_EXAMPLE = REPO_ROOT / "example_workflows" / "pso_style_transfer.json"
TEMPLATE = REPO_ROOT / "example_workflows" / "pso_demo_digits_cpu.json"
TARGETS_DIR = REPO_ROOT / "demo_model" / "bold_digits"
SHAPE_TARGETS_DIR = REPO_ROOT / "demo_model" / "striped_shapes"
#: Output names under output/ and models/loras/ (never overwritten: the host numbers them).
PREFIXES = {"PSOSaveLoRA": "pso_demo/digits", "LossGraphNode": "pso_demo/digits_loss"}
SAVE_TITLES = {"Save: before (original model)": "pso_demo/before", "Save: after (PSO-trained model)":
               "pso_demo/after", "Save: with the saved LoRA": "pso_demo/with_lora"}
GROUP_TITLES = {2: "2. Target images: bold digits (shipped)", 1: "1. Model: the shipped demo model"}


def _notes(settings: dict) -> dict[int, str]:
    """The notes of the template by node id (the style example's note ids), from the demo's settings."""
    train = settings["PSOTrain"]["inputs"]
    sampler = settings["KSamplerSelect"]["inputs"]["sampler_name"]
    schedule = settings["PSOFewStepSigmas"]["inputs"]["schedule"]
    prompt = settings["CLIPTextEncode"]["inputs"]["text"]
    return {
        1: ("# PSO demo: bold digits on a CPU\n\n"
            "Press **Queue** (Run): nothing to download, nothing to prepare. This is the "
            "*pso_style_transfer* workflow on the small **demo model** that ships with comfyui-pso (32x32 "
            "handwritten digits, "
            "distilled to 4 steps) and 40 **bold** digits, also shipped, as the style to learn.\n\n"
            "PSO (Pairwise Sample Optimization; Miao et al., arXiv 2410.03190) trains a LoRA so that the "
            "model **prefers the target images over its own samples** for the same captions, while staying "
            "close to the original model, on exactly the few sampling steps you use.\n\n"
            "## What happens\n"
            "Groups 2-5 run in order: the bold targets are encoded, the model samples its own references, "
            f"**PSO Train LoRA** trains {train['steps']} steps (batch {train['batch_size']}, rank "
            f"{train['lora_rank']}, learning rate {train['learning_rate']:g}) with a live chart, the LoRA is "
            "saved, and the test prompt is sampled before and after. A few minutes on a laptop CPU; a "
            "GPU is not needed.\n\n"
            "## What to look at\n"
            "The chart on PSO Train (loss falls, accuracy rises), the preview beside it, and the two "
            "images in group 5: the trained model draws thicker strokes. The demo model is tiny (digits "
            "through a 4x4 latent), so its samples are blobs at 32 px: it shows how the workflow runs, not "
            "image quality. For pictures you can judge, choose `shapes` in PSO Demo Model, `striped "
            "shapes` in PSO Demo Targets and the test prompt 'a blue square': coloured shapes that learn "
            "a striped fill.\n\n"
            "## Next\nOpen *pso_style_transfer* for a real model (SDXL-Turbo) and your own images."),
        2: ("### 1. Model\n**PSO Demo Model** (`digits`) is the shipped demo model: an SD1.5-class "
            "UNet, text encoder and VAE built through ComfyUI's own classes. Its prompts are 'a handwritten "
            "digit 3' etc. Swap it for **Load Checkpoint** to train your own model."),
        4: ("### 2. Target images\n**PSO Demo Targets** (`bold digits`) gives the 40 shipped bold digits "
            "(4 per digit, with captions) and encodes them with the demo model's VAE. For your own "
            "images use **PSO Target Images (folder)** on a folder in `ComfyUI/input/`.\n\n"
            "**Preview** shows the style PSO trains toward."),
        7: ("### 3. Reference samples\nPSO learns from pairs: a target against what the model makes for the "
            f"same caption. The demo model samples with **PSO Few-Step Sigmas** `{schedule}` and the "
            f"`{sampler}` sampler; **PSO Sample References** samples one reference per target with them."),
        11: ("### 4. Train and save\n**PSO Build Pairs** joins targets and references by caption.\n\n"
             "**PSO Train LoRA** (`pso_offline`, the node's "
             "defaults for beta, reference refresh and step-count mixing) re-samples each step's references "
             f"with the model being trained. Budget sized for a CPU: {train['steps']} steps; a preview every "
             f"{train['preview_every']} steps.\n\n"
             "**PSO Save LoRA** writes `models/loras/pso_demo/digits_00001.safetensors` (a new number on "
             "every run), readable by the stock Load LoRA node. **Plot Loss Graph** saves the curve."),
        16: ("### 5. Before and after\nThe test prompt (*" + prompt + "*) is sampled with the same noise "
             "with the original and with the trained model; both are saved in `output/pso_demo/`."),
        28: ("### 6. Later: sample with the saved LoRA\nMuted: it needs the LoRA file a run writes.\n"
             "1. Pick the file in **PSO LoRA Loader** (press R to refresh the list).\n"
             "2. Right-click this group's title > *Set Group Nodes to Always*.\n"
             "3. To sample without training again, right-click groups 2-5 > *Set Group Nodes to Never*."),
    }


def set_widget(node: dict, info: dict, name: str, value: Any) -> None:
    """Set the saved value of widget ``name`` in a UI-format node (positions as the frontend saves)."""
    i = 0
    saved = node["widgets_values"]
    for w in widgets_of(info):
        if w.name == name:
            saved[i] = value
            return
        i += 1
        if w.control and i < len(saved) and saved[i] in CONTROL_VALUES:
            i += 1
        if w.upload:
            i += 1
    raise KeyError(f"{node['type']} has no widget {name!r}")


def _swap(node: dict, new_type: str, title: str | None, keep_inputs: tuple[str, ...], info: dict) -> None:
    """Make ``node`` a ``new_type`` node (``info``: its /object_info entry) with default widget values."""
    node["type"] = new_type
    node["widgets_values"] = [default_value(w) for w in widgets_of(info)]
    node["inputs"] = [i for i in node.get("inputs", []) if i["name"] in keep_inputs]
    node["properties"] = {"cnr_id": "comfyui-pso", "Node name for S&R": new_type}
    if title:
        node["title"] = title
    else:
        node.pop("title", None)


def build(object_info: dict, style: dict | None = None) -> dict:
    """The template from the style example and ``tools.demo``'s settings (see the module docstring)."""
    from tools.demo import DEMO_SETTINGS, LOADER_SWAP

    wf = copy.deepcopy(style if style is not None else json.loads(STYLE_EXAMPLE.read_text(encoding="utf-8")))
    wf.pop("id", None)  # the frontend gives every opened copy its own id
    (loader_type, swap), = LOADER_SWAP.items()
    for node in wf["nodes"]:
        if node["type"] == loader_type:
            _swap(node, swap["class_type"], None, (), object_info[swap["class_type"]])
            node["size"] = [340, 90]
        elif node["type"] == "PSOTargetImagesFromFolder":
            _swap(node, "PSODemoTargets", None, ("vae",), object_info["PSODemoTargets"])
            node["size"] = [340, 80]
    for node in wf["nodes"]:
        kind = node["type"]
        for name, value in DEMO_SETTINGS.get(kind, {}).get("inputs", {}).items():
            set_widget(node, object_info[kind], name, value)
        if kind in PREFIXES:
            set_widget(node, object_info[kind], "filename_prefix", PREFIXES[kind])
        if kind == "SaveImage":
            set_widget(node, object_info[kind], "filename_prefix", SAVE_TITLES[node["title"]])
        if kind == "PSOLoraLoader":
            set_widget(node, object_info[kind], "lora_name", f"{PREFIXES['PSOSaveLoRA']}_00001.safetensors")
    notes = _notes(DEMO_SETTINGS)
    for node in wf["nodes"]:
        if node["type"] == "MarkdownNote":
            node["widgets_values"] = [notes[node["id"]]]
            node.pop("title", None) if node["id"] != 1 else node.update(title="Read me first")
    for group in wf["groups"]:
        group["title"] = GROUP_TITLES.get(group["id"], group["title"])
    return wf


PICK_TEMPLATE = REPO_ROOT / "example_workflows" / "pso_pick_and_train.json"
#: The picker -> train example: (id, type, pos, size, widget values by name, title).
_PICK_NODES = [
    (1, "MarkdownNote", [0, 0], [520, 620], {}, "Read me first"),
    (2, "PSODemoModelLoader", [600, 80], [340, 90], {}, None),
    (3, "PSOFewStepSigmas", [600, 310], [340, 90], {"schedule": "dmd2"}, None),
    (4, "KSamplerSelect", [600, 540], [340, 90], {"sampler_name": "lcm"}, None),
    (5, "PSOPickPairs", [1000, 80], [460, 760], {
        "prompts": "a handwritten digit 3\na handwritten digit 7", "seed": 0, "pairs_per_prompt": 4,
        "width": 32, "height": 32, "dataset_name": "demo_picks"}, None),
    (6, "PSOTrain", [1520, 80], [340, 720], {
        "method": "pso_offline", "steps": 60, "learning_rate": 1e-3, "lora_rank": 8, "batch_size": 4,
        "reference_refresh_every": 0, "training_dtype": "float32", "gradient_checkpointing": False,
        "checkpoint_every": 0, "preview_every": 0, "lora_target": "all", "target_sft_weight": 0.0}, None),
    (7, "PSOSaveLoRA", [1520, 1000], [340, 140], {"filename_prefix": "pso_demo/picked"}, None),
]
#: (origin id, origin slot, target id, target input name)
_PICK_LINKS = [(2, 0, 3, "model"), (2, 0, 5, "model"), (2, 1, 5, "clip"), (2, 2, 5, "vae"),
               (4, 0, 5, "sampler"), (3, 0, 5, "sigmas"), (2, 0, 6, "model"), (5, 0, 6, "pairs"),
               (2, 2, 6, "vae"), (6, 1, 7, "lora"), (6, 0, 7, "model")]
_PICK_GROUPS = [("1. Model and sampler", [580, 0, 380, 680]),
                ("2. Label pairs in the node", [980, 0, 500, 880]),
                ("3. Train on your picks and save", [1500, 0, 380, 1200])]


#: PSO Train's beta for preference pairs (pso/train_settings.py BETA_PREFERENCE_PAIRS; a test compares).
BETA_PREFERENCE_PAIRS = 50.0


def _pick_note(beta: float) -> str:
    return ("# Label pairs by hand, then train on them\n\n"
            "When no folder of target images says what 'better' is, **you** say it: PSO Pick Pairs samples "
            "two images per pair from the model and shows them in the node; click the better one. Every "
            "pick is saved at once in `output/pso_pairs/demo_picks`; the pairs feed **PSO Train LoRA**.\n\n"
            "## Run\n1. Press **Queue** (Run). Pairs of 32x32 digits appear in *PSO Pick Pairs*.\n"
            "2. Click the better image of each pair (or press 1 / ← and 2 / →; T = tie, S = skip). Which "
            "side each sample is shown on is drawn per pair, so a habit of clicking one side does not "
            "become a preference.\n3. After the last pick the node says where the picks were saved, and "
            "PSO Train trains on them (its chart shows loss and accuracy), then PSO Save LoRA writes "
            "`models/loras/pso_demo/picked_00001.safetensors`.\n\n"
            "Closing the browser loses nothing: queue again (same seed) and only the undecided pairs are "
            "shown.\n\n## Settings that matter\n`reference_refresh_every` **0**: the rejected images are "
            f"the references (a refresh would replace them with new samples); `beta` {beta:g} for "
            "preference pairs.\n\n## Your own model\nReplace *PSO Demo Model* by *Load Checkpoint* and set "
            "PSO Few-Step Sigmas, the sampler and the image size for it; use one dataset per model.")


def build_pick_and_train(object_info: dict) -> dict:
    """The picker -> PSO Train example on the demo model (runs as it opens; you label the pairs)."""
    nodes, by_id = [], {}
    for order, (nid, kind, pos, size, values, title) in enumerate(_PICK_NODES):
        node = {"id": nid, "type": kind, "pos": pos, "size": size, "flags": {}, "order": order, "mode": 0,
                "inputs": [], "outputs": [], "properties": {"Node name for S&R": kind}}
        if kind == "MarkdownNote":
            node["widgets_values"] = [_pick_note(BETA_PREFERENCE_PAIRS)]
        else:
            info = object_info[kind]
            node["properties"]["cnr_id"] = "comfyui-pso" if kind.startswith("PSO") else "comfy-core"
            saved = []
            for w in widgets_of(info):
                saved.append(w.spec.get("default", default_value(w)))
                if w.control:
                    saved.append("fixed")
                if w.upload:
                    saved.append("image")
            node["widgets_values"] = saved
            extra = {"beta": BETA_PREFERENCE_PAIRS} if kind == "PSOTrain" else {}
            for name, value in {**values, **extra}.items():
                set_widget(node, info, name, value)
            outs = zip(info["output_name"], info["output"], strict=True)
            node["outputs"] = [{"name": n, "type": t, "links": [], "slot_index": i}
                               for i, (n, t) in enumerate(outs)]
        if title:
            node["title"] = title
        nodes.append(node)
        by_id[nid] = node
    links = []
    for lid, (origin, slot, target, name) in enumerate(_PICK_LINKS, start=1):
        kind = by_id[origin]["outputs"][slot]["type"]
        links.append([lid, origin, slot, target, len(by_id[target]["inputs"]), kind])
        by_id[target]["inputs"].append({"name": name, "type": kind, "link": lid})
        by_id[origin]["outputs"][slot]["links"].append(lid)
    for node in nodes:  # inputs in the node's own order (the frontend matches them by name)
        if node["type"] in object_info:
            spec = object_info[node["type"]]["input_order"]
            order = [n for sec in ("required", "optional") for n in spec.get(sec, [])]
            node["inputs"].sort(key=lambda i: order.index(i["name"]))
    for link in links:
        target = by_id[link[3]]
        link[4] = next(i for i, x in enumerate(target["inputs"]) if x["link"] == link[0])
    groups = [{"id": i + 1, "title": t, "bounding": b, "color": "#3f789e", "font_size": 24, "flags": {}}
              for i, (t, b) in enumerate(_PICK_GROUPS)]
    return {"revision": 0, "last_node_id": max(by_id), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": groups, "config": {},
            "extra": {"ds": {"scale": 0.6, "offset": [40, 60]}}, "version": 0.4}


def dumps(wf: dict) -> str:
    return json.dumps(wf, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", action="store_true",
                        help=f"also re-write the shipped target images in {TARGETS_DIR} and "
                        f"{SHAPE_TARGETS_DIR}")
    args = parser.parse_args(argv)
    import tempfile

    from tools.comfy_host import ComfyServer

    if args.targets:
        from tools.demo import TASKS, write_targets

        write_targets(TARGETS_DIR)
        write_targets(SHAPE_TARGETS_DIR, task=TASKS["shapes"])
    with tempfile.TemporaryDirectory(prefix="pso-template-") as base, \
            ComfyServer(Path(base), with_fixtures=False) as server:
        info = server.object_info()
    from pso.io import atomic_write_bytes

    atomic_write_bytes(TEMPLATE, dumps(build(info)).encode("utf-8"))
    atomic_write_bytes(PICK_TEMPLATE, dumps(build_pick_and_train(info)).encode("utf-8"))
    print(f"wrote {TEMPLATE} and {PICK_TEMPLATE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
