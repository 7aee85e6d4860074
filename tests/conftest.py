"""Shared pytest set-up.

- ``slow`` tests (real-size models) are skipped unless ``--run-slow`` or ``PSO_RUN_SLOW=1``.
- ``comfy_server`` starts one real headless ComfyUI for the session, always stopped at the end.
- ``comfy_inprocess`` puts the host on ``sys.path`` for tests that call ComfyUI classes directly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # for `tools` and `pso`


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (real-size models)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("PSO_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow real-size check: run with --run-slow or PSO_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    from tools.comfy_host import ComfyServer

    server = ComfyServer(tmp_path_factory.mktemp("comfy_base"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def comfy_inprocess():
    """Import the ComfyUI host in this process (CPU mode), with the fixture node package on the path."""
    from tools.comfy_host import host_sys_path

    for entry in reversed([*host_sys_path(), str(REPO_ROOT / "tests" / "fixtures")]):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    import comfy.model_management  # noqa: F401

    return sys.modules["comfy.model_management"]


@pytest.fixture()
def output_dir(tmp_path, comfy_inprocess):
    """Point the in-process host's output folder at a fresh tmp folder for one test."""
    import folder_paths

    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    yield tmp_path
    folder_paths.set_output_directory(old)


# -- shared by the LoRA-file tests (stock loader, PSO loader, diffusers) ------------------------------

@pytest.fixture(scope="module")
def bundles(comfy_inprocess):
    import torch

    from pso_test_fixtures import tiny_models

    with torch.inference_mode():  # as a loader node builds them inside the host
        return {f: tiny_models.build_bundle(f, seed=4) for f in ("sd15", "sdxl")}


@pytest.fixture
def loras(tmp_path, comfy_inprocess):
    """A temporary loras folder as ComfyUI's only one; the host's configuration is restored after."""
    import folder_paths

    root = tmp_path / "loras"
    root.mkdir()
    saved = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(root)], saved[1])
    folder_paths.filename_list_cache.pop("loras", None)
    try:
        yield root
    finally:
        folder_paths.folder_names_and_paths["loras"] = saved
        folder_paths.filename_list_cache.pop("loras", None)
