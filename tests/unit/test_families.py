"""The one model-family table (pso.families): every row is consistent with the places that read it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pso import families, lora_format, schedules
from pso.lora import TARGETS, LoRAConfig, LoRANetwork
from pso_train import config as headless_config


def test_every_row_names_a_known_naming_and_only_other_namings_as_bad():
    for name, row in families.FAMILIES.items():
        assert row.naming in lora_format.NAMINGS, name
        assert set(row.bad_namings) <= set(lora_format.NAMINGS), name
        assert row.naming not in row.bad_namings, f"{name}'s default naming is one it calls broken"
        w, _, h = row.resolution.partition("x")
        assert int(w) > 0 and int(h) > 0, name
        assert row.readers and set(row.readers.values()) <= {"tested", "code"}, name


def test_the_file_descriptions_come_from_the_table():
    for name, row in families.FAMILIES.items():
        spec = lora_format.FAMILIES[name]
        assert (spec.base_model_version, spec.architecture, spec.naming, spec.resolution) == \
               (row.base_model_version, row.architecture, row.naming, row.resolution)
        assert lora_format.MODEL_CLASSES[name] == row.model_class


def test_implementation_follows_the_names_the_keys_use():
    sdxl, sd15 = lora_format.FAMILIES["SDXL"], lora_format.FAMILIES["SD15"]
    assert lora_format.implementation(sdxl, "kohya_ldm") == "https://github.com/Stability-AI/generative-models"
    assert lora_format.implementation(sd15, "kohya_diffusers") == "diffusers"
    assert lora_format.implementation(sd15, "comfyui") == "https://github.com/comfyanonymous/ComfyUI"
    flux = lora_format.FAMILIES["FluxSchnell"]
    assert lora_format.implementation(flux, "kohya_ldm") == "https://github.com/black-forest-labs/flux"


def test_timestep_presets_are_the_schedule_module_s_with_their_step_counts():
    for name, row in families.FAMILIES.items():
        for preset in row.schedules:
            assert preset.source, (name, preset.name)
            if preset.kind == "timesteps":
                assert len(schedules.FEW_STEP_TIMESTEPS[preset.name]) == preset.steps, (name, preset.name)
            else:
                assert preset.kind == "flow" and preset.steps >= 1, (name, preset)


@pytest.mark.parametrize(("path", "selected"), [
    ("input_blocks.3", True), ("middle_block", True), ("output_blocks.0", True),
    ("double_blocks.0", True), ("single_blocks.12", True),
    ("input_blocks.3.1", False), ("input_blocks.3.1.transformer_blocks.0", False), ("out", False),
    ("time_embed", False), ("img_in", False),
])
def test_checkpoint_blocks_are_top_level_blocks_only(path, selected):
    assert families.is_checkpoint_block(path) is selected


def test_in_place_residual_models_are_the_flux_class_and_its_relatives():
    assert families.in_place_residual("Flux")
    assert families.in_place_residual("Chroma") and families.in_place_residual("HunyuanVideo")
    assert not families.in_place_residual("SDXL") and not families.in_place_residual("BaseModel")


def test_headless_trainer_families_are_table_rows_and_others_are_refused_by_name(tmp_path):
    rows = {k for k in headless_config.HEADLESS_FAMILIES if k != "auto"}
    assert rows == {"SD15", "SD20", "SDXL"} and rows <= set(families.FAMILIES)
    with pytest.raises(headless_config.ConfigError, match=r"'FluxSchnell' is trained in ComfyUI"):
        headless_config.HeadlessConfig(model="m.safetensors", datasets=["d"], output_dir=str(tmp_path),
                                       family="FluxSchnell")


@pytest.mark.parametrize("family", ["SD3", "Flux", "ZImage", "QwenImage", "WAN22_T2V", "Flux2"])
def test_headless_config_refuses_every_transformer_family_by_name(tmp_path, family):
    with pytest.raises(headless_config.ConfigError, match=rf"'{family}' is trained in ComfyUI"):
        headless_config.HeadlessConfig(model="m.safetensors", datasets=["d"], output_dir=str(tmp_path),
                                       family=family)


@pytest.mark.parametrize("kind", ["SD3Transformer2DModel", "FluxTransformer2DModel"])
def test_headless_trainer_names_a_transformer_model_folder_it_does_not_train(tmp_path, kind):
    """family 'auto' on a diffusers folder of SD3 / FLUX (transformer/, no unet/): refused naming the class
    and where those families train (it said "cannot read unet/config.json; the diffusers folder is
    incomplete"), for the folder itself and as the model_config of a single-file checkpoint."""
    from types import SimpleNamespace

    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from pso_train import model as headless_model

    folder = tmp_path / "model"
    (folder / "transformer").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "SomePipeline"}), encoding="utf-8")
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": kind}), encoding="utf-8")
    (folder / "scheduler" / "scheduler_config.json").write_text("{}", encoding="utf-8")
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    expected = (rf"holds {kind} \(transformer/\), not a UNet: the headless trainer trains SD 1\.x, SD 2\.x "
                r"and SDXL")
    for model, config_dir in ((folder, ""), (single, str(folder))):
        cfg = SimpleNamespace(model=str(model), model_config=config_dir, family="auto", prediction="auto")
        with pytest.raises(ValueError, match=expected + r".*in ComfyUI with PSO Train"):
            headless_model.load_model(cfg, torch.device("cpu"), (64, 64))


def test_naming_problems_name_the_readers():
    assert "kohya" in families.naming_problem("SD15", "kohya_ldm")
    assert families.naming_problem("SD15", "kohya_diffusers") is None
    assert families.naming_problem("NoSuchFamily", "comfyui") is None


class _Flux(nn.Module):
    """ComfyUI's Flux module names, for the target presets."""

    def __init__(self):
        super().__init__()
        block = nn.Module()
        block.img_attn = nn.Module()
        block.img_attn.qkv, block.img_attn.proj = nn.Linear(4, 12), nn.Linear(4, 4)
        block.img_mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
        block.img_mod = nn.Module()
        block.img_mod.lin = nn.Linear(4, 24)
        self.double_blocks = nn.ModuleList([block])


def test_target_presets_pick_the_family_s_modules():
    gen = torch.Generator().manual_seed(0)
    attention = LoRANetwork.for_module(_Flux(), LoRAConfig(rank=2, target="attention"), gen)
    assert set(attention.paths) == {"double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj"}
    mlp = LoRANetwork.for_module(_Flux(), LoRAConfig(rank=2, target="attention_mlp"), gen)
    assert set(mlp.paths) - set(attention.paths) == {"double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2"}
    assert "attention" in TARGETS
