"""Saved LoRA files read by diffusers, an independent reader of kohya files.

The tiny fixture UNets (ComfyUI's own classes) are converted to diffusers ``UNet2DConditionModel``s
with diffusers' single-file checkpoint converter, and each conversion is first shown to reproduce the
ComfyUI UNet's raw output. A LoRA file written by PSO Save LoRA is then loaded with a tiny diffusers
pipeline's ``load_lora_weights`` (the call a diffusers user makes), and checked three ways:

- diffusers consumes every key and warns about nothing (unexpected / missing keys, unconverted names);
- every module in the file becomes a peft LoRA layer on the very diffusers module whose base weight
  is the ComfyUI weight the LoRA was made for, with the same delta ``B @ A * scaling``;
- the diffusers UNet with the LoRA gives ComfyUI's LoraLoader output, to a tolerance far below the
  LoRA's own effect (a floor on that effect is asserted first, so a near-zero LoRA cannot pass).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors
import torch
from tiny_training import train_lora

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: the diffusers reader check "
                                "needs `pip install diffusers`")
pytest.importorskip("peft", reason="peft is not installed: diffusers loads LoRAs through peft "
                    "(`pip install peft`)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (diffusers "
                                   "pipelines need its CLIP classes)")

# The tiny fixture (tests/fixtures/pso_test_fixtures/tiny_models.py): model_channels 32, channel_mult
# [1, 2], one res block and one transformer block per level, 16 channels per attention head. diffusers'
# `attention_head_dim` is (for these UNets) the number of heads per block: 32 / 16 and 64 / 16, as
# diffusers' own create_unet_diffusers_config_from_ldm derives it from num_head_channels.
_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "attention_head_dim": (2, 4),
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
DIFFUSERS_UNET = {
    "sd15": {**_UNET, "cross_attention_dim": 32, "use_linear_projection": False},
    # SDXL: y = pooled CLIP-G projection (32) + 6 size conditions x 256 (ComfyUI's encode_adm).
    "sdxl": {**_UNET, "cross_attention_dim": 64, "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 32 + 6 * 256},
}


# --------------------------------------------------------------------------------------------
# Both sides of the comparison
# --------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """One raw UNet call: latents, timesteps, text context and (SDXL) pooled text + size conditions."""

    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None


def _inputs(family: str) -> Inputs:
    g = torch.Generator().manual_seed(11)
    width = DIFFUSERS_UNET[family]["cross_attention_dim"]
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, width, generator=g)
    t = torch.tensor([801.0, 137.0])
    if family == "sd15":
        return Inputs(x, t, context)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [48.0, 80.0, 8.0, 0.0, 64.0, 64.0]])
    return Inputs(x, t, context, torch.randn(2, 32, generator=g), time_ids)


def _comfy_out(model, inp: Inputs) -> torch.Tensor:
    """The raw ``diffusion_model`` output of a ModelPatcher, loaded (patched) by the host as for sampling."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model], force_full_load=True)
    y = None
    if inp.pooled is not None:  # SDXL's ADM vector, as comfy.model_base.SDXL.encode_adm builds it
        sizes = model.model.embedder(inp.time_ids.flatten()).reshape(inp.x.shape[0], -1)
        y = torch.cat([inp.pooled, sizes], dim=1)
    with torch.no_grad():
        return model.model.diffusion_model(inp.x, timesteps=inp.t, context=inp.context, y=y).float().clone()


def _diffusers_out(unet, inp: Inputs) -> torch.Tensor:
    kwargs = {}
    if inp.pooled is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": inp.pooled, "time_ids": inp.time_ids}
    with torch.no_grad():
        return unet(inp.x, inp.t, encoder_hidden_states=inp.context, **kwargs).sample.float()


def _base_weights(model) -> dict[str, torch.Tensor]:
    """The UNet state dict of ``model`` itself. The host patches LoRA weights into the module that all
    clones share, so ``model`` is loaded first (which undoes another clone's patches)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model], force_full_load=True)
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def _diffusers_unet(family: str, model):
    """The fixture's UNet as a diffusers model, its weights converted by diffusers' own converter."""
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    config = DIFFUSERS_UNET[family]
    checkpoint = {LDM_UNET_KEY + k: v for k, v in _base_weights(model).items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(config))
    unet = diffusers.UNet2DConditionModel(**config)
    unet.load_state_dict(converted, strict=True)  # every weight converted, none left over
    return unet.eval()


def _pipeline(family: str, unet):
    """A tiny diffusers pipeline around ``unet``: random CLIP text encoders with the SD tokenizer that
    ComfyUI ships, a small AutoencoderKL, an Euler scheduler; built offline."""
    text = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
            "num_hidden_layers": 2, "projection_dim": 32, "max_position_embeddings": 77}
    import comfy.sd1_clip

    vocab = Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer"  # the CLIP tokenizer the host ships
    tokenizer = transformers.CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"))
    vae = diffusers.AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32)
    scheduler = diffusers.EulerDiscreteScheduler(steps_offset=1)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text))
    if family == "sd15":
        return diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        text_encoder_2=transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**text)),
        tokenizer_2=tokenizer)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


#: What diffusers says, as a warning, for a file with no text-encoder LoRA (PSO trains the UNet only):
#: the one warning a UNet-only file is expected to give, per text encoder of the pipeline.
NO_TEXT_ENCODER_LORA = "No LoRA keys associated to CLIPTextModel"


def _load_with_diffusers(pipe, path: Path) -> list[str]:
    """``pipe.load_lora_weights(file)``; returns every warning diffusers, peft or Python raised, except
    the one saying that the (UNet-only) file has no text-encoder LoRA, which is checked against the file."""
    records = _Records()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]  # diffusers does not propagate
    for lg in loggers:
        lg.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path), adapter_name="pso")
    finally:
        for lg in loggers:
            lg.removeHandler(records)
    warned = records.messages + [f"{w.category.__name__}: {w.message}" for w in caught]
    if any(NO_TEXT_ENCODER_LORA in w for w in warned):
        assert all(k.startswith("lora_unet_") for k in _file_modules(path))
    return [w for w in warned if NO_TEXT_ENCODER_LORA not in w]


def _peft_layers(unet) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in unet.named_modules() if isinstance(m, LoraLayer)}


def _delta(up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    """A LoRA's weight change ``up @ down * scale`` (convs flattened to matrices)."""
    return (up.flatten(1).double() @ down.flatten(1).double()) * scale


def _check_peft_layers_match_the_lora(unet, model, lora: dict[str, torch.Tensor]) -> int:
    """Each peft layer sits on the diffusers module whose base weight *is* a ComfyUI weight that the
    LORA_MODEL trained (found by value, so independent of any naming), with that module's delta.
    Returns the number of layers matched; every LoRA module must be matched exactly once."""
    state = _base_weights(model)
    ldm = {k[:-len(".weight")]: w for k, w in state.items() if k.endswith(".weight") and w.ndim >= 2}
    up_suffix = ".lora_up.weight"
    trained = {k[len("diffusion_model."):-len(up_suffix)] for k in lora if k.endswith(up_suffix)}
    seen: dict[str, str] = {}
    for name, layer in _peft_layers(unet).items():
        base = layer.get_base_layer().weight
        owners = [p for p, w in ldm.items() if w.shape == base.shape and torch.equal(w, base)]
        assert len(owners) == 1, f"diffusers module {name} matches ComfyUI weights {owners}"
        path = owners[0]
        assert path in trained and path not in seen, (name, path, seen.get(path))
        seen[path] = name
        a, b = layer.lora_A["pso"].weight, layer.lora_B["pso"].weight
        got = _delta(b, a, layer.scaling["pso"])
        key = f"diffusion_model.{path}"
        down, up = lora[f"{key}.lora_down.weight"], lora[f"{key}.lora_up.weight"]
        alpha = float(lora.get(f"{key}.alpha", torch.tensor(float(down.shape[0]))))
        want = _delta(up, down, alpha / down.shape[0])
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-9), (name, path)
    assert set(seen) == trained, f"LoRA modules diffusers did not place: {sorted(trained - set(seen))[:5]}"
    return len(seen)


def _fresh_lora(ext, model, target="all", rank=2, seed=0) -> dict[str, torch.Tensor]:
    """A non-zero LoRA (LORA_MODEL dict) on every ``target`` layer of ``model``."""
    unet = model.get_model_object("diffusion_model")
    with torch.inference_mode(False):
        net = ext.lora.LoRANetwork.for_module(unet, ext.lora.LoRAConfig(rank=rank, target=target),
                                              torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for _, p in net.named_lora_parameters():
                p.add_(0.01)
    return ext.host.lora_model_dict(net)


def _save_and_reload_in_comfyui(ext, lora, model, loras):
    """PSO Save LoRA's file, and ComfyUI's stock LoraLoader applying it to ``model``."""
    import nodes as comfy_nodes

    name = ext.nodes.PSOSaveLoRA.execute(lora, model, "pso/diffusers_check", None).result[0]
    patched, _ = comfy_nodes.LoraLoader().load_lora(model, None, name, 1.0, 0.0)
    return loras / name, patched


def _file_modules(path: Path) -> set[str]:
    with safetensors.safe_open(str(path), "pt") as f:
        keys = f.keys()
    return {k.split(".")[0] for k in keys}


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_diffusers_conversion_of_the_fixture_unet_reproduces_comfyui(bundles, family):
    """Sanity check that makes the LoRA comparisons below meaningful: same weights, same function."""
    model = bundles[family].model
    inp = _inputs(family)
    want = _comfy_out(model, inp)
    got = _diffusers_out(_diffusers_unet(family, model), inp)
    assert want.abs().mean() > 0.1  # a live UNet, not zeros
    err = (got - want).abs().max().item()
    assert err < 1e-4, f"{family}: diffusers UNet differs from ComfyUI's by {err}"


def test_trained_sd15_lora_file_loads_in_diffusers_and_reproduces_comfyui(ext, bundles, loras):
    """The strong check: a LoRA trained by PSO, saved with kohya diffusers names, read by
    StableDiffusionPipeline.load_lora_weights, gives the same UNet output as the trained model and as
    ComfyUI's LoraLoader."""
    bundle = bundles["sd15"]
    with torch.inference_mode():
        conds = [bundle.clip.encode_from_tokens_scheduled(bundle.clip.tokenize(p))
                 for p in ("a red circle", "a blue square")]
    trained, net, _ = train_lora(ext.host, ext.lora, bundle, conds, steps=4, lr=3e-2)
    lora = ext.host.lora_model_dict(net)
    inp = _inputs("sd15")
    base_out, trained_out = _comfy_out(bundle.model, inp), _comfy_out(trained, inp)
    gap = (trained_out - base_out).abs().max().item()
    assert gap > 1e-2, f"training changed the UNet output by only {gap}; the comparison would be vacuous"

    path, comfy_patched = _save_and_reload_in_comfyui(ext, lora, bundle.model, loras)
    comfy_out = _comfy_out(comfy_patched, inp)
    assert (comfy_out - trained_out).abs().max().item() <= 1e-4 * gap

    unet = _diffusers_unet("sd15", bundle.model)
    pipe = _pipeline("sd15", unet)
    warned = _load_with_diffusers(pipe, path)
    assert warned == [], warned
    layers = _peft_layers(unet)
    # kohya SD1.x names are diffusers module paths with '_': each file module is the peft layer's path.
    assert {"lora_unet_" + n.replace(".", "_") for n in layers} == _file_modules(path)
    assert _check_peft_layers_match_the_lora(unet, bundle.model, lora) == len(layers) == len(net.paths)

    diff_out = _diffusers_out(unet, inp)
    err = (diff_out - comfy_out).abs().max().item()
    assert err <= 1e-3 * gap, f"diffusers+LoRA differs from ComfyUI's LoraLoader by {err} (LoRA effect {gap})"
    assert (_comfy_out(bundle.model, inp) - base_out).abs().max().item() == 0  # the base model is unpatched


def _diffusers_reads_top_level_kohya_modules() -> bool:
    """Whether diffusers maps kohya names of conv_in / conv_out / time and SDXL size embeddings (added in
    huggingface/diffusers#14006; older versions report such keys as unexpected or refuse sgm files)."""
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key

    return all(_convert_unet_lora_key(f"lora_unet_{name}.lora_down.weight").startswith(want) for name, want in
               (("time_embed_0", "time_embedding.linear_1"), ("label_emb_0_2", "add_embedding.linear_2"),
                ("conv_in", "conv_in"), ("out_2", "conv_out")))


@pytest.mark.parametrize("target", ["attention_mlp", "all"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lora_file_on_every_layer_kind_loads_in_diffusers_and_reproduces_comfyui(ext, bundles, loras, family,
                                                                                 target):
    """LoRAs on the transformer layers (attention, feed-forward, proj_in/out) and on every Linear and
    Conv2d (resnets, time and SDXL size embeddings, conv_in/out, down- and upsamplers): SD1.x files
    (diffusers names) and SDXL files (sgm names, which diffusers remaps with the UNet's config) are
    placed module for module and give ComfyUI's output."""
    if target == "all" and not _diffusers_reads_top_level_kohya_modules():
        pytest.skip(f"diffusers {diffusers.__version__} does not map kohya conv_in/conv_out/time_embed/"
                    "label_emb keys (fixed in huggingface/diffusers#14006): upgrade diffusers")
    model = bundles[family].model
    lora = _fresh_lora(ext, model, target=target)
    inp = _inputs(family)
    base_out = _comfy_out(model, inp)
    path, comfy_patched = _save_and_reload_in_comfyui(ext, lora, model, loras)
    comfy_out = _comfy_out(comfy_patched, inp)
    gap = (comfy_out - base_out).abs().max().item()
    assert gap > 1e-2, f"the LoRA changes the UNet output by only {gap}; the comparison would be vacuous"

    unet = _diffusers_unet(family, model)
    warned = _load_with_diffusers(_pipeline(family, unet), path)
    assert warned == [], warned
    n_file = len(_file_modules(path))
    assert _check_peft_layers_match_the_lora(unet, model, lora) == len(_peft_layers(unet)) == n_file > 20

    err = (_diffusers_out(unet, inp) - comfy_out).abs().max().item()
    assert err <= 1e-3 * gap, f"diffusers+LoRA differs from ComfyUI's LoraLoader by {err} (LoRA effect {gap})"
