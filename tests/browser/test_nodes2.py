"""Nodes 2.0 (the frontend's Vue node renderer, setting ``Comfy.VueNodes.Enabled``) with the pinned
and the newest frontend: the training monitor and the pair picker render inside their nodes, keep
their size, and the node with the chart overlaps no other node in the shipped examples.

Nodes 2.0 lays nodes out as DOM elements (``[data-node-id]``) sized by their content rather than by
LiteGraph's ``node.size``, so what the LiteGraph-mode tests check (test_training_monitor.py) says
nothing about it. The setting is switched on through the frontend's own settings API for the test and
switched back after it (settings are stored by the server, which other tests share).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from browser_ui import example_workflow, load_workflow, node_ids, queue_prompt
from test_pair_picker import build_picker_graph, panel, wait_pair

pytestmark = [pytest.mark.browser, pytest.mark.server]

VUE_NODES = "Comfy.VueNodes.Enabled"
#: Smallest chart that still shows its four panels, in graph units (the LiteGraph-mode widget is
#: 320 x 150; Nodes 2.0 measured 316-382 x 138 with frontends 1.32.9 / 1.49.6 / 1.58.1).
MIN_CHART = (200, 100)

RECTS_JS = """([id, inner]) => {
    const rect = (el) => { const b = el.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
    const el = document.querySelector(`[data-node-id="${id}"]`);
    const innerEl = inner === "monitor" ? window.app.graph.getNodeById(id)?.psoMonitorView?.canvas
                                       : document.querySelector(inner);
    const others = [...document.querySelectorAll("[data-node-id]")]
        .filter((e) => e.dataset.nodeId !== String(id))
        .map((e) => [e.dataset.nodeId, rect(e)]);
    return {node: el ? rect(el) : null, inner: innerEl?.isConnected ? rect(innerEl) : null, others,
            scale: window.app.canvas.ds.scale};
}"""


def _set_vue_nodes(page, on: bool) -> None:
    page.evaluate("async ([id, on]) => { await window.app.extensionManager.setting.set(id, on); }",
                  [VUE_NODES, on])


@pytest.fixture()
def vue_page(comfy_page):
    before = comfy_page.evaluate("(id) => window.app.extensionManager.setting.get(id)", VUE_NODES)
    _set_vue_nodes(comfy_page, True)
    try:
        yield comfy_page
    finally:
        _set_vue_nodes(comfy_page, bool(before))


def _wait_vue_rendered(page) -> None:
    """Every graph node has its Nodes 2.0 element."""
    page.wait_for_function(
        """() => window.app.graph.nodes.length > 0 && window.app.graph.nodes.every(
               (n) => document.querySelector(`[data-node-id="${n.id}"]`))""", timeout=30_000, polling=100)


def _inside(inner, outer, tol=1.0) -> bool:
    return (inner[0] >= outer[0] - tol and inner[1] >= outer[1] - tol
            and inner[2] <= outer[2] + tol and inner[3] <= outer[3] + tol)


def _overlaps(a, b, tol=1.0) -> bool:
    return a[0] < b[2] - tol and b[0] < a[2] - tol and a[1] < b[3] - tol and b[1] < a[3] - tol


def _stable_rects(page, node_id: int, inner: str) -> dict:
    """The rects twice, 0.5 s apart (after the chart's redraws): they must not change."""
    first = page.evaluate(RECTS_JS, [node_id, inner])
    page.wait_for_timeout(500)
    second = page.evaluate(RECTS_JS, [node_id, inner])
    assert first["node"] == second["node"] and first["inner"] == second["inner"], (first, second)
    return second


EXAMPLES = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "example_workflows").glob("*.json"))
#: Space between stacked Nodes 2.0 elements, in graph units (their source badge is drawn inside).
VUE_GAP = 20


def _in_graph_units(rects: dict) -> list[tuple[str, list[float]]]:
    s = rects["scale"]
    return [(nid, [v / s for v in r]) for nid, r in [(None, rects["node"]), *rects["others"]]]


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_monitor_renders_in_its_node_and_no_nodes_overlap_with_nodes_2(vue_page, name, screenshot):
    page = vue_page
    load_workflow(page, example_workflow(name))
    _wait_vue_rendered(page)
    train_type = "PSOOnlineTrain" if name == "pso_online_preference" else "PSOTrain"
    (train_id,) = node_ids(page, train_type)
    rects = _stable_rects(page, train_id, "monitor")
    boxes = _in_graph_units({**rects, "others": [*rects["others"], (str(train_id), rects["node"])]})[1:]
    # same column (horizontal overlap) and less than VUE_GAP apart vertically (negative: overlapping)
    close = [(a, b) for i, (a, ra) in enumerate(boxes) for b, rb in boxes[i + 1:]
             if ra[0] < rb[2] - 1 and rb[0] < ra[2] - 1 and max(rb[1] - ra[3], ra[1] - rb[3]) < VUE_GAP - 1]
    assert close == [], f"Nodes 2.0 elements overlapping or closer than {VUE_GAP} in {name}: {close}"
    assert rects["node"] is not None, f"{train_type} has no Nodes 2.0 element"
    assert rects["inner"] is not None, "the monitor's canvas is not in the page"
    chart = rects["inner"]
    size = ((chart[2] - chart[0]) / rects["scale"], (chart[3] - chart[1]) / rects["scale"])
    assert size[0] >= MIN_CHART[0] and size[1] >= MIN_CHART[1], size
    assert _inside(chart, rects["node"]), (chart, rects["node"])
    hit = [(nid, r) for nid, r in rects["others"] if _overlaps(rects["node"], r)]
    assert hit == [], f"{train_type} at {rects['node']} overlaps nodes {hit} in {name}"
    screenshot(page, name)


def test_the_pair_picker_renders_in_its_node_and_takes_picks_with_nodes_2(vue_page, ui_server, screenshot):
    page = vue_page
    node_id = build_picker_graph(page, f"vue_{uuid.uuid4().hex[:8]}")
    _wait_vue_rendered(page)
    prompt_id = queue_prompt(page, ui_server)
    wait_pair(page, node_id, 0)
    rects = _stable_rects(page, node_id, panel(node_id))
    assert rects["node"] is not None and rects["inner"] is not None, rects
    assert _inside(rects["inner"], rects["node"]), (rects["inner"], rects["node"])
    images = page.evaluate(
        "(sel) => [...document.querySelectorAll(`${sel} img`)].map((i) => Math.min("
        "i.getBoundingClientRect().width, i.getBoundingClientRect().height) / window.app.canvas.ds.scale)",
        panel(node_id))
    assert len(images) == 2 and min(images) >= 128, images  # a size a person can judge
    screenshot(page, "picker")
    for pair in range(4):  # a click per pair: the panel works in Nodes 2.0, not only draws
        page.click(f"{panel(node_id)} .pso-picker-left")
        if pair < 3:
            wait_pair(page, node_id, pair + 1)
    entry = ui_server.wait(prompt_id, timeout=120)
    assert entry["status"]["status_str"] == "success", entry["status"]
    summary = entry["outputs"][str(node_id)]["text"][0]
    assert summary.startswith("4 pairs picked (4 left, 0 right)"), summary


SHOWN_LR_JS = """(id) => {
    const el = document.querySelector(`[data-node-id="${id}"] [aria-label="learning_rate"]`);
    const input = el && (el.tagName === "INPUT" ? el : el.querySelector("input"));
    const widget = window.app.graph.getNodeById(id).widgets.find((w) => w.name === "learning_rate");
    return {text: input ? input.value : null, value: widget.value};
}"""


@pytest.mark.parametrize(("name", "node_type"), [("pso_style_transfer", "PSOTrain"),
                                                 ("pso_online_preference", "PSOOnlineTrain")])
def test_small_learning_rates_show_their_digits_with_nodes_2(vue_page, name, node_type, screenshot):
    """A learning rate of 1e-4 / 1e-5 reads as that number, not "0" (frontend 1.32.9's number field
    shows at most 3 decimals unless told otherwise; web/pso_float_digits.js tells it)."""
    page = vue_page
    load_workflow(page, example_workflow(name))
    _wait_vue_rendered(page)
    (node_id,) = node_ids(page, node_type)
    shown = page.evaluate(SHOWN_LR_JS, node_id)
    assert shown["text"] is not None, f"no learning_rate field in {node_type}'s Nodes 2.0 element"
    assert 0 < shown["value"] < 1e-3, shown  # the example's value is one the old field showed as 0
    assert float(shown["text"].replace(",", "")) == pytest.approx(shown["value"], rel=1e-6), shown
    screenshot(page, f"lr_{name}")
