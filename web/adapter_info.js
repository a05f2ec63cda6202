// Info panel on Apply TLoRA: what the chosen adapter file is (method, parameters, target layers,
// base model, training steps), read from its metadata by the pack's route GET /tlora/info.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const APPLY_NODE = "TLoRAApply";
const NAME_WIDGET = "adapter_name";
const PANEL_HEIGHT = 84; // 4 rows of 14 px, padding, and the widget's margins
const UNKNOWN = "unknown";
const ROWS = [
  ["method", (i) => i.method],
  ["parameters", (i) => `${formatCount(i.parameters)} in ${i.modules} layers`],
  ["targets", (i) => (i.targets ?? []).join(", ")],
  ["trained", trainedOn],
];

function trainedOn({ steps, base_model }) {
  const count = steps === UNKNOWN ? "unrecorded steps" : `${steps} steps`;
  return `${count} on ${base_model === UNKNOWN ? "an unrecorded base model" : base_model}`;
}

function formatCount(n) {
  if (!Number.isFinite(n)) return String(n);
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)} M`;
  return n >= 1e4 ? `${(n / 1e3).toFixed(1)} k` : n.toLocaleString("en-US");
}

class InfoPanel {
  constructor() {
    this.name = undefined; // the file the panel shows (or is fetching)
    this.info = null; // the route's answer for it
    this.element = document.createElement("div");
    this.element.className = "tlora-adapter-info";
    Object.assign(this.element.style, {
      font: "11px sans-serif",
      color: "var(--input-text, #ddd)",
      background: "var(--comfy-input-bg, #222)",
      borderRadius: "6px",
      padding: "4px 8px",
      overflow: "hidden",
      boxSizing: "border-box",
    });
  }

  async show(name) {
    if (name === this.name) return;
    this.name = name;
    this.info = null;
    if (!name) return this.render({ error: "no adapter file chosen" });
    this.render(null);
    let info;
    try {
      const response = await api.fetchApi(`/tlora/info?name=${encodeURIComponent(name)}`);
      info = await response.json();
    } catch (err) {
      info = { error: `could not read ${name}: ${err}` };
    }
    if (name === this.name) this.render(info); // a later choice may have replaced this one
  }

  render(info) {
    this.info = info;
    this.element.replaceChildren();
    if (!info) {
      this.element.textContent = `reading ${this.name}…`;
      return;
    }
    if (info.error) {
      const error = document.createElement("div");
      error.style.color = "var(--error-text, #f44)";
      error.textContent = info.error;
      this.element.append(error);
      return;
    }
    const table = document.createElement("table");
    table.style.borderSpacing = "8px 0";
    table.style.lineHeight = "14px";
    for (const [label, value] of ROWS) {
      const row = table.insertRow();
      const key = row.insertCell();
      key.textContent = label;
      key.style.color = "var(--descrip-text, #999)";
      row.insertCell().textContent = value(info);
      for (const cell of row.cells) cell.style.padding = "0";
    }
    this.element.append(table);
  }
}

/** Calls hook() after object[method] (if it has one) each time that is called. */
function after(object, method, hook) {
  if (!object) return;
  const original = object[method];
  object[method] = function (...args) {
    const result = original?.apply(this, args);
    hook();
    return result;
  };
}

app.registerExtension({
  name: "comfyui-tlora.adapterInfo",
  nodeCreated(node) {
    if (node.comfyClass !== APPLY_NODE) return;
    const panel = new InfoPanel();
    const widget = node.addDOMWidget("adapter_info", "tlora_adapter_info", panel.element, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => PANEL_HEIGHT,
      getMaxHeight: () => PANEL_HEIGHT,
    });
    widget.serialize = false;
    node.tloraAdapterInfo = panel;
    // Follow the widget's value: a user's pick (its callback, in both node designs), a loaded or pasted
    // workflow and undo (configure), a new node (its default), and whatever else sets it (each canvas draw of
    // the classic design; Nodes 2.0 draws nodes in the DOM and calls no onDrawForeground).
    const nameWidget = node.widgets?.find((w) => w.name === NAME_WIDGET);
    const follow = () => panel.show(nameWidget?.value);
    after(nameWidget, "callback", follow);
    after(node, "onConfigure", follow);
    after(node, "onDrawForeground", follow);
    queueMicrotask(follow); // after a workflow's configure, which runs in the same task as nodeCreated
  },
});
