"""LoRA files through the real host: kohya names the host maps back to every trained layer, a saved
file that reproduces the trained model through both the stock and the PSO loader, files that are
never overwritten and never written outside the loras folders, and a loader that refuses pickles and
LoRAs of another model family."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime

import pytest
import safetensors
import torch
from tiny_training import sample, train_lora

SETTINGS = {"method": "pso_offline", "beta": 50.0, "steps": 4, "lr": 0.03, "rank": 4, "sampler": "lcm",
            "sampling_steps": 4}


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _fresh_lora(ext, model, target="attention", rank=2, seed=0):
    """A LoRA on every ``target`` layer of ``model`` with non-zero up matrices (LORA_MODEL dict)."""
    unet = model.get_model_object("diffusion_model")
    with torch.inference_mode(False):
        net = ext.lora.LoRANetwork.for_module(unet, ext.lora.LoRAConfig(rank=rank, target=target),
                                              torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for _, p in net.named_lora_parameters():
                p.add_(0.01)
    return net, ext.host.lora_model_dict(net)


def _conds(bundle):
    with torch.inference_mode():
        return [bundle.clip.encode_from_tokens_scheduled(bundle.clip.tokenize(p))
                for p in ("a red circle", "a blue square")]


def _train(ext, bundle, conds, steps=4, lr=3e-2):
    trained, net, _ = train_lora(ext.host, ext.lora, bundle, conds, steps, lr)
    return trained, net


def _save(ext, lora, model, prefix="pso/pso_lora", settings=None):
    out = ext.nodes.PSOSaveLoRA.execute(lora, model, prefix, settings)
    return out.result[0], out.ui


# --------------------------------------------------------------------------------------------
# Key names
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("naming", ["kohya_diffusers", "kohya_ldm", "comfyui"])
def test_every_named_layer_maps_back_to_its_own_layer_in_the_host(ext, bundles, family, naming, caplog):
    """All LoRA-able layers ('all': convs, resnets, embeddings too): the host's key map sends every
    file name to the very weight it was trained on, and no tensor is left unloaded."""
    import comfy.lora

    model = bundles[family].model
    net, lora = _fresh_lora(ext, model, target="all")
    tensors, used, _ = ext.files.to_file_state_dict(lora, model, naming)
    assert used == naming
    assert len(tensors) == 3 * len(net.paths)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(tensors, key_map)
    assert "not loaded" not in caplog.text, caplog.text
    assert set(patches) == {f"diffusion_model.{p}.weight" for p in net.paths}
    assert len(patches) == len(net.paths) > 100


def test_family_default_names_are_the_ones_kohya_writes(ext, bundles):
    """SD1.x: diffusers module paths (sd-scripts' SD1 UNet); SDXL: original sgm paths (its SDXL UNet)."""
    sd15_model, sdxl_model = bundles["sd15"].model, bundles["sdxl"].model
    sd15, _, _ = ext.files.to_file_state_dict(_fresh_lora(ext, sd15_model)[1], sd15_model)
    sdxl, naming, _ = ext.files.to_file_state_dict(_fresh_lora(ext, sdxl_model)[1], sdxl_model)
    # One res block per level in the tiny UNet: ldm input_blocks.3.1 is diffusers down_blocks.1.attentions.0.
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd15
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha" in sd15
    assert all(k.startswith("lora_unet_") and "input_blocks" not in k for k in sd15)
    assert naming == "kohya_ldm"
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_up.weight" in sdxl
    assert all(k.startswith("lora_unet_") and "down_blocks" not in k for k in sdxl)


def test_a_lora_of_another_model_is_refused_by_name_and_shape(ext, bundles):
    _, lora = _fresh_lora(ext, bundles["sdxl"].model)
    with pytest.raises(ValueError, match=r"do not fit the MODEL's weight|names no layer"):
        ext.files.to_file_state_dict(lora, bundles["sd15"].model)
    with pytest.raises(ValueError, match=r"not a UNet LoRA tensor.*Save LoRA Weights"):
        ext.files.to_file_state_dict({"diffusion_model.out.2.hada_w1_a": torch.zeros(2, 2)},
                                     bundles["sd15"].model)


def test_without_a_diffusers_table_kohya_names_fall_back_to_original_paths(ext, bundles, monkeypatch, caplog):
    import comfy.lora
    import comfy.utils

    model = bundles["sd15"].model
    net, lora = _fresh_lora(ext, model)
    monkeypatch.setattr(comfy.utils, "unet_to_diffusers", lambda unet_config: {})
    with caplog.at_level(logging.WARNING):
        tensors, naming, _ = ext.files.to_file_state_dict(lora, model, "kohya_diffusers")
    assert naming == "kohya_ldm" and "no diffusers name" in caplog.text
    monkeypatch.undo()
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(tensors, key_map, log_missing=False)
    assert set(patches) == {f"diffusion_model.{p}.weight" for p in net.paths}


def test_a_family_without_a_kohya_convention_is_saved_with_comfyui_names(ext, bundles, loras, monkeypatch,
                                                                          caplog):
    """As for Flux: ComfyUI's own names, said so in the metadata, read by the stock loader."""
    import nodes as comfy_nodes

    model = bundles["sd15"].model
    monkeypatch.setattr(ext.files, "FAMILIES", {k: v for k, v in ext.files.FAMILIES.items() if k != "SD15"})
    _, lora = _fresh_lora(ext, model)
    name, _ = _save(ext, lora, model)
    with safetensors.safe_open(str(loras / name), "pt") as f:
        keys, meta = f.keys(), f.metadata()
    assert all(k.startswith("diffusion_model.") for k in keys)
    assert meta["pso.key_naming"] == "comfyui" and meta["modelspec.architecture"] == "sd15/lora"
    assert meta["modelspec.implementation"] == "https://github.com/comfyanonymous/ComfyUI"
    with caplog.at_level(logging.WARNING):
        comfy_nodes.LoraLoader().load_lora(model, None, name, 1.0, 0.0)
    assert "not loaded" not in caplog.text.lower(), caplog.text


# --------------------------------------------------------------------------------------------
# Round trip through the host
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_saved_file_reproduces_the_trained_model_through_stock_and_pso_loaders(ext, bundles, loras, family,
                                                                                 caplog):
    import folder_paths

    import nodes as comfy_nodes  # ComfyUI's nodes.py (the host path is first on sys.path)

    bundle = bundles[family]
    conds = _conds(bundle)
    trained, net = _train(ext, bundle, conds)
    base_out, trained_out = sample(bundle.model, conds[0]), sample(trained, conds[0])
    gap = (trained_out - base_out).abs().max().item()
    assert gap > 1e-3, f"training changed nothing measurable (gap {gap}); the round trip would be vacuous"

    name, _ = _save(ext, ext.host.lora_model_dict(net), bundle.model, settings=json.dumps(SETTINGS))
    assert name in folder_paths.get_filename_list("loras")
    with caplog.at_level(logging.WARNING):
        stock, _ = comfy_nodes.LoraLoader().load_lora(bundle.model, bundle.clip, name, 1.0, 1.0)
    assert "not loaded" not in caplog.text.lower(), caplog.text
    pso_model, info = ext.nodes.PSOLoraLoader.execute(bundle.model, name, 1.0).result
    assert "Warnings: none" in info and "pso_offline" in info, info

    for loaded in (stock, pso_model):
        out = sample(loaded, conds[0])
        err = (out - trained_out).abs().max().item()
        assert err <= 1e-4 * max(1.0, gap), (err, gap)
    half = ext.nodes.PSOLoraLoader.execute(bundle.model, name, 0.5).result[0]
    assert (sample(half, conds[0]) - trained_out).abs().max().item() > 0.1 * gap  # strength is applied


# --------------------------------------------------------------------------------------------
# Saving: names, counters, refusals, metadata
# --------------------------------------------------------------------------------------------

def test_saving_twice_gives_two_files_and_never_overwrites(ext, bundles, loras):
    model = bundles["sd15"].model
    _, lora = _fresh_lora(ext, model)
    first, ui = _save(ext, lora, model)
    assert first == os.path.join("pso", "pso_lora_00001.safetensors")
    assert first in ui.as_dict()["text"][0]
    before = (loras / first).read_bytes()
    (loras / "pso" / "pso_lora_00002.safetensors").write_bytes(b"a user's file")
    second, _ = _save(ext, lora, model)
    assert second == os.path.join("pso", "pso_lora_00003.safetensors")
    assert (loras / first).read_bytes() == before
    assert (loras / "pso" / "pso_lora_00002.safetensors").read_bytes() == b"a user's file"
    assert _files(loras) == ["pso", first, os.path.join("pso", "pso_lora_00002.safetensors"), second]


def test_publishing_refuses_a_name_taken_in_between(ext, bundles, loras, monkeypatch):
    """A file that appears after the counter was chosen (another process) is kept; the next name is used."""
    model = bundles["sd15"].model
    _, lora = _fresh_lora(ext, model)
    real = ext.files.pso_io.unique_path
    calls = []

    def racing_unique_path(folder, stem, ext_):
        path = real(folder, stem, ext_)
        if not calls:
            path.write_bytes(b"written by another process")
        calls.append(path)
        return path

    monkeypatch.setattr(ext.files.pso_io, "unique_path", racing_unique_path)
    name, _ = _save(ext, lora, model, prefix="race")
    assert name == "race_00002.safetensors"
    assert (loras / "race_00001.safetensors").read_bytes() == b"written by another process"
    assert not [p for p in loras.iterdir() if p.name.startswith(".")], "a temporary file was left behind"


@pytest.mark.parametrize("prefix", ["../x", "/abs/x", "pso/../../x", "a\\..\\..\\x", "C:/x", "", "pso/"])
def test_prefixes_outside_the_loras_folder_are_refused_with_nothing_written(ext, bundles, loras, prefix):
    model = bundles["sd15"].model
    _, lora = _fresh_lora(ext, model)
    around = _files(loras.parent)
    with pytest.raises(ValueError, match="filename_prefix"):
        _save(ext, lora, model, prefix=prefix)
    assert _files(loras.parent) == around


def test_a_symlinked_subfolder_counts_only_if_it_is_a_configured_loras_folder(ext, bundles, loras, tmp_path):
    import folder_paths

    model = bundles["sd15"].model
    _, lora = _fresh_lora(ext, model)
    outside, second = tmp_path / "elsewhere", tmp_path / "more_loras"
    outside.mkdir()
    second.mkdir()
    (loras / "out").symlink_to(outside, target_is_directory=True)
    (loras / "more").symlink_to(second, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the loras folders"):
        _save(ext, lora, model, prefix="out/x")
    assert not list(outside.iterdir())
    folder_paths.folder_names_and_paths["loras"][0].append(str(second))
    name, _ = _save(ext, lora, model, prefix="more/x")
    assert name == os.path.join("more", "x_00001.safetensors") and (second / "x_00001.safetensors").is_file()
    assert ext.nodes.PSOLoraLoader.execute(model, name, 1.0).result[0] is not model


def test_metadata_is_all_strings_with_the_kohya_modelspec_and_pso_fields(ext, bundles, loras):
    settings = dict(SETTINGS, comment="digits run 3")
    cases = (("sd15", "sd_v1", "stable-diffusion-v1", "kohya_diffusers"),
             ("sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", "kohya_ldm"))
    for family, version, arch, naming in cases:
        model = bundles[family].model
        _, lora = _fresh_lora(ext, model, rank=3)
        name, _ = _save(ext, lora, model, prefix=f"{family}/m", settings=json.dumps(settings))
        with safetensors.safe_open(str(loras / name), "pt") as f:
            meta = f.metadata()
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
        assert meta["ss_network_module"] == "networks.lora"
        assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("3", "3.0")
        assert meta["ss_base_model_version"] == version
        assert meta["ss_training_comment"] == "digits run 3"
        assert meta["modelspec.sai_model_spec"] == "1.0.0"
        assert meta["modelspec.architecture"] == f"{arch}/lora"
        assert meta["modelspec.title"] == meta["ss_output_name"] == "m_00001"
        assert meta["modelspec.prediction_type"] == "epsilon"
        assert datetime.fromisoformat(meta["modelspec.date"]).tzinfo is not None
        assert meta["pso.key_naming"] == naming and meta["pso.version"] == ext.files.__version__
        assert json.loads(meta["pso.settings"]) == settings
        assert (meta["pso.recommended_sampler"], meta["pso.recommended_steps"]) == ("lcm", "4")
        fp = json.loads(meta["pso.base_fingerprint"])
        assert fp == ext.files.fingerprint(model)
        assert fp["model_config"] == family.upper() and fp["latent_channels"] == 4
        assert meta["producer"].startswith("comfyui-pso")


def test_fingerprint_follows_structure_not_weights(ext, comfy_inprocess):
    from pso_test_fixtures import tiny_models

    a, b = tiny_models.build_model("sd15", seed=1), tiny_models.build_model("sd15", seed=2)
    fa, fb = ext.files.fingerprint(a), ext.files.fingerprint(b)
    assert fa == fb  # other weights, same architecture
    sdxl = ext.files.fingerprint(tiny_models.build_model("sdxl"))
    assert fa["unet_structure_sha256"] != sdxl["unet_structure_sha256"]


def test_settings_must_be_a_json_object_and_may_be_absent(ext, bundles, loras):
    model = bundles["sd15"].model
    _, lora = _fresh_lora(ext, model)
    for bad in ("not json", "[1, 2]"):
        with pytest.raises(ValueError, match="settings must be"):
            _save(ext, lora, model, settings=bad)
    assert _files(loras) == []
    name, _ = _save(ext, lora, model)
    with safetensors.safe_open(str(loras / name), "pt") as f:
        meta = f.metadata()
    assert meta["pso.settings"] == "{}" and meta["pso.recommended_sampler"] == "unknown"


# --------------------------------------------------------------------------------------------
# Loading: refusals and reports
# --------------------------------------------------------------------------------------------

def test_loader_refuses_pickle_files_and_never_unpickles(ext, bundles, loras, monkeypatch):
    model = bundles["sd15"].model
    torch.save({"lora_unet_x.lora_up.weight": torch.zeros(1)}, loras / "old.ckpt")
    torch.save({"lora_unet_x.lora_up.weight": torch.zeros(1)}, loras / "disguised.safetensors")

    def no_torch_load(*a, **k):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(ValueError, match=r"'old.ckpt' is a .ckpt file; PSO only reads .safetensors"):
        ext.nodes.PSOLoraLoader.execute(model, "old.ckpt", 1.0)
    with pytest.raises(ValueError, match=r"'disguised.safetensors' is not a readable .safetensors file"):
        ext.nodes.PSOLoraLoader.execute(model, "disguised.safetensors", 1.0)


def test_loader_refuses_a_lora_of_another_family_naming_both(ext, bundles, loras):
    _, lora = _fresh_lora(ext, bundles["sdxl"].model)
    name, _ = _save(ext, lora, bundles["sdxl"].model)
    with pytest.raises(ValueError, match=r"refusing .*trained on SDXL .*but the MODEL is SD15"):
        ext.nodes.PSOLoraLoader.execute(bundles["sd15"].model, name, 1.0)


def test_loader_reports_keys_the_host_did_not_use(ext, bundles, loras):
    import safetensors.torch

    model = bundles["sd15"].model
    _, lora = _fresh_lora(ext, model)
    name, _ = _save(ext, lora, model)
    with safetensors.safe_open(str(loras / name), "pt") as f:
        keys = f.keys()
        tensors = {k: f.get_tensor(k) for k in keys}
        meta = f.metadata()
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(4, 2)
    safetensors.torch.save_file(tensors, str(loras / "extra.safetensors"), metadata=meta)
    patched, info = ext.nodes.PSOLoraLoader.execute(model, "extra.safetensors", 1.0).result
    assert patched is not model
    unused = "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"
    assert f"1 keys were not used by this model: {unused}" in info
    assert '"pso.settings": {}' in info  # metadata shown, JSON fields expanded


def test_loader_fingerprint_changes_when_the_file_does(ext, bundles, loras):
    model = bundles["sd15"].model
    _, lora = _fresh_lora(ext, model)
    name, _ = _save(ext, lora, model)
    before = ext.nodes.PSOLoraLoader.fingerprint_inputs(lora_name=name, strength=1.0)
    os.utime(loras / name, ns=(1, 1))
    assert ext.nodes.PSOLoraLoader.fingerprint_inputs(lora_name=name, strength=1.0) != before
