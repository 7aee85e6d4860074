"""Released workflows store combo values by text: every fixed choice list of the pack, its order and its
default are pinned here, so a refactor that regenerates them (from the loss registry, the LoRA targets,
the schedule table) cannot change what a saved workflow means. Lists read from the user's folders
(datasets, LoRA files, images, reward files) are left out: they depend on the machine."""

from __future__ import annotations

import pytest

from extension_loader import node_classes

FIXED = {
    "PSOFewStepSigmas.schedule": (["dmd2", "dmd2_1", "lcm_4", "turbo_4", "turbo_1", "lightning_4", "hyper_4",
                                   "lightning_2", "schnell_4", "zimage_turbo_8", "qwen_lightning_4",
                                   "qwen_lightning_8", "sd35_turbo_4", "wan_lightning_4"], "dmd2"),
    "PSOTrain.method": (["pso_offline", "pso_full", "pso_dreambooth", "pso_dreambooth_hinge", "sft"],
                        "pso_offline"),
    "PSOTrain.training_dtype": (["float32", "bf16", "fp16"], "float32"),
    "PSOTrain.lora_target": (["attention", "attention_mlp", "all_linear", "all"], "attention"),
    "PSOTrain.reduction": (["sum_inside", "per_transition"], "sum_inside"),
    "PSOTrain.anchor_levels": (["final", "pair"], "final"),
    "PSORewardModelLoader.kind": (["pickscore", "hpsv2", "aesthetic", "clip_score", "image_reward"],
                                  "pickscore"),
    "PSORewardModelLoader.activation": (["auto", "gelu", "quick_gelu"], "auto"),
    "PSOEvaluate.schedule": (["trailing", "lcm", "turbo", "simple", "sgm_uniform", "karras", "exponential",
                              "ddim_uniform", "beta", "normal", "linear_quadratic", "kl_optimal"],
                             "trailing"),
    "PSOEvaluate.preset": (["custom", "paper"], "custom"),
    "PSOOnlineTrain.method": (["pso_online", "pso_online_clipped"], "pso_online_clipped"),
    "PSOOnlineTrain.lora_target": (["attention", "attention_mlp", "all_linear", "all"], "attention"),
    "PSODemoModelLoader.model": (["digits", "shapes"], "digits"),
    "PSODemoTargets.targets": (["bold digits", "striped shapes"], "bold digits"),
}
#: Read from the user's folders (or the host's list of them), so not pinned.
FROM_FOLDERS = {"PSOTargetImagesFromFolder.folder", "PSOLoadPairs.dataset", "PSOLoraLoader.lora_name",
                "PSORewardModelLoader.model_file", "PSORewardModelLoader.head_file",
                "PSOImportPreferencePairs.source"}


@pytest.fixture(scope="module")
def combos(comfy_inprocess):
    out = {}
    for cls in node_classes():
        schema = cls.define_schema()
        for i in schema.inputs:
            if isinstance(getattr(i, "options", None), list):
                out[f"{schema.node_id}.{i.id}"] = i
    return out


def test_every_fixed_choice_list_is_the_released_one(combos):
    assert set(combos) == set(FIXED) | FROM_FOLDERS, "a combo input was added or removed: pin it here"
    for key, (options, default) in FIXED.items():
        assert list(combos[key].options) == options, key
        assert combos[key].default == default, key


def test_method_tooltips_describe_every_choice(combos):
    """The method tooltips (read from the loss registry) name each choice with its description."""
    assert combos["PSOTrain.method"].tooltip == (
        "pso_offline: offline PSO (Eq. 6): target and reference both forward-noised; with reference refresh, "
        "references are re-sampled from the current model (the default); pso_full: full PSO (Eq. 5): "
        "reference transitions scored under the model's own sampler policy; needs a stochastic sampler "
        "(lcm / euler_ancestral); pso_dreambooth: DreamBooth-style PSO: clean-image errors weighted by "
        "sigma^-2, reference term x0.1; pso_dreambooth_hinge: DreamBooth-style hinge form without the frozen "
        "model (authors' default); sft: plain diffusion-loss fine-tuning on the targets only (the blurry "
        "baseline, for comparison)")
    assert combos["PSOOnlineTrain.method"].tooltip == (
        "pso_online: Eq. 7: online PSO: two sampled trajectories ranked by a reward model (default beta 5); "
        "pso_online_clipped: Eq. 7 (authors' code): online PSO as the authors run it: ratio clipped to "
        "[0.9, 1.1], one log-sigmoid a step (default beta 50)")


def test_beta_defaults_and_tooltips_read_from_the_registry_are_the_released_ones(comfy_inprocess):
    """The beta widgets' defaults and the values their tooltips name come from the loss registry's beta
    per data source; they are what the nodes said since release, except PSO Online Train's default,
    which moved with its default method to pso_online_clipped's 50 on 2026-12-06 (bench/README.md)."""
    schemas = {cls.define_schema().node_id: cls.define_schema() for cls in node_classes()}
    train = next(i for i in schemas["PSOTrain"].inputs if i.id == "beta")
    online = next(i for i in schemas["PSOOnlineTrain"].inputs if i.id == "beta")
    assert (train.default, online.default) == (10.0, 50.0)
    assert train.tooltip.startswith(
        "Strength of the pull toward the original model (errors are per-element means). 10 (default) for "
        "references your model sampled itself (PSO Sample References, re-sampled during training); 50 for "
        "preference pairs (Pick-a-Pic, PSO Pick Pairs), the paper's offline value.")
    assert online.tooltip == (
        "Strength of the pull toward the original model (> 0): 50 for pso_online_clipped (the authors' code, "
        "the default), 5 for pso_online (the paper's Eq. 7). Set it with the method: the two scale it "
        "differently.")
