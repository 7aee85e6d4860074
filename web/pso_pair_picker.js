// PSO.PairPicker: the labelling panel of "PSO Pick Pairs" nodes.
// While the node runs, the host sends a `pso.picker` event with the session's pairs (two preview
// images each); this panel shows the first undecided pair side by side and posts every decision to
// POST /pso/picker/pick, which writes it to the pair dataset before answering. Keys (only while a
// session waits for a decision, with the node selected or the pointer over the panel): 1 or Left
// arrow = left, 2 or Right arrow = right, T = tie, S = skip. After the last pick the panel says
// where the picks went ("closed: n/n saved to output/pso_pairs/<name>"). A reloaded page asks
// /pso/picker/sessions and /pso/picker/session/<id> for the open sessions. Scoped to PSOPickPairs
// nodes (found from the root graph, also inside subgraphs); every wrapped hook is chained.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "PSOPickPairs";
const EVENT = "pso.picker";
const KEYS = { "1": "left", ArrowLeft: "left", "2": "right", ArrowRight: "right", t: "tie", T: "tie", s: "skip", S: "skip" };
const MIN_HEIGHT = 300;
// Each image at least this tall in any renderer (Nodes 2.0 sizes the panel by its content).
const MIN_IMAGE = 140;

const STYLE = `
.pso-picker { display: flex; flex-direction: column; gap: 6px; padding: 4px; box-sizing: border-box;
  width: 100%; height: 100%; font: 12px sans-serif; color: #ddd; }
.pso-picker-head { display: flex; justify-content: space-between; gap: 8px; }
.pso-picker-prompt { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; opacity: 0.85; }
.pso-picker-row { display: flex; gap: 6px; flex: 1; min-height: ${MIN_IMAGE + 24}px; }
.pso-picker-side { flex: 1; display: flex; flex-direction: column; align-items: center; gap: 2px;
  border: 2px solid #444; border-radius: 4px; background: #111; cursor: pointer; padding: 2px; min-width: 0; }
.pso-picker-side:hover { border-color: #7fbf9f; }
.pso-picker-side img { width: 100%; max-height: 100%; flex: 1; min-height: ${MIN_IMAGE}px; object-fit: contain;
  image-rendering: pixelated; }
.pso-picker-buttons { display: flex; gap: 6px; }
.pso-picker-buttons button { flex: 1; }
.pso-picker-status { min-height: 1.2em; }
.pso-picker-hint { opacity: 0.7; font-size: 11px; }
.pso-picker-buttons button:disabled { opacity: 0.4; cursor: default; }
.pso-picker-status.error { color: #ff8a80; }
.pso-picker[data-busy="1"] .pso-picker-side, .pso-picker[data-busy="1"] button { opacity: 0.5; pointer-events: none; }
`;

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

/** The panel of one node: DOM, current session state, and the decision it is waiting for. */
class PickerPanel {
  constructor(node) {
    this.node = node;
    this.state = null;
    this.busy = false;
    this.hovered = false;
    this.progress = el("span", { class: "pso-picker-progress", text: "idle" });
    this.prompt = el("span", { class: "pso-picker-prompt" });
    this.images = ["left", "right"].map((side, i) => {
      const img = el("img", { alt: `${side} sample`, draggable: "false" });
      const box = el("div", { class: `pso-picker-side pso-picker-${side}`, "data-choice": side,
                              title: `${side} is better (${i + 1} / ${side === "left" ? "←" : "→"})` },
                     [img, el("span", { text: `${i + 1} / ${side === "left" ? "←" : "→"}` })]);
      box.addEventListener("click", () => this.pick(side));
      return { box, img };
    });
    this.buttons = ["tie", "skip"].map((choice) => {
      const b = el("button", { class: `pso-picker-${choice}`, "data-choice": choice, type: "button",
                               text: `${choice === "tie" ? "Tie" : "Skip"} (${choice[0].toUpperCase()})` });
      b.addEventListener("click", () => this.pick(choice));
      return b;
    });
    this.hint = el("div", { class: "pso-picker-hint" });
    this.status = el("div", { class: "pso-picker-status" });
    this.root = el("div", { class: "pso-picker" }, [
      el("div", { class: "pso-picker-head" }, [this.prompt, this.progress]),
      el("div", { class: "pso-picker-row" }, this.images.map((x) => x.box)),
      el("div", { class: "pso-picker-buttons" }, this.buttons),
      this.hint,
      this.status,
    ]);
    this.root.addEventListener("pointerenter", () => { this.hovered = true; });
    this.root.addEventListener("pointerleave", () => { this.hovered = false; });
    this.render();
  }

  get current() {
    return this.state?.open ? this.state.pairs.find((p) => p.choice === null) ?? null : null;
  }

  /** Take a session state unless it is older than the one shown (same session, lower version). */
  setState(state) {
    const old = this.state;
    if (old && state.session === old.session && (state.version ?? 0) < (old.version ?? 0)) return;
    if (!old || state.session !== old.session) this.showStatus(""); // a new session: clear the old line
    this.state = state;
    this.render();
  }

  render() {
    const s = this.state;
    const pair = this.current;
    this.root.dataset.node = String(this.node.id); // ids are given when the node joins a graph
    this.root.dataset.session = s?.session ?? "";
    this.root.dataset.pair = pair ? String(pair.index) : "";
    this.root.dataset.busy = this.busy ? "1" : "0";
    if (!s) {
      this.progress.textContent = "idle";
      this.prompt.textContent = "Queue the graph to label pairs.";
    } else {
      this.progress.textContent = `${s.decided} / ${s.total}`;
      const where = s.folder ?? `output/pso_pairs/${s.dataset}`;
      const closed = `closed: ${s.decided}/${s.total} saved to ${where}`;
      this.prompt.textContent = pair ? pair.prompt : s.open ? "All pairs decided: saving…" : closed;
    }
    this.hint.textContent = pair
      ? "Click the better image (keys 1 / ← or 2 / →); T = tie, S = skip."
      : "Queue the graph: pairs of your model's samples appear here to compare.";
    for (const b of this.buttons) b.disabled = !pair || this.busy;
    this.images.forEach(({ box, img }, i) => {
      const url = pair ? api.apiURL(i === 0 ? pair.left : pair.right) : "";
      if (img.getAttribute("src") !== url) {
        if (url) img.setAttribute("src", url);
        else img.removeAttribute("src");
      }
      box.style.visibility = pair ? "visible" : "hidden";
    });
    this.node.setDirtyCanvas?.(true, false);
  }

  showStatus(text, error = false) {
    this.status.textContent = text;
    this.status.classList.toggle("error", error);
  }

  async pick(choice) {
    const pair = this.current;
    if (!pair || this.busy) return false;
    this.busy = true;
    this.render();
    try {
      const response = await api.fetchApi("/pso/picker/pick", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ session: this.state.session, pair: pair.index, choice }),
      });
      const answer = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
      if (!response.ok) {
        this.showStatus(`Not recorded: ${answer.error ?? response.status}`, true);
        return false;
      }
      this.showStatus(`Pair ${pair.index + 1}: ${choice} saved.`);
      this.busy = false;
      this.setState(answer);
      return true;
    } catch (err) {
      this.showStatus(`Not recorded: ${err}`, true);
      return false;
    } finally {
      this.busy = false;
      this.render();
    }
  }
}

function panelOf(node) {
  return node?.psoPairPicker ?? null;
}

function rootGraph() {
  return app.rootGraph ?? app.graph;
}

/** Every node of the root graph and of the subgraphs inside it. */
function allNodes(graph = rootGraph(), seen = new Set()) {
  if (!graph || seen.has(graph)) return [];
  seen.add(graph);
  const nodes = [...(graph.nodes ?? graph._nodes ?? [])];
  return nodes.concat(nodes.flatMap((n) => (n.subgraph ? allNodes(n.subgraph, seen) : [])));
}

function pickerNodes() {
  return allNodes().filter((n) => (n.comfyClass ?? n.type) === NODE_TYPE && panelOf(n));
}

/** The node a host id names: "12" in the root graph, "5:12" inside subgraph node 5. */
function findNode(nodeId) {
  let graph = rootGraph();
  let node = null;
  const parts = String(nodeId).split(":");
  for (const [i, part] of parts.entries()) {
    node = graph?.getNodeById?.(Number.isNaN(Number(part)) ? part : Number(part)) ?? null;
    if (!node) return null;
    if (i < parts.length - 1) graph = node.subgraph;
  }
  return node;
}

function applyState(state) {
  const panel = panelOf(findNode(state.node));
  if (panel) panel.setState(state);
}

/** The selected nodes: `selectedItems` (frontends >= 1.10; `selected_nodes` warns from 1.5x on). */
function selectedNodes() {
  const canvas = app.canvas;
  if (canvas?.selectedItems) return [...canvas.selectedItems];
  return Object.values(canvas?.selected_nodes ?? {});
}

let syncTimer = null;
/** Ask the host for open sessions (after a page reload or a graph load) and show them. */
function scheduleSync() {
  clearTimeout(syncTimer);
  syncTimer = setTimeout(async () => {
    try {
      const { sessions } = await (await api.fetchApi("/pso/picker/sessions")).json();
      for (const { session } of sessions ?? []) {
        const response = await api.fetchApi(`/pso/picker/session/${encodeURIComponent(session)}`);
        if (response.ok) applyState(await response.json());
      }
    } catch (err) {
      console.warn("PSO.PairPicker: could not read the open picking sessions", err);
    }
  }, 100);
}

/** The panel the keyboard talks to: a selected picker node, else the one under the pointer. */
function activePanel() {
  const selected = selectedNodes();
  const panels = pickerNodes().map(panelOf).filter((p) => p.current);
  return panels.find((p) => selected.includes(p.node)) ?? panels.find((p) => p.hovered) ?? null;
}

function onKeyDown(event) {
  const choice = KEYS[event.key];
  if (!choice || event.ctrlKey || event.metaKey || event.altKey) return;
  const target = event.target;
  if (target?.closest?.("input, textarea, select, [contenteditable='true']")) return;
  const panel = activePanel();
  if (!panel) return;
  event.preventDefault();
  event.stopImmediatePropagation();
  panel.pick(choice);
}

app.registerExtension({
  name: "PSO.PairPicker",
  async setup() {
    document.head.append(el("style", { id: "pso-pair-picker-style", text: STYLE }));
    api.addEventListener(EVENT, (event) => applyState(event.detail));
    api.addEventListener("reconnected", scheduleSync);
    window.addEventListener("keydown", onKeyDown, true);
    scheduleSync();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      const panel = new PickerPanel(this);
      this.psoPairPicker = panel;
      const widget = this.addDOMWidget("pso_pair_picker", "pso_pair_picker", panel.root, {
        serialize: false, hideOnZoom: false, getMinHeight: () => MIN_HEIGHT,
      });
      widget.serialize = false; // not a value: never stored in the workflow
      widget.serializeValue = () => undefined;
      widget.computeLayoutSize = () => ({ minHeight: MIN_HEIGHT, minWidth: 320 });
      const [w, h] = this.size;
      this.setSize([Math.max(w, 420), Math.max(h, this.computeSize()[1])]);
      scheduleSync();
      return result;
    };
    const onAdded = nodeType.prototype.onAdded;
    nodeType.prototype.onAdded = function (...args) {
      const result = onAdded?.apply(this, args);
      panelOf(this)?.render();
      scheduleSync();
      return result;
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function (...args) {
      this.psoPairPicker = null;
      return onRemoved?.apply(this, args);
    };
  },
});
