"""Errors a user can see before anything runs: a missing target folder, pair dataset or preference file,
and a beta of 0, are refused by the host's input validation when the prompt is queued (``POST /prompt``
answers with the node's error), so no reference is sampled and nothing is trained first.

The shipped style-transfer example is queued as the frontend sends it (``tools.workflow.ui_to_api``),
on the tiny checkpoint; only the value under test is changed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tools.graphs import adapt_to_host
from tools.workflow import ui_to_api

pytestmark = pytest.mark.server
EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
TINY = {"class_type": "PSOTestTinyCheckpoint", "inputs": {"family": "sdxl", "seed": 0, "prediction": "eps"}}


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


def _queue(server, graph: dict, object_info: dict) -> tuple[int, dict]:
    """POST /prompt as the frontend does; returns (status, answer) without raising."""
    return server.post_json("/prompt", {"prompt": adapt_to_host(graph, object_info),
                                        "client_id": server.client_id})


def _style(object_info, **replace) -> dict:
    wf = json.loads((EXAMPLES / "pso_style_transfer.json").read_text(encoding="utf-8"))
    return ui_to_api(wf, object_info, replace={"CheckpointLoaderSimple": TINY, **replace})


def _node_error(answer: dict, graph: dict, class_type: str) -> str:
    """The one error message the host reports for the node of ``class_type``; every output that
    depends on it (PSO Save LoRA, when there is one) is dropped. The host still runs outputs that do
    not depend on it (the example's "before" image): it answers 200 then, 400 when nothing is left."""
    (node_id,) = [k for k, v in graph.items() if v["class_type"] == class_type]
    assert set(answer["node_errors"]) == {node_id}, answer["node_errors"]
    save = [k for k, v in graph.items() if v["class_type"] in ("PSOSaveLoRA", "PSOSavePairs")]
    assert set(save) <= set(answer["node_errors"][node_id]["dependent_outputs"]), answer
    errors = answer["node_errors"][node_id]["errors"]
    assert [e["type"] for e in errors] == ["custom_validation_failed"], errors
    return errors[0]["details"]


def test_a_missing_target_folder_is_refused_when_queued(comfy_server, object_info):
    graph = _style(object_info, PSOTargetImagesFromFolder={"inputs": {"folder": "no_such_style"}})
    _, answer = _queue(comfy_server, graph, object_info)
    message = _node_error(answer, graph, "PSOTargetImagesFromFolder")
    assert "folder 'no_such_style' not found in ComfyUI's input folder" in message, message


def test_an_empty_target_folder_is_refused_when_queued(comfy_server, object_info):
    (comfy_server.base_dir / "input" / "empty_style").mkdir(parents=True, exist_ok=True)
    graph = _style(object_info, PSOTargetImagesFromFolder={"inputs": {"folder": "empty_style"}})
    _, answer = _queue(comfy_server, graph, object_info)
    assert "no images in" in _node_error(answer, graph, "PSOTargetImagesFromFolder")


def _one_image_folder(server, name: str) -> str:
    folder = server.base_dir / "input" / name
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (200, 40, 40)).save(folder / "a.png")
    (folder / "a.txt").write_text("a red square", encoding="utf-8")
    return name


def test_a_folder_created_after_start_up_validates(comfy_server, object_info):
    """The combo's option list was read when the server started; validation reads the disk."""
    _one_image_folder(comfy_server, "new_style_after_start")
    graph = _style(object_info, PSOTargetImagesFromFolder={"inputs": {"folder": "new_style_after_start",
                                                                      "size": 64}},
                   EmptyLatentImage={"inputs": {"width": 64, "height": 64}},
                   PSOTrain={"inputs": {"steps": 2, "lora_rank": 2}})
    status, answer = _queue(comfy_server, graph, object_info)
    assert status == 200 and not answer.get("node_errors"), answer
    entry = comfy_server.wait(answer["prompt_id"], timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_beta_zero_is_refused_when_queued(comfy_server, object_info):
    folder = _one_image_folder(comfy_server, "style_for_beta")
    graph = _style(object_info, PSOTrain={"inputs": {"beta": 0.0}},
                   PSOTargetImagesFromFolder={"inputs": {"folder": folder}})
    _, answer = _queue(comfy_server, graph, object_info)
    message = _node_error(answer, graph, "PSOTrain")
    assert "beta=0.0 is invalid" in message and "0 no longer means 'the paper's value'" in message, message


def test_a_missing_pair_dataset_is_refused_when_queued(comfy_server, object_info):
    graph = {"ckpt": {"class_type": "PSOTestTinyCheckpoint", "inputs": TINY["inputs"]},
             "load": {"class_type": "PSOLoadPairs",
                      "inputs": {"dataset": "never_saved", "model": ["ckpt", 0], "clip": ["ckpt", 1]}},
             "save": {"class_type": "PSOSavePairs", "inputs": {"pairs": ["load", 0], "name": "copy",
                                                               "append": False}}}
    status, answer = _queue(comfy_server, graph, object_info)
    assert status == 400, answer
    message = _node_error(answer, graph, "PSOLoadPairs")
    assert "dataset 'never_saved' not found in" in message and "PSO Save Pairs" in message, message


def test_a_missing_preference_file_is_refused_when_queued(comfy_server, object_info):
    wf = json.loads((EXAMPLES / "pso_pickapic_offline.json").read_text(encoding="utf-8"))
    graph = ui_to_api(wf, object_info, replace={
        "CheckpointLoaderSimple": TINY,
        "PSOImportPreferencePairs": {"inputs": {"source": "pickapic/missing.parquet"}}})
    _, answer = _queue(comfy_server, graph, object_info)
    message = _node_error(answer, graph, "PSOImportPreferencePairs")
    assert "source 'pickapic/missing.parquet' not found" in message, message
