"""The demo's nodes: the small trained SD1.5-class digits model and its target images (shipped)."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..pso import images as target_images
from . import demo_model, target_nodes
from .types import TARGETS_TYPE, TargetSet


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


#: The demo's target images shipped with the pack: bold handwritten digits (strokes one pixel wider
#: than the demo model's training digits), 4 per digit, 32x32 PNG, each with its caption
#: ``<image>.txt`` ("a handwritten digit 3"). Written by ``python -m tools.demo_template --targets``.
DEMO_TARGETS = demo_model.WEIGHTS_PATH.parent / "bold_digits"


class PSODemoTargets(io.ComfyNode):
    """The demo's target images (bold digits), shipped with the pack: no folder to create."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PSODemoTargets",
            display_name="PSO Demo Targets (bold digits)",
            category="PSO/demo",
            description=(
                "The target images of the PSO demo, shipped with comfyui-pso: 40 bold handwritten digits "
                "(strokes one pixel wider than the demo model draws them; 4 per digit, 32x32) captioned "
                "'a handwritten digit 3' etc. It works like PSO Target Images (folder) on a folder you "
                "would otherwise have to create: connect the VAE of PSO Demo Model (digits, 4-step)."
            ),
            inputs=[
                io.Vae.Input("vae", tooltip="The demo model's VAE (PSO Demo Model): it encodes the 40 target "
                                            "images into the model's latent space, once."),
            ],
            outputs=[
                TARGETS_TYPE.Output(display_name="targets",
                                    tooltip="The encoded bold digits with their captions, for PSO Sample "
                                    "References and PSO Build Pairs."),
                io.Image.Output(display_name="images",
                                tooltip="The 40 target images as loaded (32x32): connect Preview Image to "
                                "see the style PSO trains toward."),
            ],
        )

    @classmethod
    def execute(cls, vae) -> io.NodeOutput:
        files = target_images.list_images(DEMO_TARGETS)
        prompts = target_images.read_prompts(files, "")
        pixels = target_nodes.load_folder_images(files, 0)
        latents = target_nodes.encode_targets(vae, pixels, fix="The shipped demo targets are 32x32.")
        return io.NodeOutput(TargetSet(latents, prompts, [f.name for f in files]), pixels)
