"""The ComfyUI frontend in headless Chromium, as a user meets it: open ComfyUI, pick an example workflow
from the template browser, set widgets, queue it, wait for the run. Shared by the browser tests and
``docs/screenshots.py``.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from .browser import Browser, BrowserError

# What the frontend's public modules scripts/app.js and scripts/api.js export (their shims read these).
APP = "window.comfyAPI.app.app"
API = "window.comfyAPI.api.api"
# Frontend 1.49 defines window.comfyAPI only once the bundle's chunk that holds the app has run, after the page
# loaded (1.27: before): hence `?.` until the app is set up.
APP_READY = f"window.comfyAPI?.app?.app?.graph && {APP}.extensionManager?.command && {APP}.vueAppReady"
PACK_EXTENSIONS = ("comfyui-tlora.lossChart", "comfyui-tlora.adapterInfo")
PACK_JS = "/extensions/comfyui-tlora/"
# No first-run template dialog (the tests open it themselves), no minimap over the screenshots, the classic
# (canvas-drawn) node design even where a frontend would default to Nodes 2.0.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.VueNodes.Enabled": False}
# Records the server's execution events and the length of its queue (status messages) in the page: wait_run()
# waits on them.
RECORD_RUNS = f"""(() => {{
  window.tloraTestRuns = [];
  for (const type of ["execution_start", "execution_success", "execution_error", "execution_interrupted"])
    {API}.addEventListener(type, ({{ detail }}) => window.tloraTestRuns.push({{ type, ...detail }}));
  {API}.addEventListener("status", ({{ detail }}) => (window.tloraTestQueue = detail?.exec_info?.queue_remaining));
  return true;
}})()"""


def js(value) -> str:
    """A Python value as a JavaScript literal."""
    return json.dumps(value)


class ComfyPage:
    """One ComfyUI tab in ``browser`` on the server at ``url``."""

    def __init__(self, browser: Browser, url: str):
        self.browser, self.url = browser, url

    def evaluate(self, expression: str, timeout: float | None = None):
        return self.browser.evaluate(expression, timeout)

    def wait_for(self, expression: str, timeout: float = 60.0, what: str | None = None):
        return self.browser.wait_for(expression, timeout, what=what)

    def open(self, settings: dict | None = None, timeout: float = 180.0) -> ComfyPage:
        """Save ``settings`` (after :data:`SETTINGS`) on the server, load ComfyUI and wait for the pack's extensions."""
        body = json.dumps({**SETTINGS, **(settings or {})}).encode()
        request = urllib.request.Request(self.url + "/api/settings", data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30).close()
        self.browser.goto(self.url, timeout)
        self.wait_for(APP_READY, timeout, what="the ComfyUI app to start")
        self.wait_for(f"{APP}.extensions.some(e => e.name === {js(PACK_EXTENSIONS[-1])})", timeout, what="extensions")
        self.evaluate(RECORD_RUNS)
        return self

    def extensions(self) -> list[str]:
        return self.evaluate(f"{APP}.extensions.map(e => e.name)")

    def pack_errors(self) -> list[dict]:
        """Errors the browser logged that come from the pack's JavaScript (uncaught, console.error, load failures)."""
        return [
            entry
            for entry in self.browser.console
            if entry["level"] in ("error", "exception") and (PACK_JS in entry["url"] or PACK_JS in entry["text"])
        ]

    # -- workflows ------------------------------------------------------------------------------------------

    def open_template(self, module: str, name: str, timeout: float = 120.0) -> None:
        """Open the template browser (what its menu entries run), pick ``module``'s category and click ``name``."""
        browse = f"{APP}.extensionManager.command.execute('Comfy.BrowseTemplates')"
        # The category list's entry: <li role=option aria-label=module> (frontend 1.27), <div role=button> (1.49).
        category = (
            "[...document.querySelectorAll('[role=option], [role=button]')]"
            f".find(e => (e.getAttribute('aria-label') ?? e.textContent.trim()) === {js(module)})"
        )
        card = f"document.querySelector('[data-testid={js('template-workflow-' + name)}]')"
        self.evaluate(f"{APP}.graph.extra.tloraTestStale = true")  # gone once the template replaced the graph
        # Click the card once it shows, else the category, else open the browser, again until the card shows: the
        # dialog re-renders its lists while it loads, and 1.49 drops an open that comes while the last one closes.
        self.wait_for(
            f"""((card, category) => {{
              if (card) card.click();
              else if (category) category.click();
              else {browse};
              return !!card;
            }})({card}, {category})""",
            timeout,
            what=f"template card {name} in category {module}",
        )
        self.wait_for(
            f"!{APP}.graph.extra?.tloraTestStale && {APP}.graph.nodes.length > 0"
            " && !document.querySelector('[data-testid=template-workflows-content]')",
            timeout,
            what=f"template {name} to load",
        )

    def node_types(self) -> list[str]:
        return self.evaluate(f"{APP}.graph.nodes.map(n => n.type)")

    def missing_node_types(self) -> list[str]:
        """Node types of the graph that the frontend does not know, and those its missing-nodes dialog lists."""
        return self.evaluate(
            f"""[...{APP}.graph.nodes.filter(n => !(n.type in LiteGraph.registered_node_types)).map(n => n.type),
                ...[...document.querySelectorAll('.comfy-missing-nodes .node-type')].map(e => e.textContent)]"""
        )

    def node(self, node_type: str) -> str:
        """A JavaScript expression for the first node of ``node_type``."""
        return f"{APP}.graph.nodes.find(n => n.type === {js(node_type)})"

    def set_widgets(self, values: dict[str, dict]) -> None:
        """``{node type: {widget name: value}}`` on every node of each type, as the canvas sets a value a user
        entered (then calls the widget's callback and the node's onWidgetChanged); unknown names raise."""
        missing = self.evaluate(
            f"""(() => {{
              const missing = [];
              for (const [type, widgets] of Object.entries({js(values)})) {{
                const nodes = {APP}.graph.nodes.filter(n => n.type === type);
                for (const [name, value] of Object.entries(widgets)) {{
                  let found = 0;
                  for (const node of nodes) {{
                    const w = node.widgets?.find(w => w.name === name);
                    if (!w) continue;
                    found++;
                    const old = w.value;
                    w.value = value;
                    w.callback?.(w.value, {APP}.canvas, node);
                    node.onWidgetChanged?.(name, w.value, old, w);
                  }}
                  if (!found) missing.push(`${{type}}.${{name}}`);
                }}
              }}
              {APP}.graph.setDirtyCanvas(true, true);
              return missing;
            }})()"""
        )
        if missing:
            raise BrowserError(f"no such widgets in the graph: {missing}")

    def refresh_node_definitions(self) -> None:
        """What R does: reload the node definitions, so that combos list the files saved since the page loaded."""
        self.evaluate(f"{APP}.extensionManager.command.execute('Comfy.RefreshNodeDefinitions')", 120)

    def next_frame(self) -> None:
        """Return once the page drew its next two animation frames (what was scheduled is drawn)."""
        self.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

    def fit_view(self, margin: float = 24) -> None:
        """Zoom (at most 1:1) and centre the graph in the part of the canvas no UI covers (frontend 1.49 draws
        its tab bar, side toolbar and action bar over the canvas; 1.27 beside it): from each edge, the first
        point where the canvas is what the page shows there, the median over three lines across."""
        self.evaluate(
            f"""(() => {{
              const canvas = {APP}.canvas, element = canvas.canvas, box = element.getBoundingClientRect();
              const shown = (x, y) => document.elementFromPoint(x, y) === element;
              const first = (from, to, isCanvas) => {{
                for (let v = from; from < to ? v < to : v > to; v += from < to ? 2 : -2) if (isCanvas(v)) return v;
                return from;
              }};
              const median = (at) => [0.25, 0.5, 0.75].map(at).sort((a, b) => a - b)[1];
              const left = median(f => first(box.left, box.right, x => shown(x, box.top + f * box.height)));
              const right = median(f => first(box.right - 1, box.left, x => shown(x, box.top + f * box.height)));
              const top = median(f => first(box.top, box.bottom, y => shown(box.left + f * box.width, y)));
              const bottom = median(f => first(box.bottom - 1, box.top, y => shown(box.left + f * box.width, y)));
              const title = LiteGraph.NODE_TITLE_HEIGHT;
              const nodes = {APP}.graph.nodes;
              const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - title));
              const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));
              const y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
              const width = right - left - 2 * {margin}, height = bottom - top - 2 * {margin};
              const scale = Math.min(width / (x1 - x0), height / (y1 - y0), 1);
              canvas.ds.scale = scale;
              canvas.ds.offset[0] = (left - box.left + {margin} + (width - (x1 - x0) * scale) / 2) / scale - x0;
              canvas.ds.offset[1] = (top - box.top + {margin} + (height - (y1 - y0) * scale) / 2) / scale - y0;
              canvas.setDirty(true, true);
            }})()"""
        )

    def node_rect(self, node_type: str) -> dict:
        """Where the first ``node_type`` node is on the page, title included: {x, y, width, height} in CSS px."""
        return self.evaluate(
            f"""(() => {{
              const node = {self.node(node_type)}, canvas = {APP}.canvas;
              const box = canvas.canvas.getBoundingClientRect(), scale = canvas.ds.scale;
              const [x, y] = canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT]);
              return {{ x: box.x + x, y: box.y + y, width: node.size[0] * scale,
                        height: (node.size[1] + LiteGraph.NODE_TITLE_HEIGHT) * scale }};
            }})()"""
        )

    # -- running --------------------------------------------------------------------------------------------

    def queue(self, timeout: float = 60.0) -> int:
        """Queue the graph as the Run button does; returns the index of its run record."""
        start = self.evaluate("window.tloraTestRuns.length")
        self.evaluate(f"{APP}.queuePrompt(0, 1)", timeout)
        return start

    def wait_run(self, since: int = 0, timeout: float = 600.0) -> dict:
        """The first finished run after record ``since``, once the server reported its queue empty (the page shows
        it idle); BrowserError with the node's error if it failed."""
        done = f"window.tloraTestRuns.slice({since}).find(r => r.type !== 'execution_start')"
        run = self.wait_for(f"{done} ?? null", timeout, what="the queued workflow to finish")
        if run["type"] != "execution_success":
            raise BrowserError(f"run ended with {run['type']}: {json.dumps(run)[:2000]}")
        self.wait_for("window.tloraTestQueue === 0", timeout, what="the server's queue to empty")
        return run


# -- the example workflows on the tiny checkpoint ---------------------------------------------------------------


def write_training_images(folder: Path, count: int = 2, size: int = 64) -> Path:
    """``count`` noise images with a caption beside each: what train_tlora.json reads from input/my_subject."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of my_subject, view {i}")
    return folder


def tiny_train_widgets(checkpoint: str, steps: int, output_name: str, preview_every: int = 0) -> dict[str, dict]:
    """train_tlora.json's widgets for a short run at 64 px on ``checkpoint``."""
    train = {"steps": steps, "save_every": 0, "output_name": output_name, "overwrite": True}
    return {
        "CheckpointLoaderSimple": {"ckpt_name": checkpoint},
        "TLoRALoadTrainingImages": {"width": 64, "height": 64},
        "TLoRATrain": {**train, "preview_every": preview_every},
        "EmptyLatentImage": {"width": 64, "height": 64},
        "KSampler": {"steps": 2},
    }


def tiny_sd35_widgets(
    unet: str, clip: str, vae: str, steps: int, output_name: str, preview_every: int = 0
) -> dict[str, dict]:
    """train_tlora_sd35.json's widgets for a short run at 64 px on the tiny SD3.5 model, CLIP-L and VAE files."""
    train = {"steps": steps, "save_every": 0, "output_name": output_name, "overwrite": True}
    return {
        "UNETLoader": {"unet_name": unet},
        "CLIPLoader": {"clip_name": clip},
        "VAELoader": {"vae_name": vae},
        "TLoRALoadTrainingImages": {"width": 64, "height": 64},
        "TLoRATrain": {**train, "preview_every": preview_every},
        "EmptySD3LatentImage": {"width": 64, "height": 64},
        "KSampler": {"steps": 2},
    }


def chart_state(page: ComfyPage) -> dict:
    """The Train TLoRA node's loss chart: its points, status line, and how many of its canvas pixels are
    drawn in the curve's colors (``smooth``: the orange EMA line, ``raw``: the blue points)."""
    return page.evaluate(
        f"""(() => {{
          const chart = {page.node("TLoRATrain")}.tloraLossChart;
          const {{ width, height }} = chart.canvas;
          const pixels = width && height ? chart.canvas.getContext("2d").getImageData(0, 0, width, height).data : [];
          let smooth = 0, raw = 0;
          for (let i = 0; i < pixels.length; i += 4) {{
            const [r, g, b] = [pixels[i], pixels[i + 1], pixels[i + 2]];
            if (r > 220 && g > 140 && g < 210 && b < 120) smooth++;
            else if (b > 180 && r < 170 && g > 130) raw++;
          }}
          return {{ points: chart.points, status: chart.status.textContent, width, height, smooth, raw }};
        }})()"""
    )
