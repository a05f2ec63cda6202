// Live loss chart on the Train TLoRA node, fed by the trainer's "tlora.train.progress" messages.
// Raw losses as points, their bias-corrected EMA as a line, a log axis when the losses span more
// than a factor of 50 (as TLoRA Loss Plot's "auto"), and a status line: step, loss, ETA. The
// trainer's preview images show on the node through ComfyUI's own preview mechanism.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAIN_NODE = "TLoRATrain";
const PROGRESS_EVENT = "tlora.train.progress";
const SMOOTHING = 0.9;
const LOG_RATIO = 50;
const CHART_HEIGHT = 180;
const COLORS = { raw: "#6fa8ff", smooth: "#ffb347", axis: "#666" };

function formatDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const pad = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${pad(m)}:${pad(s % 60)}` : `${m}:${pad(s % 60)}`;
}

function formatLoss(v) {
  if (!Number.isFinite(v)) return String(v);
  return Math.abs(v) >= 1e-3 && Math.abs(v) < 1e4 ? v.toPrecision(4) : v.toExponential(2);
}

class LossChart {
  constructor() {
    this.element = document.createElement("div");
    this.element.className = "tlora-loss-chart";
    Object.assign(this.element.style, { display: "flex", flexDirection: "column", gap: "2px" });
    this.canvas = document.createElement("canvas");
    Object.assign(this.canvas.style, { flex: "1 1 auto", minHeight: "0", width: "100%", borderRadius: "6px" });
    this.status = document.createElement("div");
    Object.assign(this.status.style, {
      font: "11px monospace",
      color: "var(--descrip-text, #999)",
      whiteSpace: "nowrap",
      overflow: "hidden",
      textOverflow: "ellipsis",
    });
    this.element.append(this.canvas, this.status);
    this.pending = false;
    new ResizeObserver(() => this.draw()).observe(this.canvas);
    this.reset();
  }

  reset() {
    this.points = []; // [step, loss] as received; loss NaN when it was not a number
    this.smooth = []; // [step, EMA] over the finite losses
    this.avg = 0;
    this.weight = 0;
    this.steps = 0;
    this.eta = null;
    this.previewStep = null;
    this.status.textContent = "loss: waiting for training";
    this.redraw();
  }

  /** One progress message: {step, steps, loss, eta, preview}. A step at or below the last one starts a new run. */
  add({ step, steps, loss, eta, preview }) {
    const last = this.points.at(-1);
    if (last && step <= last[0]) this.reset();
    const value = typeof loss === "number" ? loss : NaN;
    this.points.push([step, value]);
    if (Number.isFinite(value)) {
      this.avg = SMOOTHING * this.avg + (1 - SMOOTHING) * value;
      this.weight = SMOOTHING * this.weight + (1 - SMOOTHING);
      this.smooth.push([step, this.avg / this.weight]);
    }
    this.steps = steps;
    this.eta = eta;
    if (preview) this.previewStep = step; // the image itself shows on the node (ComfyUI's preview)
    this.status.textContent = this.statusText();
    this.redraw();
  }

  statusText() {
    const [step, loss] = this.points.at(-1);
    const parts = [`step ${step}/${this.steps}`, `loss ${formatLoss(loss)}`];
    const smooth = this.smooth.at(-1);
    if (smooth) parts.push(`avg ${formatLoss(smooth[1])}`);
    parts.push(step >= this.steps ? "done" : `ETA ${formatDuration(this.eta)}`);
    return parts.join(" · ");
  }

  redraw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  draw() {
    const width = this.canvas.clientWidth;
    const height = this.canvas.clientHeight;
    if (!width || !height) return; // hidden (off screen or zoomed out): drawn when shown again
    const dpr = window.devicePixelRatio || 1;
    this.canvas.width = Math.round(width * dpr);
    this.canvas.height = Math.round(height * dpr);
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const style = getComputedStyle(this.element);
    ctx.fillStyle = style.getPropertyValue("--comfy-input-bg").trim() || "#222";
    ctx.fillRect(0, 0, width, height);
    const text = style.getPropertyValue("--input-text").trim() || "#ddd";
    ctx.font = "10px sans-serif";

    const finite = this.points.filter(([, v]) => Number.isFinite(v));
    if (!finite.length) {
      ctx.fillStyle = text;
      ctx.fillText(this.points.length ? "no finite loss yet" : "no data", 8, height / 2);
      return;
    }
    const values = finite.map(([, v]) => v);
    const min = Math.min(...values);
    const max = Math.max(...values);
    const log = min > 0 && max / min > LOG_RATIO;
    const f = log ? Math.log10 : (v) => v;
    let lo = f(min);
    let hi = f(max);
    if (hi - lo < 1e-12) [lo, hi] = [lo - 0.5, hi + 0.5];
    const first = this.points[0][0];
    const span = Math.max(this.steps - first, this.points.at(-1)[0] - first, 1);
    const left = 46;
    const right = 6;
    const top = 12;
    const bottom = 14;
    const x = (step) => left + ((width - left - right) * (step - first)) / span;
    const y = (v) => height - bottom - ((height - top - bottom) * (f(v) - lo)) / (hi - lo);

    ctx.strokeStyle = COLORS.axis;
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(left, top);
    ctx.lineTo(left, height - bottom);
    ctx.lineTo(width - right, height - bottom);
    ctx.stroke();
    ctx.fillStyle = text;
    ctx.textAlign = "right";
    ctx.fillText(formatLoss(max), left - 4, top + 4);
    ctx.fillText(formatLoss(min), left - 4, height - bottom);
    ctx.textAlign = "left";
    ctx.fillText(log ? "loss (log)" : "loss", left + 4, top - 2);
    ctx.textAlign = "right";
    if (this.previewStep != null) ctx.fillText(`preview: step ${this.previewStep}`, width - right, top - 2);
    ctx.fillText(`step ${this.steps}`, width - right, height - 2);
    ctx.textAlign = "left";
    ctx.fillText(`${first}`, left, height - 2);

    ctx.fillStyle = COLORS.raw;
    for (const [step, v] of finite) ctx.fillRect(Math.round(x(step)) - 1, Math.round(y(v)) - 1, 3, 3);
    ctx.strokeStyle = COLORS.smooth;
    ctx.lineWidth = 2;
    ctx.beginPath();
    this.smooth.forEach(([step, v], i) => (i ? ctx.lineTo(x(step), y(v)) : ctx.moveTo(x(step), y(v))));
    ctx.stroke();
  }
}

/** The node an execution id names: "12", or "5:12" inside subgraph node 5. */
function nodeForExecutionId(id) {
  let graph = app.graph;
  let node = null;
  for (const part of String(id).split(":")) {
    node = graph?.getNodeById(part) ?? null;
    graph = node?.subgraph;
  }
  return node;
}

app.registerExtension({
  name: "comfyui-tlora.lossChart",
  setup() {
    api.addEventListener(PROGRESS_EVENT, ({ detail }) => {
      nodeForExecutionId(detail.node)?.tloraLossChart?.add(detail);
    });
  },
  nodeCreated(node) {
    if (node.comfyClass !== TRAIN_NODE) return;
    const chart = new LossChart();
    const widget = node.addDOMWidget("loss_chart", "tlora_loss_chart", chart.element, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => CHART_HEIGHT,
      getMaxHeight: () => CHART_HEIGHT,
    });
    widget.serialize = false; // not in the saved workflow's widgets_values either
    node.tloraLossChart = chart;
  },
});
