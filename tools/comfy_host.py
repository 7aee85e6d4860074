"""Start and drive a real headless ComfyUI server with this extension loaded.

Used by the integration tests, the demo and the benchmarks. The host is the ComfyUI checkout named
by ``COMFYUI_PATH`` or, by default, the one ``scripts/bootstrap.sh`` put in ``.host/ComfyUI``.
The server runs in its own process with its own base directory (models, input, output, user,
custom_nodes), so nothing of a user's ComfyUI install is touched, and it is always stopped when the
``with`` block ends, whatever happened inside.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_NAME = "comfyui-pso"
FIXTURE_NODES = REPO_ROOT / "tests" / "fixtures" / "pso_test_fixtures"
TORCHVISION_STUB = REPO_ROOT / "tests" / "host" / "stubs"


class HostError(RuntimeError):
    """The ComfyUI test host is missing, did not start, or a graph failed."""


def host_path() -> Path:
    """The ComfyUI checkout to run: ``$COMFYUI_PATH`` or ``<repo>/.host/ComfyUI``."""
    path = Path(os.environ.get("COMFYUI_PATH") or REPO_ROOT / ".host" / "ComfyUI").resolve()
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        raise HostError(
            f"no ComfyUI checkout at {path} (main.py and comfy/ expected); run `bash scripts/bootstrap.sh` "
            "or set COMFYUI_PATH to your own ComfyUI folder"
        )
    return path


def host_version() -> str | None:
    """The version that :func:`host_path`'s ``comfyui_version.py`` declares, e.g. "0.3.75"; None where
    there is no host or the file does not say."""
    try:
        text = (host_path() / "comfyui_version.py").read_text(encoding="utf-8")
    except (HostError, OSError):
        return None
    found = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
    return found.group(1) if found else None


def stub_paths() -> list[str]:
    """The torchvision stand-in's folder, only when no real torchvision can be imported."""
    spec = importlib.util.find_spec("torchvision")
    real = spec is not None and not str(spec.origin or "").startswith(str(TORCHVISION_STUB))
    return [] if real else [str(TORCHVISION_STUB)]


def host_sys_path() -> list[str]:
    """Entries to put in front of ``sys.path`` to import the host in-process."""
    return [*stub_paths(), str(host_path())]


def _argv(stats) -> list | None:
    """The command line a ``/system_stats`` answer reports, or None where it has none."""
    system = stats.get("system") if isinstance(stats, dict) else None
    argv = system.get("argv") if isinstance(system, dict) else None
    return argv if isinstance(argv, list) else None


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        return
    link.symlink_to(target, target_is_directory=True)


class ComfyServer:
    """A headless ComfyUI process; use as a context manager.

    ``with_fixtures`` also loads the test-only node package ``tests/fixtures/pso_test_fixtures``
    (tiny models built through ComfyUI's classes); it is linked into this server's private
    ``custom_nodes`` folder only, never into a user's install.
    """

    def __init__(self, base_dir: Path, *, with_fixtures: bool = True, startup_timeout: float = 180.0,
                 extra_args: list[str] | None = None, package_name: str = PACKAGE_NAME):
        self.base_dir = Path(base_dir).resolve()
        self.package_name = package_name  # the folder name in custom_nodes (a clone can be named anything)
        self.with_fixtures = with_fixtures
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args or [])
        self.port = free_port()
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base_dir / "server.log"
        self._log_file = None
        self._object_info: dict | None = None

    # -- life cycle -------------------------------------------------------------------------------
    def __enter__(self) -> ComfyServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, attempt: int = 1) -> None:
        host = host_path()
        for sub in ("models/loras", "models/checkpoints", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        _link(REPO_ROOT, self.base_dir / "custom_nodes" / self.package_name)
        if self.with_fixtures:
            _link(FIXTURE_NODES, self.base_dir / "custom_nodes" / FIXTURE_NODES.name)
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        # main.py's own folder is on the server's path already (it runs from the host folder).
        inherited = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
        env["PYTHONPATH"] = os.pathsep.join(stub_paths() + inherited)
        cmd = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base_dir), "--disable-api-nodes",
            "--database-url", "sqlite:///:memory:", "--disable-auto-launch", *self.extra_args,
        ]
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=host, env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HostError(f"ComfyUI exited with code {self.proc.returncode} during start-up:\n"
                                + self.log_tail())
            try:
                stats = self.get_json("/system_stats", timeout=2)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.25)
                continue
            if self._is_this_server(stats):
                return
            # Another process's ComfyUI answers on the port free_port() chose (scripts/test.sh runs two
            # hosts' tests side by side): never talk to it; start again on another port.
            self.stop()
            if attempt >= 3:
                raise HostError(f"port {self.port} is served by another ComfyUI (argv {_argv(stats)}), "
                                "three ports in a row")
            self.port = free_port()
            return self.start(attempt=attempt + 1)
        self.stop()
        raise HostError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s:\n" + self.log_tail())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _is_this_server(self, stats) -> bool:
        """Whether ``/system_stats`` came from this object's process: its argv names this base folder."""
        argv = _argv(stats)
        if argv is None:
            return False
        pairs = zip(argv, argv[1:], strict=False)
        return any(a == "--base-directory" and b == str(self.base_dir) for a, b in pairs)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"

    # -- HTTP -------------------------------------------------------------------------------------
    def request(self, path: str, data: bytes | None = None, *, method: str | None = None,
                headers: dict | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def get_json(self, path: str, timeout: float = 30):
        status, _, body = self.request(path, timeout=timeout)
        if status != 200:
            raise HostError(f"GET {path} answered {status}: {body[:500]!r}")
        return json.loads(body)

    def post_json(self, path: str, obj) -> tuple[int, object]:
        status, _, body = self.request(path, json.dumps(obj).encode(), method="POST",
                                       headers={"Content-Type": "application/json"})
        try:
            return status, json.loads(body) if body else None
        except json.JSONDecodeError:
            return status, body.decode(errors="replace")

    def object_info(self) -> dict:
        """The host's ``/object_info`` now (combo lists such as the loras folder's files change)."""
        return self.get_json("/object_info")

    def version(self) -> str:
        """The running ComfyUI's version string (``/system_stats``), e.g. "0.3.75"."""
        return str(self.get_json("/system_stats")["system"]["comfyui_version"])

    def queue(self, graph: dict) -> str:
        """Queue an API-format graph (adapted to this host's node inputs, tools.graphs.adapt_to_host).

        Raises HostError when the host refuses it, and also when it accepts it with ``node_errors``:
        ComfyUI answers 200 and runs only the outputs that validated, silently dropping the rest.
        """
        from tools.graphs import adapt_to_host

        if self._object_info is None:  # which inputs each node has does not change while it runs
            self._object_info = self.object_info()
        graph = adapt_to_host(graph, self._object_info)
        status, answer = self.post_json("/prompt", {"prompt": graph, "client_id": self.client_id})
        if status != 200:
            raise HostError(f"/prompt refused the graph ({status}): {json.dumps(answer, indent=1)[:4000]}")
        if isinstance(answer, dict) and answer.get("node_errors"):
            raise HostError(
                f"/prompt accepted the graph as prompt {answer.get('prompt_id')} but with node errors, so "
                "the outputs that depend on these nodes would be dropped: "
                f"{json.dumps(answer['node_errors'], indent=1)[:4000]}")
        return answer["prompt_id"]

    def interrupt(self) -> None:
        self.request("/interrupt", b"", method="POST")

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """Wait for a queued prompt to finish; return its ``/history`` entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get_json(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if not self.running:
                raise HostError("ComfyUI exited while running a graph:\n" + self.log_tail())
            time.sleep(0.2)
        raise HostError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n" + self.log_tail())

    def run(self, graph: dict, timeout: float = 300) -> dict:
        """Queue ``graph`` and wait; raise with the host's own error message if it failed."""
        entry = self.wait(self.queue(graph), timeout)
        if entry["status"]["status_str"] != "success":
            raise HostError("graph failed:\n" + json.dumps(entry["status"].get("messages"), indent=1)[-6000:])
        return entry

    def output_path(self, image_info: dict) -> Path:
        """Where an image listed in a history entry lies on disk."""
        root = self.base_dir / (image_info.get("type") or "output")
        return root / image_info.get("subfolder", "") / image_info["filename"]
