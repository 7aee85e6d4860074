"""The package imports and registers cleanly inside the host, and follows ComfyUI node conventions."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from extension_loader import REPO_ROOT, load_package, node_classes


def test_pso_imports_without_comfyui():
    """Every module of pso/ imports in a fresh interpreter that has no ComfyUI on its path."""
    code = (
        "import importlib, importlib.util, pkgutil, sys\n"
        "assert importlib.util.find_spec('comfy') is None, 'ComfyUI must not be importable here'\n"
        "import pso\n"
        "mods = [m.name for m in pkgutil.walk_packages(pso.__path__, 'pso.')]\n"
        "for m in mods: importlib.import_module(m)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in "
        "{'comfy', 'comfy_api', 'folder_paths', 'server', 'nodes', 'execution'})\n"
        "assert not bad, bad\n"
        "print(len(mods))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) >= 1  # at least one submodule was actually imported


@pytest.fixture(scope="module")
def schemas(comfy_inprocess):
    return [cls.define_schema() for cls in node_classes()]


def test_package_declares_web_directory(comfy_inprocess):
    package = load_package()
    assert package.WEB_DIRECTORY == "./web"
    assert (REPO_ROOT / "web").is_dir()


def test_every_node_follows_the_conventions(schemas):
    assert schemas, "the extension registers no node"
    ids = [s.node_id for s in schemas]
    assert len(set(ids)) == len(ids), f"duplicate node ids: {ids}"
    for s in schemas:
        assert s.node_id.startswith("PSO"), s.node_id
        assert s.category.startswith("PSO/"), (s.node_id, s.category)
        assert s.description, f"{s.node_id} has no description"
        tips = [i.tooltip for i in s.inputs] + [o.tooltip for o in s.outputs]
        assert all(tips), f"{s.node_id}: every input and output needs a tooltip"
        assert len(set(tips)) == len(tips), f"{s.node_id}: tooltips must be distinct"


def test_node_ids_and_input_order_are_frozen(schemas):
    """Saved workflows store widget values by position: released ids and input orders never change.

    Inputs may only be appended; this list is the release record. Extend it, never edit it.
    """
    released = {
        "PSOFewStepSigmas": ["model", "schedule"],
        "PSOSampleReferences": ["model", "clip", "targets", "sampler", "sigmas", "seed",
                                "references_per_target", "vae"],
        "PSOBuildPairs": ["model", "targets", "references"],
        "PSOTargetImagesFromFolder": ["folder", "vae", "default_prompt", "size"],
        "PSOTargetImagesFromBatch": ["images", "vae", "prompt"],
        "PSOSavePairs": ["pairs", "name", "append"],
        "PSOLoadPairs": ["dataset", "model", "clip"],
        "PSOSaveLoRA": ["lora", "model", "filename_prefix", "settings"],
        "PSOLoraLoader": ["model", "lora_name", "strength"],
        "PSOPreferencePairs": ["model", "clip", "vae", "preferred", "rejected", "prompt", "sigmas"],
        "PSOTrain": ["model", "pairs", "method", "steps", "learning_rate", "beta", "lora_rank", "batch_size",
                     "grad_accumulation", "seed", "reference_refresh_every", "training_dtype",
                     "gradient_checkpointing", "checkpoint_every", "preview_every", "lora_target", "vae",
                     "resume_from", "reduction", "reference_step_counts", "target_sft_weight", "ema_decay",
                     "anchor_levels"],
        "PSORewardModelLoader": ["kind", "model_file", "head_file", "batch_size", "activation"],
        "PSOImportPreferencePairs": ["source", "model", "clip", "vae", "sigmas", "size", "max_pairs",
                                     "dataset_name"],
        "PSOEvaluate": ["prompts", "clip", "vae", "sampler", "schedule", "steps", "seed", "width", "height",
                        "model_1", "label_1", "reward_1", "model_2", "label_2", "model_3", "label_3",
                        "model_4", "label_4", "reward_2", "reward_3", "reward_4", "sigmas"],
        "PSOOnlineTrain": ["model", "clip", "prompts", "vae", "reward", "sampler", "sigmas", "latent",
                           "rounds",
                           "prompts_per_round", "samples_per_prompt", "tie_margin", "method", "beta",
                           "learning_rate", "lora_rank", "steps_per_round", "batch_size", "seed",
                           "checkpoint_every", "preview_every", "lora_target", "resume_from",
                           "first_step_weight"],
        "PSOPickPairs": ["model", "clip", "vae", "sampler", "sigmas", "prompts", "seed", "pairs_per_prompt",
                         "width", "height", "dataset_name"],
        "PSODemoModelLoader": ["model"],
        "PSODemoTargets": ["vae", "targets"],
    }
    by_id = {s.node_id: [i.id for i in s.inputs] for s in schemas}
    for node_id, inputs in released.items():
        assert node_id in by_id, f"released node {node_id} disappeared"
        assert by_id[node_id][: len(inputs)] == inputs, (node_id, by_id[node_id])
    unreleased = sorted(set(by_id) - set(released))
    assert not unreleased, f"add these nodes to the release record: {unreleased}"


def _node(node_id):
    return next(c for c in node_classes() if c.define_schema().node_id == node_id)


def test_few_step_sigmas_node_maps_timesteps_through_the_models_schedule(comfy_inprocess):
    from pso_test_fixtures import tiny_models

    model = tiny_models.build_model("sd15")
    ms = model.get_model_object("model_sampling")
    sigmas = _node("PSOFewStepSigmas").execute(model, "dmd2").result[0]
    expected = [float(ms.sigma(torch.tensor(t))) for t in (999, 749, 499, 249)] + [0.0]
    assert sigmas.tolist() == pytest.approx(expected, rel=1e-6)
    assert sigmas[0] == pytest.approx(14.6146, abs=1e-3)  # SD1.5's sigma_max


def test_few_step_sigmas_node_refuses_flow_models(comfy_inprocess):
    import comfy.model_sampling

    from pso_test_fixtures import tiny_models

    model = tiny_models.build_model("sd15")

    class FlowSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    model.add_object_patch("model_sampling", FlowSampling(model.model.model_config))
    with pytest.raises(ValueError, match="rectified-flow model.*BasicScheduler"):
        _node("PSOFewStepSigmas").execute(model, "dmd2")
