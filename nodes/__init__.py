"""The thin ComfyUI layer of comfyui-pso (V3 node schema).

Nodes unpack inputs, build a config, call ``pso`` and wrap the outputs. The host API is imported
through the versioned module ``comfy_api.v0_0_2`` (ComfyUI >= 0.3.75 is what the tests run on).
"""

from __future__ import annotations

import logging

from comfy_api.v0_0_2 import ComfyExtension, io

from .data_nodes import PSOBuildPairs, PSOSampleReferences
from .dataset_nodes import PSOLoadPairs, PSOSavePairs
from .demo_nodes import PSODemoModelLoader, PSODemoTargets
from .eval_nodes import PSOEvaluate
from .lora_nodes import PSOLoraLoader, PSOSaveLoRA
from .online_nodes import PSOOnlineTrain
from .pair_picker import PSOPickPairs
from .pickapic_nodes import PSOImportPreferencePairs
from .preference_nodes import PSOPreferencePairs
from .reward_nodes import PSORewardModelLoader
from .schedule_nodes import PSOFewStepSigmas
from .target_nodes import PSOTargetImagesFromBatch, PSOTargetImagesFromFolder
from .train_nodes import PSOTrain

logger = logging.getLogger(__name__)

NODES: list[type[io.ComfyNode]] = [
    PSOTargetImagesFromFolder,
    PSOTargetImagesFromBatch,
    PSOFewStepSigmas,
    PSOSampleReferences,
    PSOBuildPairs,
    PSOSavePairs,
    PSOLoadPairs,
    PSOPreferencePairs,
    PSOTrain,
    PSOSaveLoRA,
    PSOLoraLoader,
    PSORewardModelLoader,
    PSOImportPreferencePairs,
    PSOEvaluate,
    PSOOnlineTrain,
    PSOPickPairs,
    PSODemoModelLoader,
    PSODemoTargets,
]


class PSOExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
