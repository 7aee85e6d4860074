"""A real headless ComfyUI server with this extension loaded: registration, a graph, the web folder."""

from __future__ import annotations

import os
import socket

import pytest
from PIL import Image

from extension_loader import node_classes
from tools.comfy_host import PACKAGE_NAME, ComfyServer
from tools.graphs import tiny_sampling_graph

pytestmark = pytest.mark.server


def test_every_node_is_served_under_pso_category(comfy_server, comfy_inprocess):
    info = comfy_server.object_info()
    expected = {cls.define_schema().node_id for cls in node_classes()}
    ours = {k for k, v in info.items() if v.get("python_module", "").endswith(PACKAGE_NAME)}
    assert ours == expected, comfy_server.log_tail()
    for node_id in ours:
        assert info[node_id]["category"].startswith("PSO/"), (node_id, info[node_id]["category"])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_graph_runs_through_prompt_and_history(comfy_server, family):
    entry = comfy_server.run(tiny_sampling_graph(family, prefix=f"pso_smoke_{family}"), timeout=240)
    images = entry["outputs"]["save"]["images"]
    assert len(images) == 2  # batch of two
    for info in images:
        path = comfy_server.output_path(info)
        with Image.open(path) as img:
            assert img.size == (64, 64)
            extrema = img.convert("L").getextrema()
        assert extrema[0] != extrema[1], "decoded image is constant: the tiny model computes nothing"


def test_web_folder_is_served(comfy_server):
    status, _, body = comfy_server.request("/extensions")
    assert status == 200
    script = f"/extensions/{PACKAGE_NAME}/pso_appearance.js"
    assert script in body.decode()
    status, headers, body = comfy_server.request(script)
    assert status == 200
    assert "javascript" in headers.get("Content-Type", "")
    assert b'name: "PSO.Appearance"' in body
    status, _, body = comfy_server.request(f"/extensions/{PACKAGE_NAME}/pso_seed_control.js")
    assert status == 200 and b'name: "PSO.SeedControl"' in body


def test_server_is_stopped_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), ComfyServer(tmp_path, with_fixtures=False) as server:
        pid, port = server.proc.pid, server.port
        raise RuntimeError("boom")
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the port still answers after stop()"
