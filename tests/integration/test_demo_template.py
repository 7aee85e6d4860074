"""The "PSO demo (digits, CPU)" template runs as it opens: PSO Demo Model and PSO Demo Targets wired in,
the demo's settings (``tools.demo.DEMO_SETTINGS``), nothing to create by hand.

- the shipped file is what ``python -m tools.demo_template`` builds from the style example and the
  demo's current settings (so it cannot drift from ``tools/demo.py``);
- the shipped targets are the demo's bold digits and striped shapes (``tools.demo.write_targets``), each
  with its caption;
- queued unchanged on a fresh host (no input folder, no model file), it trains, saves the LoRA and the
  before/after images, and the trained model draws more ink than the original (the bold style).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tools import demo_template
from tools.workflow import check_workflow, ui_to_api

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


def _shipped() -> dict:
    return json.loads(demo_template.TEMPLATE.read_text(encoding="utf-8"))


def test_the_template_is_built_from_the_style_example_and_the_demos_settings(object_info):
    built = demo_template.dumps(demo_template.build(object_info))
    assert built == demo_template.TEMPLATE.read_text(encoding="utf-8"), (
        "example_workflows/pso_demo_digits_cpu.json is stale: run python -m tools.demo_template")
    wf = _shipped()
    assert check_workflow(wf, object_info, [("PSOLoraLoader", "lora_name")]) == []
    types = {n["type"] for n in wf["nodes"] if n.get("mode", 0) == 0}
    assert {"PSODemoModelLoader", "PSODemoTargets", "PSOTrain", "PSOSaveLoRA"} <= types
    assert not types & {"CheckpointLoaderSimple", "PSOTargetImagesFromFolder", "LoadImage"}, types
    assert "id" not in wf, "a fixed workflow id would show one copy's training chart in another"


@pytest.mark.parametrize("model, count", [("digits", 80), ("shapes", 96)])
def test_the_shipped_targets_are_the_demos_targets(tmp_path, model, count):
    """The shipped bold digits and striped shapes are what ``tools.demo.write_targets`` writes (images
    and captions), so the demo script and the shipped nodes train on the same targets."""
    pytest.importorskip("sklearn")
    from tools.demo import TASKS, write_targets

    write_targets(tmp_path, task=TASKS[model])
    folder = demo_template.TARGETS_DIR if model == "digits" else demo_template.SHAPE_TARGETS_DIR
    shipped = sorted(p.name for p in folder.iterdir())
    assert shipped == sorted(p.name for p in tmp_path.iterdir()) and len(shipped) == count
    for name in shipped:
        a, b = folder / name, tmp_path / name
        if name.endswith(".txt"):
            assert a.read_text(encoding="utf-8") == b.read_text(encoding="utf-8")
        else:
            assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), name


def _ink(server, info: dict) -> float:
    return float(np.asarray(Image.open(server.output_path(info)).convert("L"), dtype=np.float32).mean())


def _run(server, object_info, replace=None) -> tuple[dict, dict]:
    graph = ui_to_api(_shipped(), object_info, replace=replace)
    entry = server.run(graph, timeout=900)
    assert entry["status"]["status_str"] == "success", entry["status"]
    titled = {graph[k]["_meta"]["title"]: v for k, v in entry["outputs"].items()}
    return graph, titled


def test_the_template_runs_on_a_fresh_host_with_nothing_prepared(comfy_server, object_info):
    """The template with only its training budget cut (8 of its steps, for the suite's time): the targets,
    model and every path exist on a host where nobody created a folder or downloaded a file."""
    loras = comfy_server.base_dir / "models" / "loras" / "pso_demo"
    before_run = set(loras.glob("digits_*.safetensors")) if loras.is_dir() else set()
    _, titled = _run(comfy_server, object_info, {"PSOTrain": {"inputs": {"steps": 8}}})
    assert len(set(loras.glob("digits_*.safetensors")) - before_run) == 1, "PSO Save LoRA wrote one LoRA"
    assert len(titled["Preview: target images"]["images"]) == 40
    assert len(titled["Save: before (original model)"]["images"]) == 4
    assert len(titled["Save: after (PSO-trained model)"]["images"]) == 4


@pytest.mark.slow
def test_the_template_runs_as_it_opens_and_draws_bolder_digits(comfy_server, object_info):
    """Unchanged, as the frontend sends it (197 s on the shared 2-core machine)."""
    _, titled = _run(comfy_server, object_info)
    before = titled["Save: before (original model)"]["images"]
    after = titled["Save: after (PSO-trained model)"]["images"]
    ink_before = np.mean([_ink(comfy_server, i) for i in before])
    ink_after = np.mean([_ink(comfy_server, i) for i in after])
    assert ink_after > ink_before * 1.05, (ink_before, ink_after)  # bolder strokes


# -- the picker -> train example -------------------------------------------------------------------

def test_the_pick_and_train_example_is_built_by_the_tool_with_the_preference_beta(object_info,
                                                                                 comfy_inprocess):
    from extension_loader import load_package

    load_package()
    import importlib

    train_settings = importlib.import_module("comfyui-pso.pso.train_settings")
    assert demo_template.BETA_PREFERENCE_PAIRS == train_settings.BETA_PREFERENCE_PAIRS
    built = demo_template.dumps(demo_template.build_pick_and_train(object_info))
    assert built == demo_template.PICK_TEMPLATE.read_text(encoding="utf-8"), (
        "example_workflows/pso_pick_and_train.json is stale: run python -m tools.demo_template")
    assert check_workflow(json.loads(built), object_info) == []


def test_the_pick_and_train_example_trains_on_the_pairs_picked_in_it(comfy_server, object_info):
    """As the notes say: queue, pick every pair, and PSO Train trains on the picks (refresh 0)."""
    from test_pair_picker_routes import pick, wait_session

    wf = json.loads(demo_template.PICK_TEMPLATE.read_text(encoding="utf-8"))
    (picker,) = [str(n["id"]) for n in wf["nodes"] if n["type"] == "PSOPickPairs"]
    graph = ui_to_api(wf, object_info, replace={
        "PSOPickPairs": {"inputs": {"dataset_name": "demo_picks_test"}},
        "PSOTrain": {"inputs": {"steps": 4}}})
    settings = next(v for v in graph.values() if v["class_type"] == "PSOTrain")["inputs"]
    assert settings["reference_refresh_every"] == 0
    assert settings["beta"] == demo_template.BETA_PREFERENCE_PAIRS
    prompt_id = comfy_server.queue(graph)
    state = wait_session(comfy_server, node=picker)
    assert state["total"] == 8
    for i in range(state["total"]):
        status, answer = pick(comfy_server, state["session"], i, "left" if i % 3 else "right")
        assert status == 200, answer
    entry = comfy_server.wait(prompt_id, timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = comfy_server.base_dir / "models" / "loras" / "pso_demo"
    assert list(saved.glob("picked_*.safetensors")), "PSO Save LoRA wrote the LoRA trained on the picks"


def test_the_shapes_demo_measures_the_drawings_the_model_was_trained_on():
    """The shapes demo's metrics read 32 px images as the 16 px drawings they were made from (2x2 means
    undo the 2x2 pixels of the model's rendering, up to the PNG's 8 bits), so the judge sees real targets
    as it was trained on them."""
    from bench.digits import shapes
    from tools.demo import to_shapes16
    from tools.train_demo_model import render_shapes

    x16 = shapes.load_splits("striped_fixed", seed=0).target_test_x[:32]
    rgb = (render_shapes(x16).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    back = to_shapes16(rgb)
    assert back.shape == x16.shape
    assert (back - x16).abs().max().item() < 1 / 255 + 1e-6
