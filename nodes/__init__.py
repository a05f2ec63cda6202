"""ComfyUI glue: every touch of the host's API lives in this package."""

from comfy_api.latest import ComfyExtension, io


class TLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []


async def comfy_entrypoint() -> TLoRAExtension:
    return TLoRAExtension()
