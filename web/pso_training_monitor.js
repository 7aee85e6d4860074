// PSO.TrainingMonitor: a live chart on the PSO training nodes of loss (with a smoothed line),
// implicit accuracy, margin and saturated fraction while the node trains, each panel with its value
// range and the step axis, and the latest training preview (drawn pixelated, captioned with its
// step); when the node finishes, its one-line summary replaces the status line. Points come from
// the backend's "pso.train" websocket events (nodes/monitor.py); after a page reload the chart is
// redrawn from the server's history (POST /pso/monitor/lookup). Scoped to this extension's training
// nodes; every hook it wraps is chained. The chart widget is never saved in the workflow or sent.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAINING_NODES = new Set(["PSOTrain", "PSOOnlineTrain"]);
const WIDGET_NAME = "pso_training_monitor";
const EVENT = "pso.train";
const MAX_POINTS = 4000;
const CHART_HEIGHT = 170;
const PREVIEW_WIDTH = 96;
// [index in a point, label, fixed range or null, colour]; a point is [step, loss, acc, margin, sat].
const SERIES = [
  [1, "loss", null, "#e0a040"],
  [2, "accuracy", [0, 1], "#60c080"],
  [3, "margin", null, "#60a0e0"],
  [4, "saturated", [0, 1], "#e06070"],
];

function rootGraph() {
  return app.rootGraph ?? app.graph;
}

// Node ids of nodes inside subgraphs are "outer:inner"; follow them from the root graph.
function findNode(nodeId) {
  const parts = String(nodeId).split(":");
  let graph = rootGraph();
  let node = null;
  for (const [i, part] of parts.entries()) {
    node = graph?.getNodeById?.(Number.isNaN(Number(part)) ? part : Number(part)) ?? null;
    if (!node) return null;
    if (i < parts.length - 1) graph = node.subgraph;
  }
  return node;
}

function isTrainingNode(node) {
  return TRAINING_NODES.has(node?.comfyClass ?? node?.type);
}

function emptyState() {
  return { prompt_id: null, status: "idle", step: 0, total: 0, method: "", points: [], preview: null };
}

function mergePoints(points, incoming) {
  if (!incoming?.length) return points;
  const last = points.length ? points[points.length - 1][0] : -Infinity;
  let merged;
  if (incoming[0][0] > last) {
    merged = points.concat(incoming);
  } else {
    const byStep = new Map(points.map((p) => [p[0], p]));
    for (const p of incoming) byStep.set(p[0], p);
    merged = [...byStep.values()].sort((a, b) => a[0] - b[0]);
  }
  while (merged.length > MAX_POINTS) merged = merged.filter((_, i) => i % 2 === 1);
  return merged;
}

// Apply a run (a live event, or a run from the history route) to a node's chart state.
function applyRun(node, run, { replace = false } = {}) {
  let state = node.psoMonitor ?? emptyState();
  if (state.prompt_id !== run.prompt_id) {
    if (!replace && state.prompt_id && run.started && state.started && run.started < state.started) return;
    state = { ...emptyState(), prompt_id: run.prompt_id, started: run.started };
  }
  state.points = mergePoints(state.points, run.points ?? []);
  state.status = run.status ?? state.status;
  state.total = run.total ?? state.total;
  state.method = run.method ?? state.method;
  state.step = Math.max(run.step ?? 0, state.points.length ? state.points[state.points.length - 1][0] : 0);
  if (run.preview) state.preview = run.preview;
  node.psoMonitor = state;
  node.psoMonitorView?.update();
  node.setDirtyCanvas?.(true, true);
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  const a = Math.abs(v);
  return a !== 0 && (a < 0.01 || a >= 1000) ? v.toExponential(2) : v.toFixed(3);
}

/** Exponential moving average of one series (null gaps kept), for the smoothed loss line. */
function smoothed(points, idx, alpha) {
  let ema = null;
  return points.map((p) => {
    const v = p[idx];
    if (v === null || v === undefined) return [p[0], null];
    ema = ema === null ? v : alpha * v + (1 - alpha) * ema;
    return [p[0], ema];
  });
}

function drawLine(ctx, points, idx, lo, hi, box, xMax) {
  const [left, top, right, bottom] = box;
  ctx.beginPath();
  let pen = false;
  for (const p of points) {
    const v = p[idx];
    if (v === null || v === undefined) {
      pen = false;
      continue;
    }
    const px = left + ((right - left) * p[0]) / Math.max(1, xMax);
    const py = bottom - ((bottom - top) * (v - lo)) / (hi - lo);
    if (pen) ctx.lineTo(px, py);
    else ctx.moveTo(px, py);
    pen = true;
  }
  ctx.stroke();
}

function drawPanel(ctx, x, y, w, h, series, points, xMax) {
  const [idx, label, fixed, colour] = series;
  const values = points.filter((p) => p[idx] !== null && p[idx] !== undefined);
  let [lo, hi] = fixed ?? [Infinity, -Infinity];
  if (!fixed) {
    for (const p of values) {
      lo = Math.min(lo, p[idx]);
      hi = Math.max(hi, p[idx]);
    }
    if (!Number.isFinite(lo)) [lo, hi] = [0, 1];
    if (hi - lo < 1e-12) [lo, hi] = [lo - 0.5, hi + 0.5];
  }
  ctx.fillStyle = "rgba(0,0,0,0.25)";
  ctx.fillRect(x, y, w, h);
  ctx.fillStyle = colour;
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "top";
  const latest = values.length ? values[values.length - 1][idx] : null;
  ctx.fillText(`${label} ${fmt(latest)}`, x + 4, y + 3);
  const top = y + 17, bottom = y + h - 13, left = x + 3, right = x + w - 3;
  // value range (right edge) and step axis (bottom edge), faint
  ctx.fillStyle = "rgba(220,220,220,0.55)";
  ctx.font = "9px sans-serif";
  ctx.textAlign = "right";
  ctx.fillText(fmt(hi), right, y + 3);
  ctx.textBaseline = "bottom";
  ctx.fillText(fmt(lo), right, bottom);
  ctx.fillText(`step ${xMax}`, right, y + h - 1);
  ctx.textAlign = "left";
  ctx.fillText("0", left, y + h - 1);
  ctx.textBaseline = "top";
  ctx.strokeStyle = "rgba(220,220,220,0.15)";
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(left, bottom + 0.5);
  ctx.lineTo(right, bottom + 0.5);
  ctx.stroke();
  const box = [left, top, right, bottom];
  const smooth = idx === 1 && points.length >= 10; // the loss: raw line faint, smoothed line on top
  ctx.strokeStyle = colour;
  ctx.globalAlpha = smooth ? 0.35 : 1;
  ctx.lineWidth = smooth ? 1 : 1.5;
  drawLine(ctx, points, idx, lo, hi, box, xMax);
  ctx.globalAlpha = 1;
  if (smooth) {
    ctx.lineWidth = 2;
    drawLine(ctx, smoothed(points, idx, 0.1), 1, lo, hi, box, xMax);
  }
}

class MonitorView {
  constructor(node) {
    this.node = node;
    this.element = document.createElement("div");
    this.element.className = "pso-training-monitor";
    this.element.style.cssText =
      "display:flex;flex-direction:column;gap:2px;width:100%;height:100%;box-sizing:border-box;" +
      `padding-bottom:18px;max-height:${CHART_HEIGHT}px;` + // room for the node badge drawn bottom-right
      "font:11px sans-serif;color:#ccc;pointer-events:none;";
    this.status = document.createElement("div");
    this.row = document.createElement("div");
    this.row.style.cssText = "display:flex;gap:4px;flex:1;min-height:0;";
    this.canvas = document.createElement("canvas");
    this.canvas.style.cssText = "flex:1;min-width:0;height:100%;";
    this.figure = document.createElement("figure");
    // a fixed-width column beside the chart (the chart's canvas takes the rest of the row)
    this.figure.style.cssText = `margin:0;flex:0 0 ${PREVIEW_WIDTH}px;width:${PREVIEW_WIDTH}px;height:100%;` +
      "display:none;flex-direction:column;align-items:center;min-height:0;";
    this.image = document.createElement("img");
    this.image.alt = "latest training preview";
    this.image.style.cssText = `width:${PREVIEW_WIDTH}px;flex:1;min-height:0;object-fit:contain;` +
      "image-rendering:pixelated;";
    this.caption = document.createElement("figcaption");
    this.caption.style.cssText = "font:10px sans-serif;opacity:0.8;white-space:nowrap;";
    this.figure.append(this.image, this.caption);
    this.row.append(this.canvas, this.figure);
    this.element.append(this.status, this.row);
    this.observer = new ResizeObserver(() => this.draw());
    this.observer.observe(this.canvas);
    this.update();
  }

  update() {
    const s = this.node.psoMonitor ?? emptyState();
    this.status.textContent = s.summary && s.status !== "running"
      ? s.summary
      : s.prompt_id
        ? `PSO ${s.method || "training"}: step ${s.step}/${s.total} · ${s.status}`
        : "PSO training monitor: queue the graph to see loss and metrics";
    const p = s.preview;
    if (p?.filename) {
      const query = new URLSearchParams({ filename: p.filename, subfolder: p.subfolder ?? "", type: p.type ?? "temp",
                                          step: String(p.step ?? 0) });
      const src = api.apiURL(`/view?${query}`);
      if (this.image.dataset.src !== src) {
        this.image.dataset.src = src;
        this.image.src = src;
      }
      this.caption.textContent = `preview, step ${p.step ?? "?"}`;
      this.figure.style.display = "flex";
    } else {
      this.figure.style.display = "none";
    }
    this.draw();
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const w = Math.max(1, canvas.clientWidth), h = Math.max(1, canvas.clientHeight);
    if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
      canvas.width = Math.round(w * ratio);
      canvas.height = Math.round(h * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const s = this.node.psoMonitor ?? emptyState();
    const xMax = Math.max(s.total || 0, s.step || 0, 1);
    const pw = (w - 4) / 2, ph = (h - 4) / 2;
    SERIES.forEach((series, i) => {
      drawPanel(ctx, (i % 2) * (pw + 4), Math.floor(i / 2) * (ph + 4), pw, ph, series, s.points, xMax);
    });
    this.drawn = (this.drawn ?? 0) + 1;
  }

  remove() {
    this.observer.disconnect();
  }
}

function addMonitorWidget(node) {
  const view = new MonitorView(node);
  const widget = node.addDOMWidget(WIDGET_NAME, "pso-monitor", view.element, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: () => CHART_HEIGHT,
    getHeight: () => CHART_HEIGHT,
  });
  widget.serialize = false; // not in widgets_values: saved workflows keep their value positions
  node.psoMonitorView = view;
  return widget;
}

function fitChart(node) {
  const needed = node.computeSize?.();
  if (needed && node.size[1] < needed[1]) node.setSize([Math.max(node.size[0], needed[0]), needed[1]]);
}

// Bumped whenever a graph is loaded: a history answer that arrives after another workflow was opened
// belongs to the old graph (whose node ids the new one may reuse) and is dropped.
let graphGeneration = 0;

async function refreshFromHistory() {
  const generation = graphGeneration;
  const graph = rootGraph();
  const nodes = (graph?.nodes ?? []).filter(isTrainingNode);
  if (!nodes.length) return;
  const body = { node_ids: nodes.map((n) => String(n.id)), workflow_id: graph.id ? String(graph.id) : null };
  try {
    const response = await api.fetchApi("/pso/monitor/lookup", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      console.warn("PSO.TrainingMonitor: history lookup refused", response.status, await response.text());
      return;
    }
    const { runs } = await response.json();
    if (generation !== graphGeneration) return; // another workflow was opened while we asked
    for (const [nodeId, run] of Object.entries(runs ?? {})) {
      const node = findNode(nodeId);
      if (isTrainingNode(node)) applyRun(node, run, { replace: true });
    }
  } catch (error) {
    console.warn("PSO.TrainingMonitor: could not fetch the training history", error);
  }
}

function onTrainEvent(event) {
  const run = event.detail;
  if (!run?.node_id) return;
  const graphId = rootGraph()?.id;
  if (run.workflow_id && graphId && String(graphId) !== run.workflow_id) return; // another workflow
  const node = findNode(run.node_id);
  if (isTrainingNode(node)) applyRun(node, run);
}

app.registerExtension({
  name: "PSO.TrainingMonitor",
  async setup() {
    api.addEventListener(EVENT, onTrainEvent);
    // The end of a prompt: the server's record is complete (also its status after Cancel or an error).
    for (const name of ["reconnected", "execution_success", "execution_error", "execution_interrupted"]) {
      api.addEventListener(name, refreshFromHistory);
    }
    await refreshFromHistory();
  },
  async afterConfigureGraph() {
    graphGeneration += 1;
    await refreshFromHistory();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TRAINING_NODES.has(nodeData?.name)) {
      return;
    }
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      this.psoMonitor = emptyState();
      addMonitorWidget(this);
      fitChart(this);
      return result;
    };
    // A saved workflow restores the node's old size after onNodeCreated: make room for the chart.
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {
      const result = onConfigure?.apply(this, args);
      fitChart(this);
      return result;
    };
    // The node's summary line (ui text) when it finished, for this run's chart.
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output, ...rest) {
      const result = onExecuted?.apply(this, [output, ...rest]);
      const line = Array.isArray(output?.text) ? output.text[0] : null;
      if (typeof line === "string" && this.psoMonitor) {
        this.psoMonitor.summary = line;
        this.psoMonitorView?.update();
      }
      return result;
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function (...args) {
      this.psoMonitorView?.remove();
      return onRemoved?.apply(this, args);
    };
  },
});
