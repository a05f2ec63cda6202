"""Regenerate the README's screenshots (docs/img/*.png) and the template browser's thumbnails
(example_workflows/*.jpg) from a real run of the example workflows in ComfyUI, with the code of the
browser tests (tests/host/): ComfyUI with only this pack, headless Chromium, the tiny test checkpoints.

    COMFYUI_PATH=/path/to/ComfyUI CHROMIUM=/path/to/chromium /path/to/ComfyUI/venv/bin/python docs/screenshots.py

Train TLoRA trains ``--steps`` steps on two noise images, with four previews; Apply TLoRA then applies the
file it saved; the SD3.5 template trains as many steps on the tiny SD3.5 model (its thumbnail only). The models
have random weights: the images are noise, the loss is real.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from host.browser import Browser, find_chromium  # noqa: E402
from host.ui import ComfyPage, tiny_sd35_widgets, tiny_train_widgets, write_training_images  # noqa: E402

from tools import comfyui_host as comfyhost  # noqa: E402

IMG = REPO / "docs" / "img"
THUMBNAILS = REPO / "example_workflows"
VIEWPORT = (2000, 1000)
THUMBNAIL = 480  # px, square: the template browser's cards
# Full-detail nodes at the zoom that fits a whole example workflow.
SETTINGS = {"LiteGraph.Canvas.MinFontSizeForLOD": 0}


def settle(page: ComfyPage) -> None:
    """After a run: wait until Save Image shows its image, then give the page's queue display (it fetches the
    queue after the server's status message) a moment; fit the graph in view."""
    images = f"{page.node('SaveImage')}.imgs"
    page.wait_for(f"{images}?.length > 0 && {images}.every(image => image.complete)", what="the image on Save Image")
    time.sleep(2)
    page.fit_view()
    page.next_frame()


def save_png(png: bytes, path: Path) -> None:
    """A screenshot as a 256-colour PNG (a fifth of the size; UI colours are flat)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    print(f"{path.relative_to(REPO)}: {path.stat().st_size // 1024} KB")


def save_thumbnail(page: ComfyPage, node_type: str, path: Path) -> None:
    """A square JPEG around the first ``node_type`` node, as the template browser shows it."""
    from PIL import Image

    rect = page.node_rect(node_type)
    x, y, w, h = rect["x"], rect["y"], rect["width"], rect["height"]
    side = min(max(w, h) + 40, *VIEWPORT)
    left = min(max(0, x + w / 2 - side / 2), VIEWPORT[0] - side)
    top = min(max(0, y + h / 2 - side / 2), VIEWPORT[1] - side)
    clip = {"x": left, "y": top, "width": side, "height": side}
    image = Image.open(io.BytesIO(page.browser.screenshot(clip=clip))).convert("RGB")
    image.resize((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS).save(path, quality=85, optimize=True)
    print(f"{path.relative_to(REPO)}: {path.stat().st_size // 1024} KB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="training steps of the Train TLoRA run")
    args = parser.parse_args()
    comfy_path, why = comfyhost.find_comfyui()
    chromium, why_not = find_chromium()
    if comfy_path is None or chromium is None:
        print(why or why_not, file=sys.stderr)
        return 2
    comfyhost.import_host(comfy_path)
    from host.families import FAMILIES, write_family
    from host.server import ComfyServer

    from tools.tiny_checkpoints import write_clip_l, write_taesd3, write_tiny_sd15

    with tempfile.TemporaryDirectory(prefix="tlora-screenshots-") as tmp:
        models = Path(tmp) / "models"
        checkpoint = write_tiny_sd15(models / "checkpoints" / "tiny_sd15.safetensors", comfy_path)
        sd35 = (
            write_family(FAMILIES["sd35"], models / "diffusion_models" / "tiny_sd35.safetensors"),
            write_clip_l(models / "text_encoders" / "tiny_clip_l.safetensors", comfy_path),
            write_taesd3(models / "vae" / "tiny_taesd3.safetensors"),
        )
        server = ComfyServer(comfy_path, REPO, Path(tmp) / "server", models).start(timeout=300)
        try:
            write_training_images(server.input_dir / "my_subject")
            with Browser(chromium, *VIEWPORT, timeout=120) as browser:
                page = ComfyPage(browser, server.url).open(SETTINGS)

                page.open_template(server.pack_dir_name, "train_tlora")
                page.set_widgets(tiny_train_widgets(checkpoint.name, args.steps, "my_subject", args.steps // 4))
                page.wait_run(page.queue(), timeout=1800)
                settle(page)
                save_png(browser.screenshot(), IMG / "train_tlora.png")
                save_thumbnail(page, "TLoRATrain", THUMBNAILS / "train_tlora.jpg")

                page.refresh_node_definitions()  # the file just trained, in Apply TLoRA's list
                page.open_template(server.pack_dir_name, "apply_tlora")
                page.set_widgets(
                    {
                        "CheckpointLoaderSimple": {"ckpt_name": checkpoint.name},
                        "TLoRAApply": {"adapter_name": "my_subject.safetensors"},
                        "EmptyLatentImage": {"width": 64, "height": 64},
                        "KSampler": {"steps": 2},
                    }
                )
                page.wait_run(page.queue(), timeout=600)
                page.wait_for(f"{page.node('TLoRAApply')}.tloraAdapterInfo.info", what="the info panel")
                settle(page)
                save_png(browser.screenshot(), IMG / "apply_tlora.png")
                save_thumbnail(page, "TLoRAApply", THUMBNAILS / "apply_tlora.jpg")

                page.open_template(server.pack_dir_name, "train_tlora_sd35")
                names = [path.name for path in sd35]
                page.set_widgets(tiny_sd35_widgets(*names, args.steps, "my_subject_sd35", args.steps // 4))
                page.wait_run(page.queue(), timeout=1800)
                page.fit_view()
                page.next_frame()
                save_thumbnail(page, "TLoRATrain", THUMBNAILS / "train_tlora_sd35.jpg")
                if page.pack_errors():
                    print(f"errors from the pack's JavaScript: {page.pack_errors()}", file=sys.stderr)
                    return 1
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
