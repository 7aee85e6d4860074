"""A newcomer's first minutes in the real frontend (pinned and newest), LiteGraph mode:

- the demo template, fetched from the pack's template route as the template browser does, runs with
  nothing prepared: PSO Save LoRA then shows the saved file's name in the node and PSO Train its
  one-line summary under the chart;
- switched to the shapes demo model and its striped targets (two widgets), the same template runs;
- a missing target folder is reported by the host's validation when Run is pressed, on the node,
  before anything runs;
- every shipped example is laid out without overlaps (title bars included), with >= 80 units between
  stacked nodes and no node over a group's title;
- loading the examples and working the picker's keys log no warning from this extension (e.g.
  LiteGraph's deprecated ``selected_nodes``).

Screenshots in artifacts/browser/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from browser_ui import (
    example_workflow,
    focus_node,
    load_workflow,
    node_ids,
    queue_prompt,
    set_widgets,
    use_tiny_checkpoint,
)

pytestmark = [pytest.mark.browser, pytest.mark.server]

EXAMPLES = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "example_workflows").glob("*.json"))
PACK = "comfyui-pso"
GAP = 80  # between stacked nodes: LiteGraph draws the source badge above a node's title
GROUP_TITLE = 40  # a group's title band

#: Node boxes (title bar included) and group bands in graph units, as LiteGraph draws them.
LAYOUT_JS = """() => {
    const g = window.app.graph, title = LiteGraph.NODE_TITLE_HEIGHT;
    const nodes = g.nodes.map((n) => ({id: n.id, type: n.type,
        box: [n.pos[0], n.pos[1] - title, n.pos[0] + n.size[0], n.pos[1] + n.size[1]]}));
    const groups = (g.groups ?? []).map((x) => { const b = x._bounding ?? x.bounding;
        return {title: x.title, box: [b[0], b[1], b[0] + b[2], b[1] + b[3]]}; });
    return {nodes, groups};
}"""


def layout_problems(layout: dict, gap: float = GAP) -> list[str]:
    """Overlapping nodes, stacked nodes closer than ``gap``, nodes over a group's title band."""
    out = []
    nodes = layout["nodes"]
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            (ax0, ay0, ax1, _), (bx0, by0, bx1, _) = a["box"], b["box"]
            if ax0 < bx1 - 1 and bx0 < ax1 - 1:  # same column
                upper, lower = (a, b) if ay0 <= by0 else (b, a)
                space = lower["box"][1] - upper["box"][3]
                if space < gap - 1:
                    out.append(f"{upper['id']} {upper['type']} and {lower['id']} {lower['type']}: "
                               f"{space:.0f} apart")
    for grp in layout["groups"]:
        x0, y0, x1, _ = grp["box"]
        for n in nodes:
            nx0, ny0, nx1, ny1 = n["box"]
            if nx0 < x1 and x0 < nx1 and ny0 < y0 + GROUP_TITLE and ny1 > y0:
                out.append(f"{n['id']} {n['type']} covers the title of group {grp['title']!r}")
    return out


def test_every_example_is_tidy(comfy_page, screenshot):
    problems = {}
    for name in EXAMPLES:
        load_workflow(comfy_page, example_workflow(name))
        found = layout_problems(comfy_page.evaluate(LAYOUT_JS))
        if found:
            problems[name] = found
    assert problems == {}, problems
    ours = [w for w in comfy_page.pso_warnings if "pso_" in w or "PSO." in w or "selected_nodes" in w]
    assert ours == [], ours


def test_the_demo_template_runs_and_shows_its_results_in_the_nodes(comfy_page, ui_server, screenshot):
    page = comfy_page
    wf = page.evaluate("async (url) => (await fetch(url)).json()",
                       f"/api/workflow_templates/{PACK}/pso_demo_digits_cpu.json")
    assert page.evaluate("async (url) => (await fetch(url)).status",
                         f"/api/workflow_templates/{PACK}/pso_demo_digits_cpu.jpg") == 200
    load_workflow(page, wf)
    set_widgets(page, "PSOTrain", {"steps": 6})  # the suite's time (the whole budget: a --run-slow test)
    (train_id,), (save_id,) = node_ids(page, "PSOTrain"), node_ids(page, "PSOSaveLoRA")
    assert page.evaluate("(id) => window.app.graph.getNodeById(id).psoResult.textContent",
                         save_id).startswith("Runs when queued")
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    page.wait_for_function(
        "(id) => window.app.graph.getNodeById(id).psoResult.textContent.startsWith('saved ')",
        arg=save_id, timeout=300_000, polling=250)
    saved = page.evaluate("(id) => window.app.graph.getNodeById(id).psoResult.textContent", save_id)
    assert saved.startswith("saved pso_demo/digits_") and ".safetensors" in saved, saved
    name = saved.split()[1]
    assert (ui_server.base_dir / "models" / "loras" / name).is_file(), name
    page.wait_for_function("(id) => window.app.graph.getNodeById(id).psoMonitor.summary", arg=train_id)
    status = page.evaluate("(id) => window.app.graph.getNodeById(id).psoMonitorView.status.textContent",
                           train_id)
    assert status.startswith("pso_offline: 6 steps · final loss"), status
    focus_node(page, train_id, 1.0)
    screenshot(page, "demo-trained")
    # the template opened again is a new workflow: its chart does not show the run above
    load_workflow(page, wf)
    page.wait_for_timeout(1500)  # the history lookup after the graph is configured
    fresh = page.evaluate("(id) => window.app.graph.getNodeById(id).psoMonitor", train_id)
    assert fresh["prompt_id"] is None and fresh["points"] == [], fresh
    assert not [e for e in page.pso_errors if "pso_" in e or "PSO." in e], page.pso_errors


def test_the_demo_template_switched_to_the_shapes_model_runs(comfy_page, ui_server, screenshot):
    """What the README and the template's note tell a newcomer to do for pictures they can judge: choose
    `shapes` in PSO Demo Model, `striped shapes` in PSO Demo Targets and a shapes prompt; the same graph
    then trains on the striped shapes and saves its LoRA."""
    page = comfy_page
    load_workflow(page, example_workflow("pso_demo_digits_cpu"))
    assert set_widgets(page, "PSODemoModelLoader", {"model": "shapes"}) == 1
    assert set_widgets(page, "PSODemoTargets", {"targets": "striped shapes"}) == 1
    set_widgets(page, "CLIPTextEncode", {"text": "a blue square"})
    set_widgets(page, "PSOTrain", {"steps": 6})
    (train_id,), (save_id,) = node_ids(page, "PSOTrain"), node_ids(page, "PSOSaveLoRA")
    (targets_id,) = node_ids(page, "PSODemoTargets")
    prompt_id = queue_prompt(page, ui_server)
    entry = ui_server.wait(prompt_id, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    sent = {v["class_type"]: v["inputs"] for v in entry["prompt"][2].values()}
    assert sent["PSODemoModelLoader"] == {"model": "shapes"}
    assert sent["PSODemoTargets"]["targets"] == "striped shapes"
    # the run's preview of the targets: the 48 shipped striped shapes, not the 40 digits
    (preview_id,) = node_ids(page, "PreviewImage")
    assert len(entry["outputs"][str(preview_id)]["images"]) == 48
    page.wait_for_function(
        "(id) => window.app.graph.getNodeById(id).psoResult.textContent.startsWith('saved ')",
        arg=save_id, timeout=60_000, polling=250)
    page.wait_for_function("(id) => window.app.graph.getNodeById(id).psoMonitor.summary", arg=train_id)
    summary = page.evaluate("(id) => window.app.graph.getNodeById(id).psoMonitor.summary", train_id)
    assert summary.startswith("pso_offline: 6 steps · final loss"), summary
    focus_node(page, targets_id, 1.0)
    screenshot(page, "shapes-targets")
    assert not [e for e in page.pso_errors if "pso_" in e or "PSO." in e], page.pso_errors


def test_a_missing_target_folder_is_shown_on_the_node_when_run_is_pressed(comfy_page, ui_server, screenshot):
    page = comfy_page
    load_workflow(page, example_workflow("pso_style_transfer"))
    use_tiny_checkpoint(page)
    set_widgets(page, "PSOTargetImagesFromFolder", {"folder": "my_style_not_created_yet"})
    set_widgets(page, "EmptyLatentImage", {"width": 64, "height": 64})  # the branch that still runs
    (folder_id,) = node_ids(page, "PSOTargetImagesFromFolder")
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    page.wait_for_function("(id) => window.app.lastNodeErrors?.[String(id)]", arg=folder_id, timeout=30_000)
    errors = page.evaluate("(id) => window.app.lastNodeErrors[String(id)].errors", folder_id)
    assert "folder 'my_style_not_created_yet' not found in ComfyUI's input folder" in errors[0]["details"]
    # the frontend only outlines the node: the extension's toast says why, where a person looks
    toast = page.get_by_text("PSO Target Images (folder) (#", exact=False).filter(has_text="did not run")
    toast.first.wait_for(timeout=15_000)
    assert "my_style_not_created_yet" in page.inner_text("body")
    focus_node(page, folder_id, 1.0)
    screenshot(page, "missing-folder")
