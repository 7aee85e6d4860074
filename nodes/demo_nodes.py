"""The demo model's loader: a small trained SD1.5-class digits model shipped with the pack."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from . import demo_model


class PSODemoModelLoader(io.ComfyNode):
    """MODEL, CLIP and VAE of the shipped demo model (see ``nodes/demo_model.py``)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PSODemoModelLoader",
            display_name="PSO Demo Model (digits, 4-step)",
            category="PSO/demo",
            description=(
                "Loads the small demo model that ships with comfyui-pso: an SD1.5-class text-to-image "
                "model of 32x32 handwritten digits ('a handwritten digit 3'), distilled to 4 steps "
                "(PSO Few-Step Sigmas 'dmd2', sampler 'lcm', CFG 1). It runs through ComfyUI's own "
                "classes, so CLIPTextEncode, KSampler, VAEDecode and LoraLoader work on it; use it "
                "in place of Load Checkpoint to try PSO on a CPU in minutes."
            ),
            inputs=[],
            outputs=[
                io.Model.Output(display_name="MODEL",
                                tooltip="The 4-step digits diffusion model (SD1.5-class UNet, eps)."),
                io.Clip.Output(display_name="CLIP",
                               tooltip="Its text encoder (SD1 CLIP, shrunken) for CLIPTextEncode."),
                io.Vae.Output(display_name="VAE",
                              tooltip="Its TAESD-shaped VAE: 32x32 RGB images <-> 4x4x4 latents."),
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        model, clip, vae = demo_model.load_bundle()
        return io.NodeOutput(model, clip, vae)
