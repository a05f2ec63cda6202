"""ComfyUI glue: every touch of the host's API lives in this package."""

import os

import folder_paths
from comfy_api.latest import ComfyExtension, io

from . import routes, weight_adapters
from .apply import NODES as APPLY_NODES
from .dataset import NODES as DATASET_NODES
from .export import NODES as EXPORT_NODES
from .plot import NODES as PLOT_NODES
from .train import NODES as TRAIN_NODES

weight_adapters.register()
routes.register()  # GET /tlora/info for the web extension; nothing without a server
# A dedicated models/tlora folder, listed with the loras (the stock LoRA loader sees it too).
folder_paths.add_model_folder_path("loras", os.path.join(folder_paths.models_dir, "tlora"))


class TLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*APPLY_NODES, *TRAIN_NODES, *DATASET_NODES, *EXPORT_NODES, *PLOT_NODES]


async def comfy_entrypoint() -> TLoRAExtension:
    return TLoRAExtension()
