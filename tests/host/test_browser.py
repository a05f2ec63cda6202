"""The pack's web extension in a real ComfyUI frontend, in headless Chromium: its JavaScript loads cleanly,
the example workflows open from the template browser with every node known, the Apply TLoRA info panel
describes the chosen file, and the loss chart draws while Train TLoRA trains.

Needs Chromium (``$CHROMIUM`` or ``chromium`` on PATH); skipped, with the reason in the summary, without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.comfyui_host import REPO_ROOT

from .browser import Browser, find_chromium
from .test_routes import write_adapter
from .ui import PACK_EXTENSIONS, ComfyPage, chart_state, tiny_train_widgets, write_training_images

EXAMPLES = REPO_ROOT / "example_workflows"
TRAIN_STEPS = 4


@pytest.fixture(scope="module")
def chromium() -> str:
    path, reason = find_chromium()
    if path is None:
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def page(chromium, comfy_server):
    with Browser(chromium, width=1600, height=900, timeout=120) as browser:
        yield ComfyPage(browser, comfy_server.url).open()


def example_node_types(name: str) -> set[str]:
    return {n["type"] for n in json.loads((EXAMPLES / f"{name}.json").read_text())["nodes"]}


def test_pack_javascript_loads_without_errors(page, comfy_server):
    assert set(PACK_EXTENSIONS) <= set(page.extensions())
    served = page.evaluate("fetch('/extensions').then(r => r.json())")
    assert {Path(url).name for url in served if "/comfyui-tlora/" in url} == {"loss_chart.js", "adapter_info.js"}
    assert page.pack_errors() == []
    # ComfyUI 0.33 logs each deprecated frontend module a page imports (scripts/ui*, extensions/core/*).
    assert [line for line in comfy_server.log_lines() if "deprecated legacy API" in line] == []


@pytest.mark.parametrize("name", ["apply_tlora", "train_tlora", "train_tlora_sd35"])
def test_example_workflow_opens_from_the_template_browser(page, comfy_server, name):
    page.open_template(comfy_server.pack_dir_name, name)
    assert set(page.node_types()) == example_node_types(name)
    assert page.missing_node_types() == []
    assert page.pack_errors() == []


def test_info_panel_describes_the_chosen_adapter(page, comfy_server):
    write_adapter(comfy_server.loras_dir / "test_browser" / "panel.safetensors", method="tlora_star", steps=11)
    page.open_template(comfy_server.pack_dir_name, "apply_tlora")
    panel = f"{page.node('TLoRAApply')}.tloraAdapterInfo"
    page.set_widgets({"TLoRAApply": {"adapter_name": "test_browser/panel.safetensors"}})
    page.wait_for(f"{panel}.info && {panel}.name === 'test_browser/panel.safetensors'", what="the info panel")
    page.next_frame()
    text, overflow = page.evaluate(
        f"[{panel}.element.innerText, {panel}.element.scrollHeight - {panel}.element.clientHeight]"
    )
    assert "tlora_star" in text and "11 steps on SD15" in text and "attention" in text and "2 layers" in text, text
    assert overflow <= 0, "the panel's rows do not fit in it"

    page.set_widgets({"TLoRAApply": {"adapter_name": "test_browser/gone.safetensors"}})
    page.wait_for(f"{panel}.info?.error", what="the info panel's error")
    assert "gone.safetensors is not in ComfyUI's loras folders" in page.evaluate(f"{panel}.element.innerText")
    assert page.pack_errors() == []


def test_info_panel_follows_the_choice_in_nodes_2(chromium, comfy_server):
    """Nodes 2.0, the opt-in design that draws nodes in the DOM, calls no onDrawForeground: the panel follows
    the workflow's file (configure) and a new choice (the widget's callback) all the same."""
    write_adapter(comfy_server.loras_dir / "test_browser" / "nodes2.safetensors", method="tlora", steps=7)
    with Browser(chromium, width=1600, height=900, timeout=120) as browser:
        page = ComfyPage(browser, comfy_server.url).open({"Comfy.VueNodes.Enabled": True})
        page.open_template(comfy_server.pack_dir_name, "apply_tlora")
        panel = f"{page.node('TLoRAApply')}.tloraAdapterInfo"
        if not page.evaluate(f"!!document.querySelector('[data-node-id]') && {panel}.element.isConnected"):
            pytest.skip("this frontend's Nodes 2.0 shows no DOM widgets (experimental in frontend 1.27)")
        page.wait_for(f"{panel}.info && {panel}.name === 'my_tlora.safetensors'", what="the workflow's file")
        page.set_widgets({"TLoRAApply": {"adapter_name": "test_browser/nodes2.safetensors"}})
        page.wait_for(f"{panel}.info && {panel}.name === 'test_browser/nodes2.safetensors'", what="the info panel")
        text = page.evaluate(f"{panel}.element.innerText")
        assert "tlora" in text and "7 steps on SD15" in text, text
        assert page.pack_errors() == []


def test_loss_chart_draws_while_training(page, comfy_server, tiny_checkpoint):
    write_training_images(comfy_server.input_dir / "my_subject")
    page.open_template(comfy_server.pack_dir_name, "train_tlora")
    page.set_widgets(tiny_train_widgets(tiny_checkpoint.name, TRAIN_STEPS, "test_browser/chart_run", preview_every=2))
    since = page.queue()

    chart = f"{page.node('TLoRATrain')}.tloraLossChart"
    page.wait_for(f"{chart}.points.length >= 1", timeout=600, what="the first progress message")
    page.next_frame()
    midway = chart_state(page)
    still_running = page.evaluate(f"!window.tloraTestRuns.slice({since}).some(r => r.type !== 'execution_start')")
    page.wait_run(since, timeout=600)
    page.wait_for(f"{chart}.points.length === {TRAIN_STEPS}", what="every step on the chart")
    page.next_frame()
    final = chart_state(page)

    assert still_running and 1 <= len(midway["points"]) <= TRAIN_STEPS
    assert f"/{TRAIN_STEPS}" in midway["status"] and midway["raw"] > 0, midway
    assert [step for step, _ in final["points"]] == list(range(1, TRAIN_STEPS + 1))
    assert all(loss > 0 for _, loss in final["points"])
    assert final["status"].startswith(f"step {TRAIN_STEPS}/{TRAIN_STEPS}") and "done" in final["status"]
    assert final["width"] > 100 and final["height"] > 100
    assert final["smooth"] > 50 and final["raw"] >= TRAIN_STEPS, final  # the curve and the points
    assert page.evaluate(f"{chart}.previewStep") == TRAIN_STEPS  # the last preview; its image is ComfyUI's
    assert page.evaluate(f"{page.node('TLoRATrain')}.imgs?.length") == 1
    assert (comfy_server.loras_dir / "test_browser" / "chart_run.safetensors").is_file()
    assert page.pack_errors() == []
