"""A real headless ComfyUI server with this extension loaded: registration, a graph, the web folder."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from PIL import Image

from extension_loader import node_classes
from tools.comfy_host import PACKAGE_NAME, ComfyServer, HostError
from tools.graphs import ADDED_INPUTS, adapt_to_host, pso_training_graph, tiny_sampling_graph

pytestmark = pytest.mark.server
REPO_ROOT = Path(__file__).resolve().parents[2]


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


def test_training_outputs_use_the_native_trainers_types(comfy_server):
    """PSO's LoRA and loss outputs connect to the native Save LoRA / Load LoRA Model / Plot Loss Graph
    nodes: the same type names the host's own TrainLoraNode gives and its consumers accept."""
    info = comfy_server.object_info()
    native = set(info["TrainLoraNode"]["output"])
    assert {"LORA_MODEL", "LOSS_MAP"} <= native
    for node in ("PSOTrain", "PSOOnlineTrain"):
        assert {"LORA_MODEL", "LOSS_MAP"} <= set(info[node]["output"]), info[node]["output"]
    assert info["LoraModelLoader"]["input"]["required"]["lora"][0] == "LORA_MODEL"
    assert info["LossGraphNode"]["input"]["required"]["loss"][0] == "LOSS_MAP"


def _our_scripts(server) -> list[str]:
    status, _, body = server.request("/extensions")
    assert status == 200
    return sorted(u for u in json.loads(body) if u.rsplit("/", 1)[-1].startswith("pso_"))


def test_a_clone_under_another_folder_name_registers_each_script_once(tmp_path):
    """The web folder is declared once (WEB_DIRECTORY): a checkout named unlike the project (a
    git clone into ComfyUI-PSO, a zip's comfyui-pso-main) must not serve every extension twice,
    once per name, which would register each frontend extension twice."""
    with ComfyServer(tmp_path, with_fixtures=False, package_name="ComfyUI-PSO-main") as server:
        scripts = _our_scripts(server)
    names = [u.rsplit("/", 1)[-1] for u in scripts]
    assert sorted(names) == sorted(p.name for p in (REPO_ROOT / "web").glob("pso_*.js")), scripts
    assert all(u.startswith("/extensions/ComfyUI-PSO-main/") for u in scripts), scripts


def test_a_graph_the_host_accepts_with_node_errors_is_refused(comfy_server):
    """ComfyUI answers 200 with node_errors and runs only the outputs that validated; queue() must
    fail loudly instead of letting the dependent outputs vanish."""
    graph = tiny_sampling_graph("sd15", prefix="node_errors")
    graph["save_bad"] = {"class_type": "SaveImage",
                         "inputs": {"images": ["decode", 0], "filename_prefix": "bad"}}
    graph["save_bad"]["inputs"]["images"] = ["latent", 0]  # a LATENT where IMAGE is required
    with pytest.raises(HostError, match="node errors") as err:
        comfy_server.queue(graph)
    assert "save_bad" in str(err.value)


def test_graphs_get_the_inputs_newer_hosts_added_only_where_this_host_declares_them(comfy_server):
    info = comfy_server.object_info()
    graph = adapt_to_host(pso_training_graph("sd15"), info)
    declared = info["LoraModelLoader"]["input"]
    names = {*declared.get("required", {}), *declared.get("optional", {})}
    assert ("bypass" in graph["load_lora"]["inputs"]) == ("bypass" in names)
    if "bypass" in names:  # 0.33: required; the graph means the patched (not bypass) LoRA
        assert graph["load_lora"]["inputs"]["bypass"] is ADDED_INPUTS["LoraModelLoader"]["bypass"] is False
    with pytest.raises(ValueError, match="PSONoSuchNode"):
        adapt_to_host({"x": {"class_type": "PSONoSuchNode", "inputs": {}}}, info)


def test_server_is_stopped_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), ComfyServer(tmp_path, with_fixtures=False) as server:
        pid, port = server.proc.pid, server.port
        raise RuntimeError("boom")
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the port still answers after stop()"


def test_a_port_where_another_comfyui_answers_is_left_for_a_port_of_its_own(tmp_path):
    """scripts/test.sh runs two hosts' tests side by side, each picking free ports: if another
    process's ComfyUI answers on the chosen port, the tests must never talk to it (a test of one host
    passing on the other's server); start() moves to another port and reaches its own server."""
    import http.server
    import threading

    asked = []

    class OtherComfy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            asked.append(self.path)
            body = json.dumps({"system": {"argv": ["main.py", "--base-directory", "/elsewhere"]}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OtherComfy)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        server = ComfyServer(tmp_path, with_fixtures=False)
        taken = other.server_address[1]
        server.port = taken
        with server:
            assert asked and asked[0] == "/system_stats"
            assert server.port != taken
            argv = server.get_json("/system_stats")["system"]["argv"]
            assert str(tmp_path) in argv, argv
    finally:
        other.shutdown()
        other.server_close()
