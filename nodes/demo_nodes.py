"""The demo's nodes: the small trained SD1.5-class demo models (digits, shapes) and their target images
(shipped)."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..pso import images as target_images
from . import demo_model, target_nodes
from .types import TARGETS_TYPE, TargetSet

#: PSODemoModelLoader's ``model`` choices -> weights file. "digits" first: workflows saved before the
#: input existed load the digits model, as they did.
DEMO_MODELS = {"digits": demo_model.WEIGHTS_PATH, "shapes": demo_model.SHAPES_WEIGHTS_PATH}


class PSODemoModelLoader(io.ComfyNode):
    """MODEL, CLIP and VAE of a shipped demo model (see ``nodes/demo_model.py``)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PSODemoModelLoader",
            display_name="PSO Demo Model (4-step)",
            category="PSO/demo",
            description=(
                "Loads a small demo model that ships with comfyui-pso: an SD1.5-class text-to-image "
                "model of 32x32 images, distilled to 4 steps (PSO Few-Step Sigmas 'dmd2', sampler 'lcm', "
                "CFG 1): handwritten digits ('a handwritten digit 3') or coloured shapes ('a red circle'; "
                "4 shapes x 6 colours). It runs through ComfyUI's own classes, so CLIPTextEncode, "
                "KSampler, VAEDecode and LoraLoader work on it; use it in place of Load Checkpoint to "
                "try PSO on a CPU in minutes."
            ),
            inputs=[
                io.Combo.Input("model", options=list(DEMO_MODELS), default="digits", optional=True,
                               tooltip="digits: 'a handwritten digit 3' (0-9). shapes: 'a red circle' "
                               "(circle, square, triangle, cross in red, green, blue, yellow, magenta, "
                               "cyan); its targets are PSO Demo Targets 'striped shapes'."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL",
                                tooltip="The 4-step diffusion model (SD1.5-class UNet, eps)."),
                io.Clip.Output(display_name="CLIP",
                               tooltip="Its text encoder (SD1 CLIP, shrunken) for CLIPTextEncode."),
                io.Vae.Output(display_name="VAE",
                              tooltip="Its TAESD-shaped VAE: 32x32 RGB images <-> 4x4x4 latents."),
            ],
        )

    @classmethod
    def execute(cls, model: str = "digits") -> io.NodeOutput:
        if model not in DEMO_MODELS:
            raise ValueError(f"PSO Demo Model: unknown model {model!r}; choose one of {list(DEMO_MODELS)}")
        unet, clip, vae = demo_model.load_bundle(DEMO_MODELS[model])
        vae.pso_demo_model = model  # PSO Demo Targets refuses the other model's targets
        return io.NodeOutput(unet, clip, vae)


#: The demo's target images shipped with the pack: bold handwritten digits (strokes one pixel wider
#: than the demo model's training digits), 4 per digit, 32x32 PNG, each with its caption
#: ``<image>.txt`` ("a handwritten digit 3"). Written by ``python -m tools.demo_template --targets``.
DEMO_TARGETS = demo_model.WEIGHTS_PATH.parent / "bold_digits"
#: The shapes model's targets: its shapes filled with diagonal stripes (period 8 px, one phase for
#: every image), 2 per caption, 32x32 PNG with captions ("a red circle").
DEMO_SHAPE_TARGETS = demo_model.WEIGHTS_PATH.parent / "striped_shapes"
#: PSODemoTargets' ``targets`` choices -> (folder, the demo model it is captioned for). "bold digits"
#: first (workflows saved before the choice existed).
DEMO_TARGET_SETS = {"bold digits": (DEMO_TARGETS, "digits"), "striped shapes": (DEMO_SHAPE_TARGETS, "shapes")}


class PSODemoTargets(io.ComfyNode):
    """A demo's target images (bold digits or striped shapes), shipped with the pack: no folder to create."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PSODemoTargets",
            display_name="PSO Demo Targets",
            category="PSO/demo",
            description=(
                "The target images of the PSO demo, shipped with comfyui-pso: 40 bold handwritten digits "
                "(strokes one pixel wider than the digits model draws them; 4 per digit, 32x32) captioned "
                "'a handwritten digit 3' etc., or 48 striped shapes (the shapes model's shapes filled "
                "with diagonal stripes; 2 per caption) captioned 'a red circle' etc. It works like PSO "
                "Target Images (folder) on a folder you would otherwise have to create: connect the VAE "
                "of PSO Demo Model with the matching model."
            ),
            inputs=[
                io.Vae.Input("vae", tooltip="The demo model's VAE (PSO Demo Model): it encodes the target "
                                            "images into the model's latent space, once."),
                io.Combo.Input("targets", options=list(DEMO_TARGET_SETS), default="bold digits",
                               optional=True,
                               tooltip="bold digits: for PSO Demo Model 'digits'. striped shapes: for PSO "
                               "Demo Model 'shapes'."),
            ],
            outputs=[
                TARGETS_TYPE.Output(display_name="targets",
                                    tooltip="The encoded bold digits with their captions, for PSO Sample "
                                    "References and PSO Build Pairs."),
                io.Image.Output(display_name="images",
                                tooltip="The target images as loaded (32x32): connect Preview Image to "
                                "see the style PSO trains toward."),
            ],
        )

    @classmethod
    def execute(cls, vae, targets: str = "bold digits") -> io.NodeOutput:
        if targets not in DEMO_TARGET_SETS:
            raise ValueError(f"PSO Demo Targets: unknown targets {targets!r}; choose one of "
                             f"{list(DEMO_TARGET_SETS)}")
        folder, for_model = DEMO_TARGET_SETS[targets]
        loaded = getattr(vae, "pso_demo_model", None)
        if loaded is not None and loaded != for_model:
            want = next(k for k, (_, m) in DEMO_TARGET_SETS.items() if m == loaded)
            raise ValueError(
                f"PSO Demo Targets: targets {targets!r} are captioned for the {for_model} demo "
                f"model, but the VAE comes from PSO Demo Model {loaded!r}: the references would be sampled "
                f"from captions that model never learnt. Choose targets {want!r} here, or model "
                f"{for_model!r} in PSO Demo Model.")
        files = target_images.list_images(folder)
        prompts = target_images.read_prompts(files, "")
        pixels = target_nodes.load_folder_images(files, 0)
        latents = target_nodes.encode_targets(vae, pixels, fix="The shipped demo targets are 32x32.")
        return io.NodeOutput(TargetSet(latents, prompts, [f.name for f in files]), pixels)
