"""PSO Pick Pairs in the real frontend (pinned and newest): a person labels a session with clicks and
keyboard shortcuts, reloads the page midway, and the pair dataset on disk holds exactly the picks.

Screenshots go to artifacts/browser/ (first pair shown, after the reload, session finished).
"""

from __future__ import annotations

import json
import uuid

import pytest
from browser_ui import queue_prompt

from pso import picking
from pso.dataset import PairDataset

pytestmark = [pytest.mark.browser, pytest.mark.server]

PROMPTS = ["a red square", "a blue circle"]
SEED = 40


def build_picker_graph(page, dataset: str) -> int:
    """Tiny checkpoint -> DMD2 sigmas + lcm -> PSO Pick Pairs, made with the frontend's own node
    classes as a user would place them; returns the picker node's id (on screen, scale 1)."""
    return page.evaluate(
        """([dataset, prompts, seed]) => {
            const graph = window.app.graph;
            graph.clear();
            const add = (type, pos, widgets) => {
                const node = LiteGraph.createNode(type);
                if (!node) throw new Error(`node type ${type} is not registered`);
                node.pos = pos;
                graph.add(node);
                for (const [name, value] of Object.entries(widgets ?? {})) {
                    const w = node.widgets?.find((x) => x.name === name);
                    if (!w) throw new Error(`${type} has no widget ${name}`);
                    w.value = value;
                }
                return node;
            };
            const ckpt = add("PSOTestTinyCheckpoint", [20, 40], {family: "sd15", seed: 0, prediction: "eps"});
            const sigmas = add("PSOFewStepSigmas", [20, 260], {schedule: "dmd2"});
            const sampler = add("KSamplerSelect", [20, 420], {sampler_name: "lcm"});
            const pick = add("PSOPickPairs", [420, 40], {prompts, seed, pairs_per_prompt: 2, width: 64,
                                                       height: 64, dataset_name: dataset});
            ckpt.connect(0, sigmas, 0);
            ckpt.connect(0, pick, 0);
            ckpt.connect(1, pick, 1);
            ckpt.connect(2, pick, 2);
            sampler.connect(0, pick, 3);
            sigmas.connect(0, pick, 4);
            pick.setSize([560, 720]);
            window.app.canvas.ds.offset = [0, 0];
            window.app.canvas.ds.scale = 1;
            window.app.canvas.setDirty(true, true);
            return pick.id;
        }""",
        [dataset, "\n".join(PROMPTS), SEED])


def wait_for_picker_frontend(page, timeout_ms: int = 90_000) -> None:
    """The frontend is up with a graph and this extension's PSO.PairPicker loaded."""
    page.wait_for_function(
        """() => window.app?.graph && window.app.canvas
                 && globalThis.LiteGraph?.registered_node_types?.PSOPickPairs
                 && (!window.app.extensionManager?.workflow
                     || window.app.extensionManager.workflow.activeWorkflow)
                 && (window.app.extensions ?? []).some((e) => e.name === "PSO.PairPicker")""",
        timeout=timeout_ms)


def panel(node_id: int) -> str:
    return f'.pso-picker[data-node="{node_id}"]'


def wait_pair(page, node_id: int, index: int, timeout_ms: int = 120_000) -> None:
    """Wait until the panel shows pair ``index`` with both previews loaded."""
    page.wait_for_function(
        """([sel, index]) => {
            const root = document.querySelector(sel);
            if (!root || root.dataset.pair !== String(index) || root.dataset.busy === "1") return false;
            const imgs = [...root.querySelectorAll("img")];
            return imgs.length === 2 && imgs.every((img) => img.complete && img.naturalWidth > 0);
        }""",
        arg=[panel(node_id), index], timeout=timeout_ms)


def progress(page, node_id: int) -> str:
    return page.inner_text(f"{panel(node_id)} .pso-picker-progress")


def test_label_a_session_with_clicks_and_keys_then_the_dataset_holds_the_picks(
        comfy_page, ui_server, screenshot):
    page = comfy_page
    dataset = f"browser_{uuid.uuid4().hex[:8]}"
    node_id = build_picker_graph(page, dataset)
    idle = page.evaluate("""(sel) => { const r = document.querySelector(sel);
        return {hint: r.querySelector('.pso-picker-hint').textContent,
                disabled: [...r.querySelectorAll('button')].map((b) => b.disabled)}; }""", panel(node_id))
    assert idle["disabled"] == [True, True], "Tie and Skip look disabled while no session is open"
    assert idle["hint"].startswith("Queue the graph"), idle
    prompt_id = queue_prompt(page, ui_server)
    wait_pair(page, node_id, 0)
    assert page.inner_text(f"{panel(node_id)} .pso-picker-hint").startswith("Click the better image")
    assert progress(page, node_id) == "0 / 4"
    assert page.inner_text(f"{panel(node_id)} .pso-picker-prompt") == PROMPTS[0]
    screenshot(page, "first-pair")

    page.click(f"{panel(node_id)} .pso-picker-left")  # pair 0: the left image, by a click
    wait_pair(page, node_id, 1)
    folder = ui_server.base_dir / "output" / "pso_pairs" / dataset
    assert len(PairDataset.open(folder)) == 1  # on disk before the next pair is shown

    page.reload(wait_until="domcontentloaded")  # the page is closed and opened again mid-session
    wait_for_picker_frontend(page)
    wait_pair(page, node_id, 1)  # restored from GET /pso/picker/sessions + /pso/picker/session/<id>
    assert progress(page, node_id) == "1 / 4"
    screenshot(page, "after-reload")

    page.hover(f"{panel(node_id)} .pso-picker-row")
    page.keyboard.press("2")  # pair 1: the right image, by the keyboard shortcut
    wait_pair(page, node_id, 2)
    page.click(f"{panel(node_id)} .pso-picker-tie")  # pair 2: tie
    wait_pair(page, node_id, 3)
    page.keyboard.press("ArrowLeft")  # pair 3: left, by the arrow key (pointer still over the panel)

    entry = ui_server.wait(prompt_id, timeout=120)
    assert entry["status"]["status_str"] == "success", entry["status"]
    page.wait_for_function("(sel) => document.querySelector(sel)?.dataset.pair === ''", arg=panel(node_id))
    assert progress(page, node_id) == "4 / 4"
    # the session's end says where the picks went, and stays said (the last pick's answer may arrive
    # after the close event: the newer state wins)
    closed = f"closed: 4/4 saved to output/pso_pairs/{dataset}"
    page.wait_for_function("([sel, text]) => document.querySelector(`${sel} .pso-picker-prompt`)"
                           ".textContent === text", arg=[panel(node_id), closed])
    page.wait_for_timeout(500)
    assert page.inner_text(f"{panel(node_id)} .pso-picker-prompt") == closed
    assert page.evaluate("(sel) => [...document.querySelectorAll(`${sel} button`)].every((b) => b.disabled)",
                         panel(node_id))
    screenshot(page, "finished")

    ds = PairDataset.open(folder)
    seeds = [(SEED + 2 * i, SEED + 2 * i + 1) for i in range(4)]

    def shown(i, side):  # (preferred, other) seed of pair i when its screen side is clicked
        win = picking.preferred_sample(side, picking.shown_swapped(seeds[i]))
        return f"seed {seeds[i][win]}", f"seed {seeds[i][1 - win]}"

    assert [(r.prompt, r.target_source, r.reference_source) for r in ds.records] == [
        (PROMPTS[0], *shown(0, "left")), (PROMPTS[0], *shown(1, "right")),
        (PROMPTS[1], *shown(3, "left")),  # the tie is absent
    ]
    items = ds.get(list(range(len(ds))))
    assert items["target_traj"].final.equal(items["target"])
    assert not items["target"].equal(items["reference"])
    picks = json.loads((folder / "picks.json").read_text())["decisions"]
    assert [(d["seeds"], d["choice"]) for d in picks] == [
        ([40, 41], "left"), ([42, 43], "right"), ([44, 45], "tie"), ([46, 47], "left")]
    summary = entry["outputs"][str(node_id)]["text"][0]
    assert summary.startswith("3 pairs picked (2 left, 1 right), 1 ties, 0 skipped of 4"), summary
    markers = ("PairPicker", "pso_pair_picker", "/pso/picker")
    ours = [e for e in page.pso_errors if any(k in e for k in markers)]
    assert not ours, ours
    # keys were pressed with the node selected or hovered: no deprecated selected_nodes lookups
    assert not [w for w in page.pso_warnings if "selected_nodes" in w or "PSO." in w], page.pso_warnings
