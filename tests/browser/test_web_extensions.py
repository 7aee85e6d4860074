"""PSO.Appearance and PSO.SeedControl in the real frontend (pinned and newest): they act on this
extension's nodes only, and a saved workflow keeps what it stored."""

from __future__ import annotations

import pytest
from browser_ui import example_workflow, load_workflow

pytestmark = [pytest.mark.browser, pytest.mark.server]

PSO_COLOR, PSO_BGCOLOR = "#1f3b33", "#24463c"


def _created(page, node_type: str) -> dict:
    return page.evaluate(
        """(t) => {
            const node = LiteGraph.createNode(t);
            window.app.graph.add(node);
            const control = node.widgets?.find((w) => w.name === "control_after_generate");
            return {color: node.color ?? null, bgcolor: node.bgcolor ?? null,
                    control: control?.value ?? null};
        }""",
        node_type)


def test_new_pso_nodes_get_the_colour_and_a_fixed_seed(comfy_page, ui_server, screenshot):
    train = _created(comfy_page, "PSOTrain")
    assert (train["color"], train["bgcolor"]) == (PSO_COLOR, PSO_BGCOLOR)
    assert train["control"] == "fixed"
    sample = _created(comfy_page, "PSOSampleReferences")
    assert sample["control"] == "fixed" and sample["color"] == PSO_COLOR
    assert _created(comfy_page, "PSOFewStepSigmas")["color"] == PSO_COLOR  # coloured, has no seed
    ksampler = _created(comfy_page, "KSampler")  # not ours: untouched
    assert ksampler["color"] != PSO_COLOR and ksampler["bgcolor"] != PSO_BGCOLOR
    assert ksampler["control"] == "randomize"
    screenshot(comfy_page, "created-nodes")
    assert not [e for e in comfy_page.pso_errors if "pso" in e.lower()], comfy_page.pso_errors


def test_a_saved_workflow_keeps_its_seed_control_and_colours(comfy_page):
    wf = example_workflow("pso_style_transfer")
    train = next(n for n in wf["nodes"] if n["type"] == "PSOTrain")
    seed_at = next(i for i, v in enumerate(train["widgets_values"]) if v in ("fixed", "randomize"))
    train["widgets_values"][seed_at] = "randomize"
    train["color"] = "#332211"
    load_workflow(comfy_page, wf)
    state = comfy_page.evaluate(
        """(id) => {
            const node = window.app.graph.getNodeById(id);
            return [node.widgets.find((w) => w.name === "control_after_generate").value, node.color];
        }""",
        train["id"])
    assert state == ["randomize", "#332211"]
