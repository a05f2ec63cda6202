"""TLoRA Loss Plot: the training loss (LOSS_MAP) as an IMAGE; the drawing is ``tlora/plot.py``."""

from __future__ import annotations

from comfy_api.latest import io

from ..tlora.plot import LOG_SCALES, draw_loss, image_tensor, losses_of
from .folders import TRAINING_CATEGORY


class LossPlot(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRALossPlot",
            display_name="TLoRA Loss Plot",
            category=TRAINING_CATEGORY,
            description="Draw a training loss history as an image: raw points, a smoothed curve, the last loss.",
            inputs=[
                io.LossMap.Input("loss"),
                io.Float.Input("smoothing", default=0.9, min=0.0, max=0.999, step=0.001, tooltip="EMA factor."),
                io.Combo.Input(
                    "log_scale",
                    options=LOG_SCALES,
                    default="auto",
                    tooltip="auto: log when all losses are positive and span more than a factor of 50.",
                ),
                io.Int.Input("width", default=768, min=128, max=4096),
                io.Int.Input("height", default=384, min=96, max=4096),
            ],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, loss, smoothing=0.9, log_scale="auto", width=768, height=384) -> io.NodeOutput:
        smoothing = min(max(float(smoothing), 0.0), 0.999)
        width, height = max(int(width), 128), max(int(height), 96)
        return io.NodeOutput(image_tensor(draw_loss(losses_of(loss), smoothing, log_scale, width, height)))


NODES = [LossPlot]
