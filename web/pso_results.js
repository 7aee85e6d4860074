// PSO.Results: what a PSO node reports after it ran, shown in the node: the saved file of PSO Save
// LoRA ("saved pso/style_00001.safetensors ..."), the dataset of PSO Save Pairs. The host sends it as
// the node's `text` UI output (nodes/lora_nodes.py, nodes/dataset_nodes.py); the stock frontend draws
// no text outputs, so without this the result is only in the server log. The line is reserved when
// the node is created (the node does not grow over its neighbours when the result arrives) and is
// never saved in the workflow. Also: when Run is pressed and the host's validation refuses a PSO node
// (a missing target folder or dataset, beta 0...) while other outputs still run, the frontend only
// outlines the node in red; a toast then says which node and why. Scoped to the nodes below and to
// PSO node errors; every wrapped hook is chained.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const RESULT_NODES = new Set(["PSOSaveLoRA", "PSOSavePairs"]);
const WIDGET_NAME = "pso_result";
const HEIGHT = 44;
const IDLE = "Runs when queued: the saved file's name appears here.";

function addResultWidget(node) {
  const element = document.createElement("div");
  element.className = "pso-result";
  element.style.cssText =
    `box-sizing:border-box;width:100%;height:${HEIGHT}px;max-height:${HEIGHT}px;overflow:hidden;` +
    "padding:2px 4px;font:11px sans-serif;line-height:14px;color:#bbb;white-space:normal;" +
    "overflow-wrap:anywhere;pointer-events:none;";
  element.textContent = IDLE;
  const widget = node.addDOMWidget(WIDGET_NAME, "pso-result", element, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: () => HEIGHT,
    getMaxHeight: () => HEIGHT,
  });
  widget.serialize = false; // not in widgets_values: saved workflows keep their value positions
  node.psoResult = element;
  return widget;
}

/** Show the node's text output (a list of strings) in its result line. */
export function showResult(node, text) {
  if (!node?.psoResult) return;
  const lines = (Array.isArray(text) ? text : [text]).filter((t) => typeof t === "string" && t);
  if (!lines.length) return;
  node.psoResult.textContent = lines.join("\n");
  node.psoResult.title = lines.join("\n"); // the whole text on hover when it is cut
  node.psoResult.style.color = "#e6e6e6";
  node.setDirtyCanvas?.(true, false);
}

let shownErrors = null;
let pollTimer = null;

/** A toast per PSO node the host's validation refused for the prompt just queued (once per answer). */
function toastNodeErrors() {
  const errors = app.lastNodeErrors ?? null;
  if (!errors || errors === shownErrors) return false;
  shownErrors = errors;
  for (const [nodeId, entry] of Object.entries(errors)) {
    if (!String(entry?.class_type ?? "").startsWith("PSO")) continue;
    const node = (app.rootGraph ?? app.graph)?.getNodeById?.(Number(nodeId));
    const detail = (entry.errors ?? []).map((e) => e.details || e.message).join("\n");
    app.extensionManager?.toast?.add?.({
      severity: "error",
      summary: `${node?.title ?? entry.class_type} (#${nodeId}) did not run`,
      detail,
      life: 20000,
    });
  }
  return true;
}

/** From "Run" on: watch for the host's answer (frontends differ in which queue event follows it). */
function watchQueue() {
  clearInterval(pollTimer);
  const until = Date.now() + 15000;
  pollTimer = setInterval(() => {
    if (toastNodeErrors() || Date.now() > until) clearInterval(pollTimer);
  }, 200);
}

app.registerExtension({
  name: "PSO.Results",
  async setup() {
    shownErrors = app.lastNodeErrors ?? null;
    api.addEventListener("promptQueueing", watchQueue); // frontends 1.5x
    api.addEventListener("promptQueued", () => { toastNodeErrors(); watchQueue(); });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!RESULT_NODES.has(nodeData?.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      addResultWidget(this);
      const needed = this.computeSize?.();
      if (needed && this.size[1] < needed[1]) this.setSize([Math.max(this.size[0], needed[0]), needed[1]]);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {
      const result = onConfigure?.apply(this, args);
      const needed = this.computeSize?.();
      if (needed && this.size[1] < needed[1]) this.setSize([Math.max(this.size[0], needed[0]), needed[1]]);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output, ...rest) {
      const result = onExecuted?.apply(this, [output, ...rest]);
      showResult(this, output?.text);
      return result;
    };
  },
});
