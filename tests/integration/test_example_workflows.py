"""The shipped example workflows load and run, converted from their UI format as the frontend does.

Converter facts (no server): widget values are matched by position in ``/object_info`` order, with
the frontend's "control after generate" values skipped (also for an INT named ``seed`` whose spec
does not ask for one); links resolve through reroutes and bypassed nodes; PrimitiveNode values
replace links; notes, muted nodes and inputs linked to muted nodes are dropped; missing node types
and bad replacements are refused with the node named. The expected graph below is what the ComfyUI
frontend 1.32.9 (``app.graphToPrompt()``) produced for this same workflow.

Server facts: every example is served by ``/workflow_templates``, uses only node types the host
has, with as many widget values as the frontend saves, correctly typed links and no unconnected
required input; its notes name every model file it loads, and the frontend's missing-models
dialog can offer each one for download; converted with its checkpoint swapped for
the tiny fixture and its sizes and steps shrunk, it runs: the LoRA file appears in the loras folder
with the workflow's method in its metadata, before/after images are saved and differ, and the muted
"saved LoRA" group, once switched on, reproduces the trained model's image from the file. The
Z-Image-Turbo example runs the same way on the tiny Z-Image (one fixture serves its three loaders); the
Wan 2.2 example is checked on the host only (no tiny Wan 2.2 text encoder or VAE loads here).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tools.workflow import (
    WorkflowError,
    check_workflow,
    expected_widget_count,
    ui_to_api,
    widgets_of,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "example_workflows"
SHIPPED = ("pso_concept", "pso_demo_digits_cpu", "pso_online_preference", "pso_pick_and_train",
           "pso_pickapic_offline", "pso_preference_pairs", "pso_style_transfer", "pso_wan22_video",
           "pso_zimage_turbo_style")
PACKAGE = "comfyui-pso"
#: Combo inputs whose options are the user's own files or folders (empty on the test host).
USER_FILES = [("CheckpointLoaderSimple", "ckpt_name"), ("LoraLoader", "lora_name"),
              ("PSOTargetImagesFromFolder", "folder"), ("PSOLoraLoader", "lora_name"), ("LoadImage", "image"),
              ("PSOImportPreferencePairs", "source"), ("PSORewardModelLoader", "model_file"),
              ("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"), ("VAELoader", "vae_name")]
#: The PSO nodes each example must show a user (the preference example starts from image pairs).
_FROM_TARGETS = {"PSOTargetImagesFromFolder", "PSOSampleReferences", "PSOBuildPairs", "PSOLoraLoader"}
EXAMPLE_NODES = {
    "pso_style_transfer": _FROM_TARGETS | {"PSOTrain"},
    "pso_concept": _FROM_TARGETS | {"PSOTrain"},
    "pso_preference_pairs": {"PSOPreferencePairs", "PSOFewStepSigmas", "PSOTrain"},
    "pso_pickapic_offline": {"PSOImportPreferencePairs", "PSOFewStepSigmas", "PSORewardModelLoader",
                             "PSOEvaluate", "PSOTrain"},
    "pso_online_preference": {"PSOOnlineTrain", "PSORewardModelLoader", "PSOFewStepSigmas"},
    # runs as it opens: the shipped model and targets (tests/integration/test_demo_template.py)
    "pso_demo_digits_cpu": {"PSODemoModelLoader", "PSODemoTargets", "PSOSampleReferences", "PSOTrain"},
    "pso_pick_and_train": {"PSODemoModelLoader", "PSOPickPairs", "PSOTrain"},
    # the style graph on the newer families' separate loaders (tools/family_templates.py)
    "pso_zimage_turbo_style": _FROM_TARGETS | {"PSOTrain", "PSOFewStepSigmas", "UNETLoader", "CLIPLoader",
                                               "VAELoader"},
    "pso_wan22_video": _FROM_TARGETS | {"PSOTrain", "PSOFewStepSigmas", "UNETLoader", "LoraLoader",
                                        "CLIPLoader", "VAELoader", "Wan22ImageToVideoLatent",
                                        "SaveAnimatedWEBP"},
}
#: Examples that load no model file (nothing for the notes or the missing-models dialog to name).
NO_MODEL_FILES = {"pso_demo_digits_cpu", "pso_pick_and_train"}

# -- the converter on a hand-written workflow ------------------------------------------------------

#: /object_info entries as the 0.3.75 host gives them (tooltips left out): V3 "COMBO" specs and
#: classic option lists, a KSampler seed that asks for a control widget and a fixture seed that
#: does not (the frontend adds one anyway for the names seed and noise_seed).
OBJECT_INFO = {
    "PSOTestTinyCheckpoint": {
        "input": {"required": {"family": ["COMBO", {"default": "sd15", "options": ["sd15", "sdxl"]}],
                               "seed": ["INT", {"default": 0, "min": 0, "max": 2147483647}],
                               "prediction": ["COMBO", {"default": "eps", "options": ["eps", "v"]}]}},
        "input_order": {"required": ["family", "seed", "prediction"]},
        "output": ["MODEL", "CLIP", "VAE"], "display_name": "PSO Test: Tiny Checkpoint"},
    "CheckpointLoaderSimple": {
        "input": {"required": {"ckpt_name": [["tiny.safetensors"], {}]}},
        "input_order": {"required": ["ckpt_name"]}, "output": ["MODEL", "CLIP", "VAE"],
        "display_name": "Load Checkpoint"},
    "LoraLoader": {
        "input": {"required": {"model": ["MODEL", {}], "clip": ["CLIP", {}],
                               "lora_name": [["x.safetensors"], {}],
                               "strength_model": ["FLOAT", {"default": 1.0}],
                               "strength_clip": ["FLOAT", {"default": 1.0}]}},
        "input_order": {"required": ["model", "clip", "lora_name", "strength_model", "strength_clip"]},
        "output": ["MODEL", "CLIP"], "display_name": "Load LoRA"},
    "CLIPTextEncode": {
        "input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}},
        "input_order": {"required": ["text", "clip"]}, "output": ["CONDITIONING"],
        "display_name": "CLIP Text Encode (Prompt)"},
    "KSampler": {
        "input": {"required": {
            "model": ["MODEL", {}],
            "seed": ["INT", {"default": 0, "min": 0, "max": 2**64 - 1, "control_after_generate": True}],
            "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
            "cfg": ["FLOAT", {"default": 8.0}], "sampler_name": [["euler", "lcm"], {}],
            "scheduler": [["normal", "sgm_uniform"], {}], "positive": ["CONDITIONING", {}],
            "negative": ["CONDITIONING", {}], "latent_image": ["LATENT", {}],
            "denoise": ["FLOAT", {"default": 1.0}]}},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                     "negative", "latent_image", "denoise"]},
        "output": ["LATENT"], "display_name": "KSampler"},
    "EmptyLatentImage": {
        "input": {"required": {"width": ["INT", {"default": 512}], "height": ["INT", {"default": 512}],
                               "batch_size": ["INT", {"default": 1}]}},
        "input_order": {"required": ["width", "height", "batch_size"]}, "output": ["LATENT"],
        "display_name": "Empty Latent Image"},
    "VAEDecode": {"input": {"required": {"samples": ["LATENT", {}], "vae": ["VAE", {}]}},
                  "input_order": {"required": ["samples", "vae"]}, "output": ["IMAGE"],
                  "display_name": "VAE Decode"},
    "SaveImage": {"input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {}]},
                            "hidden": {"prompt": "PROMPT"}},
                  "input_order": {"required": ["images", "filename_prefix"], "hidden": ["prompt"]},
                  "output": [], "display_name": "Save Image"},
}


def _node(nid, kind, inputs=(), outputs=(), widgets=(), mode=0, title=None):
    node = {"id": nid, "type": kind, "pos": [0, 0], "size": [300, 100], "flags": {}, "order": nid,
            "mode": mode, "properties": {}, "widgets_values": list(widgets),
            "inputs": [dict(zip(("name", "type", "link"), i, strict=True)) for i in inputs],
            "outputs": [dict(zip(("name", "type", "links"), o, strict=True)) for o in outputs]}
    if title:
        node["title"] = title
    return node


def hand_written_workflow() -> dict:
    """A UI-format workflow with a reroute, a bypassed and two muted nodes, a primitive and notes.

    The checkpoint's MODEL goes through a Reroute and a bypassed LoRA loader to the KSampler, its
    CLIP through the bypassed loader to the prompt; the negative prompt and one SaveImage are
    muted; a PrimitiveNode drives the KSampler's steps (a widget converted to an input).
    """
    nodes = [
        _node(1, "PSOTestTinyCheckpoint",
              outputs=[("MODEL", "MODEL", [1]), ("CLIP", "CLIP", [2, 4]), ("VAE", "VAE", [9])],
              widgets=["sdxl", 7, "fixed", "eps"]),
        _node(2, "Reroute", inputs=[("", "*", 1)], outputs=[("", "MODEL", [3])]),
        _node(3, "LoraLoader", inputs=[("model", "MODEL", 3), ("clip", "CLIP", 2)],
              outputs=[("MODEL", "MODEL", [5]), ("CLIP", "CLIP", [6])], widgets=["x.safetensors", 0.5, 0.5],
              mode=4),
        _node(4, "CLIPTextEncode", inputs=[("clip", "CLIP", 6)],
              outputs=[("CONDITIONING", "CONDITIONING", [7])], widgets=["a red fox"], title="Positive"),
        _node(5, "CLIPTextEncode", inputs=[("clip", "CLIP", 4)],
              outputs=[("CONDITIONING", "CONDITIONING", [8])], widgets=["blurry"], mode=2),
        _node(6, "KSampler", inputs=[("model", "MODEL", 5), ("positive", "CONDITIONING", 7),
                                     ("negative", "CONDITIONING", 8), ("latent_image", "LATENT", 10),
                                     ("steps", "INT", 13)],
              outputs=[("LATENT", "LATENT", [11])],
              widgets=[123, "randomize", 20, 1.0, "lcm", "sgm_uniform", 1.0]),
        _node(7, "EmptyLatentImage", outputs=[("LATENT", "LATENT", [10])], widgets=[64, 48, 2]),
        _node(8, "VAEDecode", inputs=[("samples", "LATENT", 11), ("vae", "VAE", 9)],
              outputs=[("IMAGE", "IMAGE", [12, 14])]),
        _node(9, "PrimitiveNode", outputs=[("INT", "INT", [13])], widgets=[3, "fixed"], title="steps"),
        _node(10, "SaveImage", inputs=[("images", "IMAGE", 12)], widgets=["unit"]),
        _node(11, "SaveImage", inputs=[("images", "IMAGE", 14)], widgets=["muted"], mode=2),
        _node(12, "Note", widgets=["plain text note"]),
        _node(13, "MarkdownNote", widgets=["# a markdown note"]),
    ]
    nodes[5]["inputs"][4]["widget"] = {"name": "steps"}  # a widget converted to an input
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 1, 3, 1, "CLIP"], [3, 2, 0, 3, 0, "MODEL"],
             [4, 1, 1, 5, 0, "CLIP"], [5, 3, 0, 6, 0, "MODEL"], [6, 3, 1, 4, 0, "CLIP"],
             [7, 4, 0, 6, 1, "CONDITIONING"], [8, 5, 0, 6, 2, "CONDITIONING"], [9, 1, 2, 8, 1, "VAE"],
             [10, 7, 0, 6, 3, "LATENT"], [11, 6, 0, 8, 0, "LATENT"], [12, 8, 0, 10, 0, "IMAGE"],
             [13, 9, 0, 6, 4, "INT"], [14, 8, 0, 11, 0, "IMAGE"]]
    return {"last_node_id": 13, "last_link_id": 14, "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


#: What the ComfyUI frontend 1.32.9 sends for hand_written_workflow() (app.graphToPrompt().output).
FRONTEND_GRAPH = {
    "1": {"inputs": {"family": "sdxl", "seed": 7, "prediction": "eps"}, "class_type": "PSOTestTinyCheckpoint",
          "_meta": {"title": "PSO Test: Tiny Checkpoint"}},
    "4": {"inputs": {"text": "a red fox", "clip": ["1", 1]}, "class_type": "CLIPTextEncode",
          "_meta": {"title": "Positive"}},
    "6": {"inputs": {"seed": 123, "steps": 3, "cfg": 1.0, "sampler_name": "lcm", "scheduler": "sgm_uniform",
                     "denoise": 1.0, "model": ["1", 0], "positive": ["4", 0], "latent_image": ["7", 0]},
          "class_type": "KSampler", "_meta": {"title": "KSampler"}},
    "7": {"inputs": {"width": 64, "height": 48, "batch_size": 2}, "class_type": "EmptyLatentImage",
          "_meta": {"title": "Empty Latent Image"}},
    "8": {"inputs": {"samples": ["6", 0], "vae": ["1", 2]}, "class_type": "VAEDecode",
          "_meta": {"title": "VAE Decode"}},
    "10": {"inputs": {"filename_prefix": "unit", "images": ["8", 0]}, "class_type": "SaveImage",
           "_meta": {"title": "Save Image"}},
}


def test_conversion_matches_the_frontend():
    assert ui_to_api(hand_written_workflow(), OBJECT_INFO) == FRONTEND_GRAPH


def test_widget_layout_counts_the_frontends_control_widgets():
    assert [(w.name, w.control) for w in widgets_of(OBJECT_INFO["KSampler"])] == [
        ("seed", True), ("steps", False), ("cfg", False), ("sampler_name", False), ("scheduler", False),
        ("denoise", False)]
    assert expected_widget_count(OBJECT_INFO["KSampler"]) == 7
    # no control_after_generate in the spec, but the input is called "seed": the frontend adds one
    assert expected_widget_count(OBJECT_INFO["PSOTestTinyCheckpoint"]) == 4
    forced = {"input": {"required": {"text": ["STRING", {"forceInput": True}], "n": ["INT", {}]},
                        "optional": {"name": ["STRING", {}]}},
              "input_order": {"required": ["text", "n"], "optional": ["name"]}}
    assert [w.name for w in widgets_of(forced)] == ["n", "name"]  # a forceInput STRING is a socket
    upload = {"input": {"required": {"image": [["a.png"], {"image_upload": True}]}}}
    assert expected_widget_count(upload) == 2  # LoadImage saves ["a.png", "image"]


def test_a_workflow_saved_without_the_control_value_still_lines_up():
    wf = hand_written_workflow()
    wf["nodes"][0]["widgets_values"] = ["sdxl", 7, "eps"]  # saved before "seed" had a control widget
    assert ui_to_api(wf, OBJECT_INFO)["1"]["inputs"] == {"family": "sdxl", "seed": 7, "prediction": "eps"}


def test_missing_trailing_values_take_defaults_and_are_reported():
    wf = hand_written_workflow()
    wf["nodes"][6]["widgets_values"] = [64, 48]  # saved before batch_size existed
    assert ui_to_api(wf, OBJECT_INFO)["7"]["inputs"]["batch_size"] == 1
    problems = check_workflow(wf, OBJECT_INFO)
    assert problems == ["node 7 (EmptyLatentImage): 2 widget values, but the node has 3 "
                        "(width, height, batch_size)"]


def test_a_missing_node_type_is_named_with_its_node():
    wf = hand_written_workflow()
    wf["nodes"][7]["type"] = "VAEDecodeTiled"
    wf["nodes"][7]["title"] = "Decode"
    with pytest.raises(WorkflowError, match=r"node 8 'Decode' \(VAEDecodeTiled\): this ComfyUI has no node "
                       r"type 'VAEDecodeTiled' \(similar types it has: VAEDecode\)"):
        ui_to_api(wf, OBJECT_INFO)
    assert any("no node type 'VAEDecodeTiled'" in p for p in check_workflow(wf, OBJECT_INFO))


def test_replace_swaps_a_loader_and_overrides_widgets():
    wf = hand_written_workflow()
    wf["nodes"][0]["type"] = "CheckpointLoaderSimple"
    wf["nodes"][0]["widgets_values"] = ["real_model.safetensors"]
    graph = ui_to_api(wf, OBJECT_INFO, replace={
        "CheckpointLoaderSimple": {"class_type": "PSOTestTinyCheckpoint", "inputs": {"family": "sdxl"}},
        "EmptyLatentImage": {"inputs": {"width": 8, "height": 8}},
        "6": {"inputs": {"steps": 1}},  # by node id; also replaces the PrimitiveNode's value
    })
    assert graph["1"]["class_type"] == "PSOTestTinyCheckpoint"
    assert graph["1"]["inputs"] == {"family": "sdxl", "seed": 0, "prediction": "eps"}  # rest: defaults
    assert graph["7"]["inputs"] == {"width": 8, "height": 8, "batch_size": 2}
    assert graph["6"]["inputs"]["steps"] == 1 and graph["6"]["inputs"]["model"] == ["1", 0]


def test_bad_replacements_are_refused():
    wf = hand_written_workflow()
    with pytest.raises(WorkflowError, match="replace key 'KSamplerAdvanced' matches no node"):
        ui_to_api(wf, OBJECT_INFO, replace={"KSamplerAdvanced": {"inputs": {"steps": 1}}})
    with pytest.raises(WorkflowError, match=r"EmptyLatentImage has no input\(s\) \['size'\]"):
        ui_to_api(wf, OBJECT_INFO, replace={"EmptyLatentImage": {"inputs": {"size": 8}}})
    # LoraLoader gives (MODEL, CLIP): not a drop-in for a checkpoint whose VAE (slot 2) is used
    with pytest.raises(WorkflowError, match=r"reads output 2 \(VAE\), but LoraLoader gives None there"):
        ui_to_api(wf, OBJECT_INFO, replace={"PSOTestTinyCheckpoint": {"class_type": "LoraLoader"}})


def test_check_workflow_finds_broken_and_mistyped_links():
    assert check_workflow(hand_written_workflow(), OBJECT_INFO) == []
    wf = hand_written_workflow()
    wf["links"][8][5] = "LATENT"  # link 9 claims to carry a LATENT from the VAE output
    wf["nodes"][7]["inputs"][1]["link"] = None  # VAEDecode's vae no longer lists it
    problems = check_workflow(wf, OBJECT_INFO)
    assert "node 8 (VAEDecode): required input 'vae' (VAE) is not connected" in problems
    assert "link 9 (1:2 -> 8): no input of node 8 (VAEDecode) lists this link" in problems


# -- the shipped workflows on the real host ---------------------------------------------------------

def _load(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


def test_the_examples_are_the_shipped_set_and_served_as_templates(comfy_server):
    assert tuple(sorted(p.stem for p in EXAMPLES.glob("*.json"))) == SHIPPED
    assert sorted(comfy_server.get_json("/workflow_templates")[PACKAGE]) == list(SHIPPED)
    for name in SHIPPED:
        status, _, body = comfy_server.request(f"/api/workflow_templates/{PACKAGE}/{name}.json")
        assert status == 200 and json.loads(body) == _load(name)


def test_every_example_has_a_thumbnail_served_to_the_template_browser(comfy_server):
    """The frontend asks for <name>.jpg for every template (a 404 each otherwise); the card carries the
    human title and description (tools/template_thumbnails.py: frontends show only the file name)."""
    from tools.template_thumbnails import TEMPLATES

    assert sorted(TEMPLATES) == list(SHIPPED)
    for name in SHIPPED:
        status, headers, body = comfy_server.request(f"/api/workflow_templates/{PACKAGE}/{name}.jpg")
        assert status == 200 and body[:3] == b"\xff\xd8\xff", name  # a JPEG
        assert body == (EXAMPLES / f"{name}.jpg").read_bytes()
        with Image.open(EXAMPLES / f"{name}.jpg") as img:
            assert img.size == (512, 384)


def test_no_example_carries_a_fixed_workflow_id():
    """The frontend gives a loaded workflow without an id a fresh one; a fixed id in a template would make
    every opened copy one workflow to the training monitor, which then shows an earlier copy's run."""
    assert [p.stem for p in EXAMPLES.glob("*.json") if "id" in _load(p.stem)] == []


@pytest.mark.parametrize("name", SHIPPED)
def test_example_loads_on_the_host(object_info, name):
    wf = _load(name)
    assert check_workflow(wf, object_info, USER_FILES) == []
    types = {n["type"] for n in wf["nodes"]}
    assert EXAMPLE_NODES[name] | {"PSOSaveLoRA", "MarkdownNote"} <= types
    notes = "\n".join(n["widgets_values"][0] for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote"))
    folders = {"CheckpointLoaderSimple": "checkpoints", "LoraLoader": "loras",
               "UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders", "VAELoader": "vae"}
    loaders = [n for n in wf["nodes"] if n["type"] in folders]
    assert (not loaders) if name in NO_MODEL_FILES else loaders
    assert all(n["widgets_values"][0] in notes for n in loaders), "notes name the model files"
    for n in loaders:  # what the frontend's missing-models dialog offers to download
        assert [(m["name"], m["directory"], m["url"].startswith("https://huggingface.co/"))
                for m in n["properties"]["models"]] == [(n["widgets_values"][0], folders[n["type"]], True)]


@pytest.mark.parametrize(("name", "schedule", "config"), [
    ("pso_zimage_turbo_style", "zimage_turbo_8", "ZImage"),
    ("pso_wan22_video", "wan_lightning_4", "WAN22_T2V")])
def test_family_examples_are_the_generated_ones_with_the_family_s_schedule(name, schedule, config):
    """The Z-Image and Wan examples are tools/family_templates.py's output (a change to the style example
    or the generator shows up as a stale file), use the family's few-step preset and name the files
    ComfyUI's repackaged repositories ship."""
    from pso import families
    from tools import family_templates

    assert family_templates.BUILDERS[name]() == _load(name)
    wf = _load(name)
    assert {n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "PSOFewStepSigmas"} == {schedule}
    assert schedule in {p.name for p in families.FAMILIES[config].schedules}
    assert "CheckpointLoaderSimple" not in {n["type"] for n in wf["nodes"]}
    if name == "pso_wan22_video":  # the distillation LoRA sits between the base model and everything else
        lora = next(n for n in wf["nodes"] if n["type"] == "LoraLoader")
        unet = next(n for n in wf["nodes"] if n["type"] == "UNETLoader")
        assert unet["outputs"][0]["links"] == [lora["inputs"][0]["link"]]
        assert len(lora["outputs"][0]["links"]) == 8  # every MODEL consumer of the style graph


def _write_images(folder: Path, captions: list[str | None]) -> None:
    """Small RGB pictures (a coloured disc on a light background), with optional caption files."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(captions):
        img = Image.new("RGB", (80, 64), (235, 225, 200))
        ImageDraw.Draw(img).ellipse((10 + 8 * i, 8, 60 + 8 * i, 56), fill=(40 + 90 * i, 60, 160))
        img.save(folder / f"img{i}.png")
        if caption is not None:
            (folder / f"img{i}.txt").write_text(caption, encoding="utf-8")


def _tiny(**train) -> dict:
    """Swap the real checkpoint for the tiny fixture and shrink sizes and training for a CPU test."""
    return {
        "CheckpointLoaderSimple": {"class_type": "PSOTestTinyCheckpoint",
                                   "inputs": {"family": "sdxl", "seed": 0, "prediction": "eps"}},
        "PSOTargetImagesFromFolder": {"inputs": {"size": 64}},
        "EmptyLatentImage": {"inputs": {"width": 64, "height": 64}},
        "PSOTrain": {"inputs": {"steps": 2, "learning_rate": 1e-2, "lora_rank": 4, **train}},
    }


def _titled(entry: dict, graph: dict, title: str) -> list[dict]:
    node_id = next(k for k, v in graph.items() if v["_meta"]["title"] == title)
    return entry["outputs"][node_id]["images"]


def _pixels(server, info: dict) -> np.ndarray:
    return np.asarray(Image.open(server.output_path(info)).convert("RGB"), dtype=np.int16)


def _lora_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


@pytest.fixture(scope="module")
def style_run(comfy_server, object_info):
    _write_images(comfy_server.base_dir / "input" / "pso_style",
                  ["a blue disc on sand", "a purple disc on sand"])
    wf = _load("pso_style_transfer")
    graph = ui_to_api(wf, object_info, replace=_tiny())
    entry = comfy_server.run(graph, timeout=300)
    return wf, graph, entry


def test_style_transfer_example_trains_saves_and_compares(comfy_server, style_run):
    wf, graph, entry = style_run
    loras = comfy_server.base_dir / "models" / "loras"
    assert sorted(p.name for p in (loras / "pso").glob("style_*.safetensors")) == ["style_00001.safetensors"]
    settings = json.loads(_lora_metadata(loras / "pso" / "style_00001.safetensors")["pso.settings"])
    assert settings["method"] == "pso_offline"
    before = _titled(entry, graph, "Save: before (original model)")
    after = _titled(entry, graph, "Save: after (PSO-trained model)")
    assert [Path(i["filename"]).parent for i in before] == [Path()] and before[0]["subfolder"] == "pso"
    b, a = _pixels(comfy_server, before[0]), _pixels(comfy_server, after[0])
    assert b.shape == a.shape == (64, 64, 3)
    assert np.abs(b - a).max() > 2, "the 'after' image must come from the trained model"
    assert _titled(entry, graph, "Plot Loss Graph"), "the loss curve is saved"
    assert _titled(entry, graph, "Preview: target images"), "the targets are shown"


def _saved_lora_group_only(wf: dict) -> dict:
    """A copy of a template with group 6 (the saved LoRA) switched on and groups 2-5 (training)
    muted, as the template's note tells the user."""
    wf = copy.deepcopy(wf)
    groups = {g["title"][:2]: g["bounding"] for g in wf["groups"]}

    def inside(node, box):
        x, y = node["pos"]
        return box[0] <= x <= box[0] + box[2] and box[1] <= y <= box[1] + box[3]

    for node in wf["nodes"]:
        if inside(node, groups["6."]):
            node["mode"] = 0
        elif any(inside(node, groups[g]) for g in ("2.", "3.", "4.", "5.")):
            node["mode"] = 2
    return wf


def test_style_transfer_saved_lora_group_reproduces_the_trained_model(comfy_server, object_info, style_run):
    """Follow the note of group 6: switch it on, switch groups 2-5 off, pick the saved LoRA."""
    wf, graph, entry = style_run
    wf = _saved_lora_group_only(wf)
    later = ui_to_api(wf, object_info, replace={**_tiny(), "PSOLoraLoader": {
        "inputs": {"lora_name": str(Path("pso", "style_00001.safetensors"))}}})
    assert {v["class_type"] for v in later.values()} >= {"PSOLoraLoader", "SamplerCustomAdvanced"}
    assert "PSOTrain" not in {v["class_type"] for v in later.values()}
    second = comfy_server.run(later, timeout=300)
    with_file = _pixels(comfy_server, _titled(second, later, "Save: with the saved LoRA")[0])
    trained = _pixels(comfy_server, _titled(entry, graph, "Save: after (PSO-trained model)")[0])
    original = _pixels(comfy_server, _titled(entry, graph, "Save: before (original model)")[0])
    assert np.abs(with_file - trained).max() <= 2, "the saved file must give the trained model's image"
    assert np.abs(with_file - original).max() > 2


def test_concept_example_trains_on_top_of_a_distillation_lora(comfy_server, object_info, style_run):
    # The workflow loads SDXL base + the DMD2 LoRA; the tiny stand-in for DMD2's LoRA is the style
    # LoRA trained above, so the PSO LoRA is trained on a model that already carries a LoRA patch.
    loras = comfy_server.base_dir / "models" / "loras"
    shutil.copy(loras / "pso" / "style_00001.safetensors", loras / "dmd2_sdxl_4step_lora_fp16.safetensors")
    _write_images(comfy_server.base_dir / "input" / "pso_concept", [None, None])  # default prompt: sks dog
    graph = ui_to_api(_load("pso_concept"), object_info, replace=_tiny())
    assert {v["class_type"] for v in graph.values()} >= {"LoraLoader", "PSOTrain"}
    entry = comfy_server.run(graph, timeout=300)
    saved = loras / "pso" / "concept_sks_dog_00001.safetensors"
    settings = json.loads(_lora_metadata(saved)["pso.settings"])
    assert settings["method"] == "pso_dreambooth"
    b = _pixels(comfy_server, _titled(entry, graph, "Save: before (original model)")[0])
    a = _pixels(comfy_server, _titled(entry, graph, "Save: after (PSO-trained model)")[0])
    assert np.abs(b - a).max() > 2


def _loaders_from_fixture(graph: dict, family: str) -> dict:
    """``graph`` (API format) with Load Diffusion Model / Load CLIP / Load VAE served by one tiny fixture
    of ``family``: its MODEL, CLIP and VAE outputs (slots 0, 1, 2) replace the three loaders' outputs."""
    kinds = {"UNETLoader": 0, "CLIPLoader": 1, "VAELoader": 2}
    loaders = {k: kinds[v["class_type"]] for k, v in graph.items() if v["class_type"] in kinds}
    out = {k: v for k, v in graph.items() if k not in loaders}
    out["tiny"] = {"class_type": "PSOTestTinyCheckpoint", "inputs": {"family": family, "seed": 0,
                                                                     "prediction": "eps"},
                   "_meta": {"title": "tiny fixture"}}
    for node in out.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] in loaders:
                node["inputs"][name] = ["tiny", loaders[value[0]]]
    return out


def test_zimage_example_trains_saves_and_its_saved_lora_group_reproduces(comfy_server, object_info):
    """The Z-Image-Turbo example on the tiny Z-Image (its own Qwen3 text encoder, small): trains with the
    family's 8-step preset, saves the LoRA, before/after differ, and group 6 switched on (groups 2-5 off)
    gives the trained model's image from the file."""
    _write_images(comfy_server.base_dir / "input" / "pso_style", ["a blue disc on sand", "a purple disc"])
    wf = _load("pso_zimage_turbo_style")
    shrink = {"PSOTargetImagesFromFolder": {"inputs": {"size": 64}},
              "EmptySD3LatentImage": {"inputs": {"width": 64, "height": 64}},
              "PSOTrain": {"inputs": {"steps": 3, "learning_rate": 1e-2, "lora_rank": 4}}}
    graph = _loaders_from_fixture(ui_to_api(wf, object_info, replace=shrink), "zimage")
    entry = comfy_server.run(graph, timeout=600)
    saved = comfy_server.base_dir / "models" / "loras" / "pso" / "zimage_style_00001.safetensors"
    meta = _lora_metadata(saved)
    assert json.loads(meta["pso.settings"])["method"] == "pso_offline"
    assert json.loads(meta["pso.base_fingerprint"])["model_config"] == "ZImage"
    before = _pixels(comfy_server, _titled(entry, graph, "Save: before (original model)")[0])
    after = _pixels(comfy_server, _titled(entry, graph, "Save: after (PSO-trained model)")[0])
    assert np.abs(before - after).max() > 2
    wf = _saved_lora_group_only(wf)
    later = _loaders_from_fixture(ui_to_api(wf, object_info, replace={**shrink, "PSOLoraLoader": {
        "inputs": {"lora_name": str(Path("pso", "zimage_style_00001.safetensors"))}}}), "zimage")
    second = comfy_server.run(later, timeout=300)
    with_file = _pixels(comfy_server, _titled(second, later, "Save: with the saved LoRA")[0])
    assert np.abs(with_file - after).max() <= 2, "the saved file must give the trained model's image"


def test_preference_pairs_example_trains_from_image_pairs(comfy_server, object_info):
    inputs = comfy_server.base_dir / "input"
    for i, name in enumerate(["preferred_1", "preferred_2", "rejected_1", "rejected_2"]):
        img = Image.new("RGB", (80, 64), (235, 225, 200))
        ImageDraw.Draw(img).rectangle((8 + 6 * i, 8, 50 + 6 * i, 56), fill=(200 - 60 * i, 40, 60 + 50 * i))
        img.save(inputs / f"{name}.png")
    graph = ui_to_api(_load("pso_preference_pairs"), object_info, replace={
        "CheckpointLoaderSimple": {"class_type": "PSOTestTinyCheckpoint",
                                   "inputs": {"family": "sdxl", "seed": 0, "prediction": "eps"}},
        "ImageScale": {"inputs": {"width": 64, "height": 64}},
        "PSOTrain": {"inputs": {"steps": 2, "learning_rate": 1e-2, "lora_rank": 4}},
    })
    comfy_server.run(graph, timeout=300)
    saved = comfy_server.base_dir / "models" / "loras" / "pso" / "preference_00001.safetensors"
    settings = json.loads(_lora_metadata(saved)["pso.settings"])
    assert settings["method"] == "pso_offline" and settings["settings"]["reference_refresh_every"] == 0


def test_pickapic_example_imports_trains_and_evaluates(comfy_server, object_info):
    """Follow the notes: a Pick-a-Pic parquet in input/pickapic, a reward in models/pso_rewards, group 4
    switched on; ties and broken rows are reported, the LoRA and the dataset are saved, and the
    evaluation compares the base and the trained model at each step count."""
    import tiny_rewards

    tiny_rewards.write_pickapic_parquet(comfy_server.base_dir / "input" / "pickapic" / "small.parquet")
    tiny_rewards.save_hpsv2(comfy_server.base_dir / "models" / "pso_rewards" / "HPS_v2_compressed.pt")
    wf = _load("pso_pickapic_offline")
    assert {n["mode"] for n in wf["nodes"] if n["type"] in ("PSOEvaluate", "PSORewardModelLoader")} == {2}
    for n in wf["nodes"]:
        n["mode"] = 0 if n["mode"] == 2 else n["mode"]
    graph = ui_to_api(wf, object_info, replace={
        "CheckpointLoaderSimple": {"class_type": "PSOTestTinyCheckpoint",
                                   "inputs": {"family": "sdxl", "seed": 0, "prediction": "eps"}},
        "PSOImportPreferencePairs": {"inputs": {"source": "pickapic/small.parquet", "size": 64}},
        "PSOTrain": {"inputs": {"steps": 2, "learning_rate": 1e-2, "lora_rank": 4}},
        "PSORewardModelLoader": {"inputs": {"kind": "hpsv2", "model_file": "HPS_v2_compressed.pt"}},
        "PSOEvaluate": {"inputs": {"width": 64, "height": 64, "steps": "1,2", "prompts": "a fox\na boat"}},
    })
    entry = comfy_server.run(graph, timeout=400)
    saved = comfy_server.base_dir / "models" / "loras" / "pso" / "pickapic_00001.safetensors"
    settings = json.loads(_lora_metadata(saved)["pso.settings"])
    assert settings["method"] == "pso_offline" and settings["settings"]["reference_refresh_every"] == 0
    dataset = comfy_server.base_dir / "output" / "pso_pairs" / "pickapic_turbo"
    manifest = json.loads((dataset / "manifest.json").read_text(encoding="utf-8"))
    assert [i["target_source"] for i in manifest["items"]] == ["uid0a", "uid2b", "uid6a"]
    texts = {graph[k]["_meta"]["title"]: v["text"][0] for k, v in entry["outputs"].items() if "text" in v}
    report = texts["Import report"]
    assert "7 row(s) read, 3 pair(s) kept, 4 skipped" in report
    assert "tie(s) (equal labels) skipped: row 1" in report
    rows = texts["Evaluation table"].splitlines()[2:]
    assert [r.split("|")[1:3] for r in rows] == [[" SDXL-Turbo ", " 1 "], [" SDXL-Turbo ", " 2 "],
                                                [" + PSO LoRA (trained) ", " 1 "],
                                                [" + PSO LoRA (trained) ", " 2 "]]
    chart = _titled(entry, graph, "Save: evaluation chart")
    with Image.open(comfy_server.output_path(chart[0])) as img:
        assert img.width > 200 and len(img.convert("RGB").getcolors(1 << 16)) > 3, "a drawn chart"
