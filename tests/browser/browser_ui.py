"""Helpers that drive the ComfyUI frontend in a Playwright page (both the pinned and the newest
frontend): load a workflow, edit nodes as a user would, queue, wait for the host.

Everything goes through the frontend's own objects (``window.app``, its graph and LiteGraph), so
what a test sees is what a user's browser runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "example_workflows"

#: The tiny SDXL-shaped test checkpoint that stands in for a real checkpoint loader.
TINY_CHECKPOINT = ("PSOTestTinyCheckpoint", {"family": "sdxl", "seed": 0, "prediction": "eps"})


def example_workflow(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.json").read_text(encoding="utf-8"))


def load_workflow(page, workflow: dict) -> None:
    """Load a UI-format workflow into the graph as opening the file would."""
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
    page.wait_for_function("(n) => window.app.graph.nodes.length >= n",
                           arg=sum(1 for n in workflow["nodes"]), timeout=30_000)


def node_ids(page, node_type: str) -> list[int]:
    return page.evaluate("(t) => window.app.graph.nodes.filter((n) => n.type === t).map((n) => n.id)",
                         node_type)


def set_widgets(page, node_type: str, values: dict) -> int:
    """Set widget values (by name) on every node of ``node_type``; returns how many nodes changed.
    Raises if a named widget does not exist (a test must not silently keep the old value)."""
    return page.evaluate(
        """([type, values]) => {
            const nodes = window.app.graph.nodes.filter((n) => n.type === type);
            for (const node of nodes) {
                for (const [name, value] of Object.entries(values)) {
                    const w = node.widgets?.find((x) => x.name === name);
                    if (!w) throw new Error(`${type} #${node.id} has no widget ${name}`);
                    w.value = value;
                    w.callback?.(value);
                }
            }
            return nodes.length;
        }""",
        [node_type, values])


def swap_node_type(page, old_type: str, new_type: str, widgets: dict | None = None) -> int:
    """Replace every ``old_type`` node by a new ``new_type`` node at its place, re-linking each output
    slot to the same inputs (the types must line up, as for the tiny checkpoint); returns the count."""
    return page.evaluate(
        """([oldType, newType, widgets]) => {
            const graph = window.app.graph;
            const olds = graph.nodes.filter((n) => n.type === oldType);
            for (const old of olds) {
                const node = LiteGraph.createNode(newType);
                if (!node) throw new Error(`node type ${newType} is not registered`);
                node.pos = [...old.pos];
                graph.add(node);
                for (const [name, value] of Object.entries(widgets ?? {})) {
                    const w = node.widgets?.find((x) => x.name === name);
                    if (!w) throw new Error(`${newType} has no widget ${name}`);
                    w.value = value;
                }
                const targets = [];
                (old.outputs ?? []).forEach((out, slot) => {
                    for (const id of out.links ?? []) {
                        const link = graph.links instanceof Map ? graph.links.get(id) : graph.links[id];
                        if (link) targets.push([slot, link.target_id, link.target_slot]);
                    }
                });
                graph.remove(old);
                for (const [slot, targetId, targetSlot] of targets) {
                    node.connect(slot, graph.getNodeById(targetId), targetSlot);
                }
            }
            graph.setDirtyCanvas(true, true);
            return olds.length;
        }""",
        [old_type, new_type, widgets or {}])


def use_tiny_checkpoint(page) -> None:
    """Swap the workflow's checkpoint loader for the tiny test checkpoint (no model files here)."""
    assert swap_node_type(page, "CheckpointLoaderSimple", TINY_CHECKPOINT[0], TINY_CHECKPOINT[1]) >= 1


def queue_prompt(page, server, timeout: float = 30) -> str:
    """Queue the graph through the frontend (``app.queuePrompt``, what the Queue/Run button calls)
    and return the prompt id the host gave it."""
    before = _known_prompt_ids(server)
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = _known_prompt_ids(server) - before
        if new:
            return new.pop()
        time.sleep(0.1)
    errors = "\n".join(getattr(page, "pso_errors", []))
    raise AssertionError(f"the frontend queued nothing; page errors:\n{errors}")


def _known_prompt_ids(server) -> set[str]:
    queue = server.get_json("/queue")
    ids = {item[1] for key in ("queue_running", "queue_pending") for item in queue.get(key, [])}
    return ids | set(server.get_json("/history?max_items=1000"))


def focus_node(page, node_id: int, scale: float = 1.0) -> None:
    """Centre the canvas on a node at ``scale`` (for screenshots a person can read)."""
    page.evaluate(
        """([id, scale]) => {
            const canvas = window.app.canvas;
            const node = window.app.graph.getNodeById(id);
            const ds = canvas.ds;
            ds.scale = scale;
            const [w, h] = [canvas.canvas.clientWidth, canvas.canvas.clientHeight];
            ds.offset[0] = w / (2 * scale) - (node.pos[0] + node.size[0] / 2);
            ds.offset[1] = h / (2 * scale) - (node.pos[1] + node.size[1] / 2);
            canvas.setDirty(true, true);
        }""",
        [node_id, scale])
    page.wait_for_timeout(200)
