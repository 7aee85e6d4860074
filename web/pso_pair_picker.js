// PSO.PairPicker: the labelling panel of "PSO Pick Pairs" nodes.
// While the node runs, the host sends a `pso.picker` event with the session's pairs (two preview
// images each); this panel shows the first undecided pair side by side and posts every decision to
// POST /pso/picker/pick, which writes it to the pair dataset before answering. Keys (when the node is
// selected or the pointer is over the panel): 1 or Left arrow = left, 2 or Right arrow = right,
// T = tie, S = skip. A reloaded page asks /pso/picker/sessions and /pso/picker/session/<id> for the
// open sessions. Scoped to PSOPickPairs nodes; every wrapped hook is chained.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "PSOPickPairs";
const EVENT = "pso.picker";
const KEYS = { "1": "left", ArrowLeft: "left", "2": "right", ArrowRight: "right", t: "tie", T: "tie", s: "skip", S: "skip" };
const MIN_HEIGHT = 300;

const STYLE = `
.pso-picker { display: flex; flex-direction: column; gap: 6px; padding: 4px; box-sizing: border-box;
  width: 100%; height: 100%; font: 12px sans-serif; color: #ddd; }
.pso-picker-head { display: flex; justify-content: space-between; gap: 8px; }
.pso-picker-prompt { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; opacity: 0.85; }
.pso-picker-row { display: flex; gap: 6px; flex: 1; min-height: 0; }
.pso-picker-side { flex: 1; display: flex; flex-direction: column; align-items: center; gap: 2px;
  border: 2px solid #444; border-radius: 4px; background: #111; cursor: pointer; padding: 2px; min-width: 0; }
.pso-picker-side:hover { border-color: #7fbf9f; }
.pso-picker-side img { max-width: 100%; max-height: 100%; flex: 1; min-height: 0; object-fit: contain;
  image-rendering: pixelated; }
.pso-picker-buttons { display: flex; gap: 6px; }
.pso-picker-buttons button { flex: 1; }
.pso-picker-status { min-height: 1.2em; }
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
    const buttons = ["tie", "skip"].map((choice) => {
      const b = el("button", { class: `pso-picker-${choice}`, "data-choice": choice, type: "button",
                               text: `${choice === "tie" ? "Tie" : "Skip"} (${choice[0].toUpperCase()})` });
      b.addEventListener("click", () => this.pick(choice));
      return b;
    });
    this.status = el("div", { class: "pso-picker-status" });
    this.root = el("div", { class: "pso-picker" }, [
      el("div", { class: "pso-picker-head" }, [this.prompt, this.progress]),
      el("div", { class: "pso-picker-row" }, this.images.map((x) => x.box)),
      el("div", { class: "pso-picker-buttons" }, buttons),
      this.status,
    ]);
    this.root.addEventListener("pointerenter", () => { this.hovered = true; });
    this.root.addEventListener("pointerleave", () => { this.hovered = false; });
    this.render();
  }

  get current() {
    return this.state?.open ? this.state.pairs.find((p) => p.choice === null) ?? null : null;
  }

  setState(state) {
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
      const closed = `Session closed (${s.decided} / ${s.total} decided).`;
      this.prompt.textContent = pair ? pair.prompt : s.open ? "All pairs decided: saving…" : closed;
    }
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

function pickerNodes() {
  return (app.graph?.nodes ?? []).filter((n) => n.type === NODE_TYPE && panelOf(n));
}

function applyState(state) {
  const node = app.graph?.getNodeById?.(Number(state.node)) ?? app.graph?.getNodeById?.(state.node);
  const panel = panelOf(node);
  if (panel) panel.setState(state);
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
  const selected = Object.values(app.canvas?.selected_nodes ?? {});
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
