"""LoRA key names other readers load: FLUX files with kohya's names (ComfyUI's key map and diffusers'
kohya-FLUX conversion read them), FLUX / SD2 metadata that Forge and A1111 classify right, the
headless trainer's SDXL names equal to the node's (checked against ComfyUI's own diffusers <-> ldm
table), and a warning where a naming breaks common readers."""

from __future__ import annotations

import logging

import pytest
import safetensors
import torch

from pso import lora_format


@pytest.fixture(scope="module")
def flux(comfy_inprocess):
    from pso_test_fixtures import tiny_models

    with torch.inference_mode():
        return tiny_models.build_model("flux", seed=3)


def _fresh_lora(ext, model, target):
    unet = model.get_model_object("diffusion_model")
    with torch.inference_mode(False):
        net = ext.lora.LoRANetwork.for_module(unet, ext.lora.LoRAConfig(rank=2, target=target),
                                              torch.Generator().manual_seed(0))
        with torch.no_grad():
            for _, p in net.named_lora_parameters():
                p.add_(0.01)
    return net, ext.host.lora_model_dict(net)


# --------------------------------------------------------------------------------------------
# FLUX
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["attention_mlp", "all"])
def test_flux_files_have_kohya_names_the_host_maps_to_every_trained_layer(ext, flux, target, caplog):
    import comfy.lora

    net, lora = _fresh_lora(ext, flux, target)
    tensors, naming, _ = ext.files.to_file_state_dict(lora, flux)
    assert naming == "kohya_ldm"
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in tensors
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in tensors
    assert all(k.startswith("lora_unet_") and k.count(".") in (1, 2) for k in tensors)  # kohya cuts at '.'
    key_map = comfy.lora.model_lora_keys_unet(flux.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(tensors, key_map)
    assert "not loaded" not in caplog.text, caplog.text
    assert set(patches) == {f"diffusion_model.{p}.weight" for p in net.paths}


def test_flux_metadata_is_what_forge_and_kohya_expect(ext, flux, loras):
    _, lora = _fresh_lora(ext, flux, "attention")
    out = ext.nodes.PSOSaveLoRA.execute(lora, flux, "pso/flux", None)
    with safetensors.safe_open(str(loras / out.result[0]), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert meta["modelspec.architecture"] == "flux-1-schnell/lora"
    assert meta["modelspec.resolution"] == "1024x1024"
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_v2"] == "False"
    assert meta["pso.key_naming"] == "kohya_ldm"
    assert "Warning" not in out.ui.as_dict()["text"][0]


def test_diffusers_reads_kohya_flux_names_and_splits_fused_layers_into_the_same_deltas():
    """diffusers' FLUX loader converts kohya FLUX names to its own modules, splitting the fused qkv
    and linear1 layers (its converter only knows FLUX's real widths: a rank-1 LoRA of real shapes,
    named as PSO Save LoRA names FLUX layers). Each converted delta is the matching rows of ours."""
    diffusers = pytest.importorskip("diffusers")

    hidden, mlp = 3072, 12288
    shapes = {"double_blocks.0.img_attn.qkv": (3 * hidden, hidden),
              "double_blocks.0.img_attn.proj": (hidden, hidden),
              "double_blocks.0.txt_attn.qkv": (3 * hidden, hidden),
              "double_blocks.0.txt_attn.proj": (hidden, hidden),
              "double_blocks.0.img_mlp.0": (mlp, hidden), "double_blocks.0.img_mlp.2": (hidden, mlp),
              "double_blocks.0.txt_mlp.0": (mlp, hidden), "double_blocks.0.txt_mlp.2": (hidden, mlp),
              "single_blocks.0.linear1": (3 * hidden + mlp, hidden),
              "single_blocks.0.linear2": (hidden, hidden + mlp)}
    gen = torch.Generator().manual_seed(0)
    tensors, deltas = {}, {}
    for path, (out_dim, in_dim) in shapes.items():
        key = lora_format.kohya_name(path, "kohya_ldm")
        down, up = torch.randn(1, in_dim, generator=gen), torch.randn(out_dim, 1, generator=gen)
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(0.5)})
        deltas[path] = 0.5 * up @ down  # alpha / rank = 0.5
    assert "lora_unet_double_blocks_0_img_attn_qkv.alpha" in tensors
    converted = diffusers.FluxPipeline.lora_state_dict(dict(tensors))
    sd = converted[0] if isinstance(converted, tuple) else converted

    def delta(module):
        return sd[f"transformer.{module}.lora_B.weight"] @ sd[f"transformer.{module}.lora_A.weight"]

    q, k, v = deltas["double_blocks.0.img_attn.qkv"].split(hidden)
    for name, part in (("to_q", q), ("to_k", k), ("to_v", v)):
        assert torch.allclose(delta(f"transformer_blocks.0.attn.{name}"), part, atol=1e-4), name
    assert torch.allclose(delta("transformer_blocks.0.attn.add_q_proj"),
                          deltas["double_blocks.0.txt_attn.qkv"][:hidden], atol=1e-4)
    assert torch.allclose(delta("transformer_blocks.0.ff.net.2"), deltas["double_blocks.0.img_mlp.2"],
                          atol=1e-4)
    single = deltas["single_blocks.0.linear1"]
    assert torch.allclose(delta("single_transformer_blocks.0.proj_mlp"), single[3 * hidden:], atol=1e-4)
    assert torch.allclose(delta("single_transformer_blocks.0.proj_out"), deltas["single_blocks.0.linear2"],
                          atol=1e-4)


# --------------------------------------------------------------------------------------------
# SD2 and bad namings
# --------------------------------------------------------------------------------------------

def test_sd2_files_say_ss_v2_and_their_resolution():
    spec = lora_format.family_spec("SD20", lora_format.FAMILIES)
    modules = {"m": {"lora_down.weight": torch.zeros(2, 3), "alpha": torch.tensor(2.0)}}
    meta = lora_format.build_metadata(modules, spec, title="t", settings={}, naming=spec.naming,
                                      base_fingerprint={}, prediction="eps")
    assert meta["ss_v2"] == "True" and meta["modelspec.resolution"] == "512x512"
    v_spec = lora_format.family_spec("SD20", lora_format.FAMILIES, v_prediction=True)
    assert (v_spec.architecture, v_spec.resolution) == ("stable-diffusion-v2-768-v", "768x768")


def test_a_naming_that_breaks_readers_is_saved_with_a_warning(ext, bundles, loras, monkeypatch, caplog):
    import comfy.utils

    model = bundles["sd15"].model
    _, lora = _fresh_lora(ext, model, "attention")
    monkeypatch.setattr(comfy.utils, "unet_to_diffusers", lambda unet_config: {})  # forces kohya_ldm
    with caplog.at_level(logging.WARNING):
        out = ext.nodes.PSOSaveLoRA.execute(lora, model, "pso/sd15", None)
    text = out.ui.as_dict()["text"][0]
    assert "kohya_ldm key names" in text and "Warning: other tools may not read this file" in text, text
    assert "kohya sd-scripts and diffusers" in caplog.text


# --------------------------------------------------------------------------------------------
# Headless SDXL: the node's names
# --------------------------------------------------------------------------------------------

#: The real ldm UNet configs (as ComfyUI detects SD1.5 and SDXL) and their diffusers configs.
_LDM = {
    "SD15": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
             "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1] * 9 + [0] * 3,
             "use_temporal_attention": False, "use_temporal_resblock": False},
    "SDXL": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64,
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False},
}
_DIFFUSERS = {
    "SD15": {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
    "SDXL": {"block_out_channels": [320, 640, 1280], "layers_per_block": 2,
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]},
}


@pytest.mark.parametrize("family", ["SD15", "SDXL"])
def test_headless_original_module_names_are_the_host_s_for_every_layer(comfy_inprocess, family):
    """Every weight of the real SD1.5 / SDXL UNet: our diffusers -> original path equals the inverse
    of ComfyUI's own table (comfy.utils.unet_to_diffusers), which is how the host reads such files."""
    import comfy.utils

    table = comfy.utils.unet_to_diffusers(dict(_LDM[family]))
    checked = 0
    for diffusers_key, ldm_key in table.items():
        if not diffusers_key.endswith(".weight") or diffusers_key.startswith("class_embedding."):
            continue  # the host maps SDXL's label embedding under both names; diffusers' is add_embedding
        path = diffusers_key[:-len(".weight")]
        assert lora_format.ldm_module_path(path, _DIFFUSERS[family]) == ldm_key[:-len(".weight")], path
        checked += 1
    assert checked > 300


def test_headless_sdxl_files_use_the_node_s_names(tmp_path):
    lora = {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_down.weight": torch.ones(2, 8),
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_up.weight": torch.ones(8, 2),
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.alpha": torch.tensor(2.0),
            "add_embedding.linear_1.lora_down.weight": torch.ones(2, 8),
            "add_embedding.linear_1.lora_up.weight": torch.ones(8, 2),
            "add_embedding.linear_1.alpha": torch.tensor(2.0),
            "up_blocks.1.upsamplers.0.conv.lora_down.weight": torch.ones(2, 8, 3, 3),
            "up_blocks.1.upsamplers.0.conv.lora_up.weight": torch.ones(8, 2, 1, 1),
            "up_blocks.1.upsamplers.0.conv.alpha": torch.tensor(2.0)}
    path = lora_format.save_lora_file(lora, tmp_path, "x", family="SDXL", prediction="eps",
                                      latent_channels=4, ldm_shapes=None, settings={},
                                      unet_config=_DIFFUSERS["SDXL"])
    with safetensors.safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["pso.key_naming"] == "kohya_ldm"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in keys} == {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_label_emb_0_0",
        "lora_unet_output_blocks_5_2_conv"}
