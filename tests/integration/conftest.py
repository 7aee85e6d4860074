"""Fixtures shared by the integration tests."""

from __future__ import annotations

import importlib

import pytest

from extension_loader import load_package


@pytest.fixture(scope="module")
def ext(comfy_inprocess):
    """The pack's LoRA-file modules as the host imports them (files, nodes, host_training, lora).
    A test file that needs other modules defines its own ``ext``, which takes precedence."""
    load_package()

    class Ext:
        files = importlib.import_module("comfyui-pso.nodes.lora_files")
        nodes = importlib.import_module("comfyui-pso.nodes.lora_nodes")
        host = importlib.import_module("comfyui-pso.nodes.host_training")
        lora = importlib.import_module("comfyui-pso.pso.lora")

    return Ext
