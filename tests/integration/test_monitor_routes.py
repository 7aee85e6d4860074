"""The training monitor on a real host: the ``pso.train`` websocket events of a training run, the
history routes a reloaded page redraws from, and the routes' refusals (path traversal, oversized
and malformed bodies, unknown ids), each with a clear error and nothing written anywhere."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest

from pso import io as pso_io
from tools.graphs import pso_training_graph

pytestmark = pytest.mark.server

ROUTES = "/pso/monitor"


class EventLog:
    """Every JSON message of one websocket client, collected in a thread."""

    def __init__(self, server):
        import websocket

        self.messages: list[dict] = []
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={server.client_id}",
                                              timeout=5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        import websocket

        while not self._stop.is_set():
            try:
                data = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketConnectionClosedException, OSError):
                return
            if data == "":  # the server closed the connection
                return
            if isinstance(data, str):
                self.messages.append(json.loads(data))
            else:  # a binary preview of the host's own progress bar
                self.messages.append({"type": "<binary>"})

    def events(self, kind: str) -> list[dict]:
        return [m["data"] for m in self.messages if m.get("type") == kind]

    def close(self):
        self._stop.set()
        self.ws.close()
        self._thread.join(timeout=10)


def _files(root) -> dict:
    """Every file under the server's base folder (but its log) with size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and p.name != "server.log"}


@pytest.fixture(scope="module")
def trained(comfy_server):
    """A 5-step PSO training run with a preview every step, watched over the websocket."""
    log = EventLog(comfy_server)
    try:
        graph = pso_training_graph("sd15", steps=5, prefix="monitor")
        prompt_id = comfy_server.queue(graph)
        comfy_server.wait(prompt_id, timeout=300)
        time.sleep(0.5)  # the last events are on their way
    finally:
        log.close()
    kinds = [m.get("type") for m in log.messages]
    first, last = kinds.index("pso.train"), len(kinds) - kinds[::-1].index("pso.train")
    assert "<binary>" not in kinds[first:last], "previews go to the chart, not also to the node"
    return prompt_id, log.events("pso.train")


def test_events_carry_every_step_of_the_running_training(comfy_server, trained):
    prompt_id, events = trained
    ours = [e for e in events if e["prompt_id"] == prompt_id]
    assert ours and {e["node_id"] for e in ours} == {"train"}
    assert ours[0]["status"] == "running" and ours[0]["points"] == []  # sent when training starts
    assert ours[-1]["status"] == "finished" and ours[-1]["step"] == 5 and ours[-1]["total"] == 5
    points = [p for e in ours for p in e["points"]]
    assert [p[0] for p in points] == [1, 2, 3, 4, 5], "each step once, in order"
    assert ours[0]["series"] == ["step", "loss", "implicit_accuracy", "margin", "saturated_fraction"]
    for step, loss, accuracy, margin, saturated in points:
        assert math.isfinite(loss) and loss > 0 and math.isfinite(margin), step
        assert 0 <= accuracy <= 1 and 0 <= saturated <= 1, step
    assert ours[-1]["method"] == "pso_offline"


def test_the_last_loss_is_the_one_the_checkpoint_records(comfy_server, trained):
    prompt_id, events = trained
    run = comfy_server.get_json(f"{ROUTES}/runs/{prompt_id}/train")
    folders = sorted((comfy_server.base_dir / "output" / "pso_checkpoints").glob("run_*"),
                     key=lambda p: p.stat().st_mtime)
    checkpoint = pso_io.load_checkpoint(folders[-1])
    assert checkpoint.step == 5
    assert [p[1] for p in run["points"]] == pytest.approx(checkpoint.state["loss_history"], rel=1e-6)


def test_the_preview_is_written_to_temp_and_served_by_view(comfy_server, trained):
    prompt_id, events = trained
    preview = [e["preview"] for e in events if e["prompt_id"] == prompt_id][-1]
    assert preview["type"] == "temp" and preview["subfolder"] == "pso_monitor" and preview["step"] == 5
    assert set(preview["filename"]) <= set("preview_0123456789abcdef.jpg")
    path = comfy_server.base_dir / "temp" / "pso_monitor" / preview["filename"]
    assert path.is_file()
    status, headers, body = comfy_server.request(
        f"/view?filename={preview['filename']}&subfolder=pso_monitor&type=temp")
    assert status == 200 and body == path.read_bytes() and body[:3] == b"\xff\xd8\xff"  # a JPEG


def test_history_routes_give_the_run_for_a_reloaded_page(comfy_server, trained):
    prompt_id, events = trained
    live = [p for e in events if e["prompt_id"] == prompt_id for p in e["points"]]
    run = comfy_server.get_json(f"{ROUTES}/runs/{prompt_id}/train")
    assert run["points"] == live and run["status"] == "finished" and run["step"] == 5
    assert comfy_server.get_json(f"/api{ROUTES}/runs/{prompt_id}/train") == run  # as the frontend asks
    listed = comfy_server.get_json(f"{ROUTES}/runs")["runs"]
    assert {"prompt_id": prompt_id, "node_id": "train"}.items() <= listed[0].items()
    assert "points" not in listed[0]
    status, answer = comfy_server.post_json(f"{ROUTES}/lookup", {"node_ids": ["train", "nope"]})
    assert status == 200 and list(answer["runs"]) == ["train"] and answer["runs"]["train"] == run
    # a graph queued without a workflow (the API) matches any workflow id
    status, answer = comfy_server.post_json(f"{ROUTES}/lookup", {"node_ids": ["train"], "workflow_id": "w-1"})
    assert status == 200 and answer["runs"]["train"]["prompt_id"] == prompt_id


def test_a_cancelled_run_shows_as_stopped_with_every_finished_step(comfy_server, trained):
    prompt_id = comfy_server.queue(pso_training_graph("sd15", steps=100_000, prefix="monitor_cancel", seed=3))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, _, body = comfy_server.request(f"{ROUTES}/runs/{prompt_id}/train")
        if status == 200 and len(json.loads(body)["points"]) >= 2:
            break
        time.sleep(0.2)
    running = comfy_server.get_json(f"{ROUTES}/runs/{prompt_id}/train")
    assert running["status"] == "running" and running["total"] == 100_000
    comfy_server.interrupt()
    comfy_server.wait(prompt_id, timeout=120)
    stopped = comfy_server.get_json(f"{ROUTES}/runs/{prompt_id}/train")
    assert stopped["status"] == "stopped"
    folders = sorted((comfy_server.base_dir / "output" / "pso_checkpoints").glob("run_*"),
                     key=lambda p: p.stat().st_mtime)
    checkpoint = pso_io.load_checkpoint(folders[-1])
    assert [p[0] for p in stopped["points"]] == list(range(1, checkpoint.step + 1))


BAD_IDS = ["..", "..%2F..%2Fetc", "a..b", "%2E%2E", "x%00y", "a%2Fb", "a%5Cb", "%20", "x" * 65, "%C3%A9"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_path_traversal_and_odd_ids_are_refused(comfy_server, trained, bad):
    prompt_id, _ = trained
    before = _files(comfy_server.base_dir)
    for path in (f"{ROUTES}/runs/{bad}/train", f"{ROUTES}/runs/{prompt_id}/{bad}"):
        status, _, body = comfy_server.request(path)
        assert status in (400, 404), (path, status)
        if status == 400:
            assert "invalid" in json.loads(body)["error"]
    assert _files(comfy_server.base_dir) == before


def test_unknown_runs_are_404_with_a_message(comfy_server, trained):
    status, _, body = comfy_server.request(f"{ROUTES}/runs/no-such-prompt/train")
    assert status == 404
    assert json.loads(body)["error"].startswith("no training run of node 'train' in prompt 'no-such-prompt'")
    status, answer = comfy_server.post_json(f"{ROUTES}/lookup", {"node_ids": ["12345"]})
    assert status == 200 and answer == {"runs": {}}


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"{not json", 400, "body is not valid JSON"),
    (b"\xff\xfe", 400, "body is not valid JSON"),
    (b"[1, 2]", 400, "body must be a JSON object, got list"),
    (b'{"node_ids": "13"}', 400, "node_ids must be a list of 1 to 256 node ids"),
    (b'{"node_ids": []}', 400, "node_ids must be a list of 1 to 256 node ids"),
    (json.dumps({"node_ids": [str(i) for i in range(257)]}).encode(), 400, "node_ids must be a list"),
    (b'{"node_ids": ["../../etc/passwd"]}', 400, "node_ids ['../../etc/passwd'] are not node ids"),
    (b'{"node_ids": [13]}', 400, "node_ids [13] are not node ids"),
    (b'{"node_ids": ["13"], "workflow_id": "../x"}', 400, "workflow_id '../x' is not a workflow id"),
    (b'{"node_ids": ["13"], "path": "/etc"}', 400, "unknown keys ['path']"),
    (b'{"node_ids": ["13"], "pad": "' + b"x" * 20_000 + b'"}', 413, "larger than 16384 bytes"),
    (b"[" * 16_000, 400, "nests too deep"),  # was a RecursionError: HTTP 500
])
def test_bad_lookup_bodies_are_refused(comfy_server, body, status, message):
    before = _files(comfy_server.base_dir)
    got, _, answer = comfy_server.request(f"{ROUTES}/lookup", body, method="POST",
                                          headers={"Content-Type": "application/json"})
    assert got == status
    assert message in json.loads(answer)["error"]
    assert _files(comfy_server.base_dir) == before


def test_an_oversized_body_is_refused_before_it_is_read(comfy_server):
    """A client that announces 10 MB gets 413 without the server waiting for the bytes."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", comfy_server.port, timeout=10)
    try:
        conn.putrequest("POST", f"{ROUTES}/lookup")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(10_000_000))
        conn.endheaders()
        conn.send(b'{"node_ids": [')
        response = conn.getresponse()
        assert response.status == 413
        assert "larger than 16384 bytes" in json.loads(response.read())["error"]
    finally:
        conn.close()
