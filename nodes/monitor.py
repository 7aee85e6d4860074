"""Live training monitor: what the training nodes report while they train, for the chart that
``web/pso_training_monitor.js`` draws on the node.

Each optimizer step adds one point ``[step, loss, implicit_accuracy, margin, saturated_fraction]``
(``pso.losses`` metrics; ``null`` where a method has none or a value is not finite) to the run of
(prompt id, node id). Points go to the browser that queued the prompt as the websocket event
``pso.train`` (at most every :data:`SEND_INTERVAL_S`, each event carrying every point since the last
one) and stay in a bounded in-memory history (:data:`MAX_RUNS` runs of at most :data:`MAX_POINTS`
points, thinned to every 2nd, 4th, ... step as a run grows), so that a reloaded page redraws the
chart of the running and of recently finished runs through the routes below. The latest training
preview is written to ``<temp>/pso_monitor/`` (one file per run, replaced atomically) and named in
the event as ComfyUI's ``/view`` route serves it (``type=temp``).

HTTP routes (``/api`` prefixed too; they read memory only and write nothing):

- ``GET  /pso/monitor/runs``: summaries of the kept runs, newest first;
- ``GET  /pso/monitor/runs/{prompt_id}/{node_id}``: one run with its points (404 if unknown);
- ``POST /pso/monitor/lookup`` ``{"node_ids": [...], "workflow_id": "..." | null}``: the newest run of
  each listed node (of that workflow, when the run knows its workflow), for redrawing after a reload.

Ids are short strings of letters, digits and ``_ - . :`` (no ``..``); bodies are at most
:data:`MAX_BODY_BYTES`; anything else is refused with a 400/404/413 and a message saying why.
Nothing here imports the host at module level; the server is only looked up when it is running.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EVENT = "pso.train"
ROUTE_PREFIX = "/pso/monitor"
PREVIEW_SUBFOLDER = "pso_monitor"
METRICS = ("implicit_accuracy", "margin", "saturated_fraction")
MAX_POINTS = 2000
MAX_RUNS = 32
MAX_BODY_BYTES = 16 * 1024
MAX_LOOKUP_IDS = 256
SEND_INTERVAL_S = 0.1
SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.:-]{0,63}")
STATUSES = ("running", "finished", "interrupted", "stopped")


def is_safe_id(value: Any) -> bool:
    """A prompt, node or workflow id the routes accept: 1-64 of ``A-Z a-z 0-9 _ - . :``, no ``..``."""
    return isinstance(value, str) and SAFE_ID.fullmatch(value) is not None and ".." not in value


def _finite(value: Any) -> float | None:
    """JSON has no NaN/inf (a browser's JSON.parse refuses them): those become None."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def make_point(step: int, loss: Any, metrics: Mapping[str, Any]) -> list:
    """``[step, loss, implicit_accuracy, margin, saturated_fraction]`` with None for missing values."""
    return [int(step), _finite(loss), *(_finite(metrics.get(k)) for k in METRICS)]


def thin(points: list[list], stride: int) -> list[list]:
    """Keep the points whose step is a multiple of ``stride`` (the history after doubling it)."""
    return [p for p in points if p[0] % stride == 0]


@dataclass
class Run:
    """The monitor's record of one training node in one prompt."""

    prompt_id: str
    node_id: str
    total: int
    method: str = ""
    workflow_id: str | None = None
    client_id: str | None = None
    status: str = "running"
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    stride: int = 1
    points: list[list] = field(default_factory=list)
    last: list | None = None
    preview: dict | None = None

    def add(self, point: list, max_points: int = MAX_POINTS) -> None:
        """Keep ``point`` if its step is on the current stride; double the stride when full."""
        self.last, self.updated = point, time.time()
        if point[0] % self.stride:
            return
        self.points.append(point)
        while len(self.points) > max_points:
            self.stride *= 2
            self.points = thin(self.points, self.stride)

    def history(self) -> list[list]:
        """The kept points plus the latest one (always shown, even between strides)."""
        if self.last is not None and (not self.points or self.points[-1][0] != self.last[0]):
            return [*self.points, self.last]
        return list(self.points)

    def to_json(self, running_prompts: Iterable[str] | None = None, with_points: bool = True) -> dict:
        status = self.status
        if status == "running" and running_prompts is not None and self.prompt_id not in set(running_prompts):
            status = "stopped"  # cancelled or failed: the prompt is no longer executing
        out = {"prompt_id": self.prompt_id, "node_id": self.node_id, "workflow_id": self.workflow_id,
               "method": self.method, "total": self.total, "status": status,
               "step": self.last[0] if self.last else 0, "started": self.started, "updated": self.updated,
               "series": ["step", "loss", *METRICS], "preview": self.preview}
        if with_points:
            out["points"] = self.history()
        return out


class MonitorStore:
    """The bounded in-memory history of runs (thread-safe: training and routes use it)."""

    def __init__(self, max_runs: int = MAX_RUNS, max_points: int = MAX_POINTS):
        self.max_runs, self.max_points = max_runs, max_points
        self._runs: dict[tuple[str, str], Run] = {}
        self._lock = threading.Lock()

    def start(self, run: Run) -> list[Run]:
        """Add (or restart) a run; returns the runs evicted to stay within ``max_runs``."""
        with self._lock:
            self._runs.pop((run.prompt_id, run.node_id), None)
            self._runs[(run.prompt_id, run.node_id)] = run
            evicted = []
            while len(self._runs) > self.max_runs:
                oldest = min(self._runs.values(), key=lambda r: (r.status == "running", r.updated))
                evicted.append(self._runs.pop((oldest.prompt_id, oldest.node_id)))
            return evicted

    def add(self, run: Run, point: list) -> None:
        with self._lock:
            run.add(point, self.max_points)

    def get(self, prompt_id: str, node_id: str) -> Run | None:
        with self._lock:
            return self._runs.get((prompt_id, node_id))

    def runs(self) -> list[Run]:
        """Newest first."""
        with self._lock:
            return sorted(self._runs.values(), key=lambda r: r.started, reverse=True)

    def latest(self, node_ids: Iterable[str], workflow_id: str | None) -> dict[str, Run]:
        """The newest run of each node id (runs of another known workflow do not count)."""
        wanted, found = set(node_ids), {}
        for run in self.runs():
            if run.node_id in wanted and run.node_id not in found and (
                    workflow_id is None or run.workflow_id in (None, workflow_id)):
                found[run.node_id] = run
        return found


STORE = MonitorStore()


# -- the running host (looked up, never imported) --------------------------------------------------

def prompt_server():
    """ComfyUI's running PromptServer, or None (nodes imported in-process, e.g. by a test)."""
    module = sys.modules.get("server")
    return getattr(getattr(module, "PromptServer", None), "instance", None)


def _running_items(server) -> list:
    queue = getattr(server, "prompt_queue", None)
    if queue is None:
        return []
    running, _ = queue.get_current_queue_volatile()
    return list(running)


def running_prompt_ids(server=None) -> set[str]:
    server = server or prompt_server()
    return {item[1] for item in _running_items(server)} if server is not None else set()


def _extra_data(server, prompt_id: str) -> dict:
    for item in _running_items(server):
        if item[1] == prompt_id and len(item) > 3 and isinstance(item[3], dict):
            return item[3]
    return {}


def _workflow_id(extra: Mapping) -> str | None:
    workflow = (extra.get("extra_pnginfo") or {}).get("workflow") if isinstance(extra, Mapping) else None
    wid = workflow.get("id") if isinstance(workflow, Mapping) else None
    return wid if is_safe_id(wid) else None


def preview_filename(prompt_id: str, node_id: str) -> str:
    """A file name made only of hex digits, whatever the ids hold."""
    digest = hashlib.sha256(f"{prompt_id}\0{node_id}".encode()).hexdigest()[:24]
    return f"preview_{digest}.jpg"


def _temp_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_temp_directory()).resolve()


def _remove_preview(run: Run) -> None:
    if not run.preview:
        return
    folder = (_temp_dir() / PREVIEW_SUBFOLDER).resolve()
    path = (folder / run.preview["filename"]).resolve()
    if path.parent == folder:
        path.unlink(missing_ok=True)


class TrainingMonitor:
    """What a training node calls: :meth:`start` before training, :meth:`record` with every trainer
    event, :meth:`preview` with each training preview, :meth:`finish` at the end. Outside a running host
    (in-process tests) there is no executing prompt and every call does nothing."""

    def __init__(self, run: Run | None, server=None, store: MonitorStore = STORE):
        self.run, self.server, self.store = run, server, store
        self._pending: list[list] = []
        self._last_sent = 0.0

    @property
    def active(self) -> bool:
        """True when a host runs this training for a prompt (the chart then shows the previews)."""
        return self.run is not None

    @classmethod
    def start(cls, total_steps: int, method: str, store: MonitorStore = STORE) -> TrainingMonitor:
        from comfy_execution.utils import get_executing_context

        ctx = get_executing_context()
        server = prompt_server()
        if ctx is None or server is None:
            return cls(None)
        extra = _extra_data(server, ctx.prompt_id)
        run = Run(prompt_id=str(ctx.prompt_id), node_id=str(ctx.node_id), total=int(total_steps),
                  method=method, workflow_id=_workflow_id(extra),
                  client_id=extra.get("client_id") or server.client_id)
        for old in store.start(run):
            _remove_preview(old)
        monitor = cls(run, server, store)
        monitor._send(force=True)
        return monitor

    def record(self, event) -> None:
        """A trainer event (``pso.trainer.TrainEvent``); only optimizer steps make points."""
        if self.run is None or event.phase != "step":
            return
        point = make_point(event.step, event.loss, event.metrics)
        self.store.add(self.run, point)
        self._pending.append(point)
        self._send(force=event.step >= self.run.total)

    def preview(self, image, step: int) -> None:
        """The training preview (a PIL image) made after optimizer step ``step``."""
        if self.run is None:
            return
        self._save_preview(image, step)
        self._send(force=True)

    def finish(self, interrupted: bool = False) -> None:
        if self.run is None:
            return
        self.run.status = "interrupted" if interrupted else "finished"
        self.run.updated = time.time()
        self._send(force=True)

    def _save_preview(self, image, step: int) -> None:
        """Replace this run's preview file (atomically: the browser never reads half a JPEG)."""
        from ..pso.io import atomic_write_bytes

        buffer = _io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
        name = preview_filename(self.run.prompt_id, self.run.node_id)
        atomic_write_bytes(_temp_dir() / PREVIEW_SUBFOLDER / name, buffer.getvalue())
        self.run.preview = {"filename": name, "subfolder": PREVIEW_SUBFOLDER, "type": "temp",
                            "step": int(step)}

    def _send(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.server is None or (not force and now - self._last_sent < SEND_INTERVAL_S):
            return
        data = self.run.to_json(with_points=False)
        data["points"], self._pending = self._pending, []
        self._last_sent = now
        self.server.send_sync(EVENT, data, self.run.client_id)


# -- HTTP routes ----------------------------------------------------------------------------------

class RequestError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_lookup(body: bytes) -> tuple[list[str], str | None]:
    """Validate a lookup body; returns (node ids, workflow id or None)."""
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(413, f"body of {len(body)} bytes is larger than {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"body is not valid JSON: {exc}") from exc
    except RecursionError:  # 16 KiB of "[" nests deeper than Python's parser goes: a 400, not a 500
        raise RequestError(400, "body is not valid JSON of the expected form: it nests too deep; send "
                           '{"node_ids": [...], "workflow_id": ...}') from None
    if not isinstance(data, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {"node_ids", "workflow_id"})
    if unknown:
        raise RequestError(400, f"unknown keys {unknown}; allowed: ['node_ids', 'workflow_id']")
    node_ids, workflow_id = data.get("node_ids"), data.get("workflow_id")
    if not isinstance(node_ids, list) or not 1 <= len(node_ids) <= MAX_LOOKUP_IDS:
        raise RequestError(400, f"node_ids must be a list of 1 to {MAX_LOOKUP_IDS} node ids")
    bad = [n for n in node_ids if not is_safe_id(n)]
    if bad:
        raise RequestError(400, f"node_ids {bad[:5]!r} are not node ids (1-64 of letters, digits, _ - . :)")
    if workflow_id is not None and not is_safe_id(workflow_id):
        raise RequestError(400, f"workflow_id {str(workflow_id)[:80]!r} is not a workflow id")
    return list(dict.fromkeys(node_ids)), workflow_id


def _error(status: int, message: str):
    from aiohttp import web

    return web.json_response({"error": message}, status=status)


async def _read_body(request) -> bytes:
    """At most MAX_BODY_BYTES + 1 bytes (a larger body is refused before it is read whole)."""
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise RequestError(413, f"body of {length} bytes is larger than {MAX_BODY_BYTES} bytes")
    return await request.content.read(MAX_BODY_BYTES + 1)


def make_handlers(store: MonitorStore = STORE, server_getter=prompt_server) -> dict:
    from aiohttp import web

    async def list_runs(request):
        running = running_prompt_ids(server_getter())
        return web.json_response({"runs": [r.to_json(running, with_points=False) for r in store.runs()]})

    async def get_run(request):
        prompt_id, node_id = request.match_info["prompt_id"], request.match_info["node_id"]
        for name, value in (("prompt id", prompt_id), ("node id", node_id)):
            if not is_safe_id(value):
                return _error(400, f"{name} {value[:80]!r} is invalid: 1-64 of letters, digits, _ - . : "
                                   "and no '..'")
        run = store.get(prompt_id, node_id)
        if run is None:
            return _error(404, f"no training run of node {node_id!r} in prompt {prompt_id!r} is kept "
                               f"(the monitor keeps the last {store.max_runs} runs since the server started)")
        return web.json_response(run.to_json(running_prompt_ids(server_getter())))

    async def lookup(request):
        try:
            node_ids, workflow_id = parse_lookup(await _read_body(request))
        except RequestError as exc:
            return _error(exc.status, str(exc))
        running = running_prompt_ids(server_getter())
        found = store.latest(node_ids, workflow_id)
        return web.json_response({"runs": {k: r.to_json(running) for k, r in found.items()}})

    return {"list": list_runs, "get": get_run, "lookup": lookup}


_registered = False


def register_routes() -> bool:
    """Add the routes to the running server's route table (once; before the host starts serving).
    Returns False where there is no server (e.g. the nodes imported in-process by a test)."""
    global _registered
    server = prompt_server()
    if _registered or server is None:
        return _registered
    handlers = make_handlers()
    routes = server.routes
    routes.get(f"{ROUTE_PREFIX}/runs")(handlers["list"])
    routes.get(f"{ROUTE_PREFIX}/runs/{{prompt_id}}/{{node_id}}")(handlers["get"])
    routes.post(f"{ROUTE_PREFIX}/lookup")(handlers["lookup"])
    _registered = True
    logger.debug("PSO monitor routes registered under %s", ROUTE_PREFIX)
    return True
