"""comfyui-pso: Pairwise Sample Optimization for timestep-distilled diffusion models in ComfyUI.

ComfyUI imports this file as a custom-node package. Nothing device- or model-related happens at
import time: the node classes are imported when the host asks for them through the V3 entry point,
so a problem in one optional feature cannot stop the host from starting.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """V3 entry point: ComfyUI calls this to get the extension and its node list."""
    from .nodes import PSOExtension, picker_routes
    from .nodes.monitor import register_routes

    # HTTP routes, on the running server only (ComfyUI loads packs before it starts serving)
    register_routes()  # the training monitor's
    picker_routes.register_with_server()  # the pair picker's
    return PSOExtension()
