"""Packaging conventions ComfyUI users rely on (issue: host-faithful training and conventions)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
HOST_PROVIDED = {"torch", "torchvision", "torchaudio"}


def _requirement_names(lines):
    names = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.append(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower())
    return names


def test_requirements_never_list_the_hosts_torch():
    """ComfyUI Manager installs requirements.txt; a torch line would replace the user's CUDA build."""
    req = _requirement_names((REPO / "requirements.txt").read_text().splitlines())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = _requirement_names(project["dependencies"])
    assert req, "requirements.txt lists nothing"
    assert not HOST_PROVIDED & set(req), req
    assert not HOST_PROVIDED & set(deps), deps
    assert sorted(req) == sorted(deps), "requirements.txt and [project].dependencies disagree"


def test_registry_metadata_is_complete():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"]
    assert "web" in comfy["includes"] and (REPO / "web").is_dir()
    assert "Operating System :: OS Independent" in meta["project"]["classifiers"]
    assert any("GPLv3" in c for c in meta["project"]["classifiers"]), "the classifier names LICENSE's GPL v3"
    assert "GNU GENERAL PUBLIC LICENSE" in (REPO / "LICENSE").read_text()[:200]
    assert meta["project"]["license"] == {"file": "LICENSE"} and (REPO / "LICENSE").read_text().strip()
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_nodes_use_the_versioned_host_api_and_pso_never_imports_the_host():
    for path in (REPO / "nodes").glob("*.py"):
        mods = _imports(path)
        latest = [m for m in mods if m.startswith("comfy_api.latest")]
        assert not latest, f"{path.name} imports {latest}; use the versioned comfy_api.v0_0_2"
        assert not any(m == "pso" or m.startswith("pso.") for m in mods), \
            f"{path.name} imports pso absolutely; the host loads the package by path, use `from ..pso`"
    for path in (REPO / "pso").glob("*.py"):
        mods = _imports(path)
        roots = {"comfy", "comfy_api", "folder_paths", "server", "nodes"}
        host = {m for m in mods if m.split(".")[0] in roots}
        assert not host, f"pso/{path.name} imports the host: {host}"


def test_the_web_folder_is_declared_once():
    """WEB_DIRECTORY (read by every ComfyUI install) and not also [tool.comfy].web: with both, a
    checkout named unlike the project serves the folder under two prefixes and every frontend
    extension registers twice (tests/integration/test_server.py starts such a clone)."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "web" not in meta["tool"]["comfy"]
    tree = ast.parse((REPO / "__init__.py").read_text())
    declared = [n.value.value for n in tree.body if isinstance(n, ast.Assign)
                and [t.id for t in n.targets if isinstance(t, ast.Name)] == ["WEB_DIRECTORY"]]
    assert declared == ["./web"]


def _comfyignore_patterns() -> list[str]:
    lines = (REPO / ".comfyignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    # only plain top-level names / folders, so that the simple matcher below is exact
    assert all(re.fullmatch(r"[\w.-]+/?", p) for p in patterns), patterns
    return patterns


def _left_out(path: str, patterns: list[str]) -> bool:
    top = path.split("/", 1)[0]
    return any((p.endswith("/") and "/" in path and top == p[:-1]) or path == p for p in patterns)


def test_comfyignore_keeps_development_code_out_and_everything_the_host_loads_in():
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    patterns = _comfyignore_patterns()
    out = {f for f in tracked if _left_out(f, patterns)}
    for folder in ("tests", "tools", "scripts", "bench", "docs", ".ci"):
        inside = [f for f in tracked if f.startswith(folder + "/")]
        assert inside and set(inside) <= out, f"{folder}/ must be left out of the pack"
    kept = set(tracked) - out
    for needed in ("__init__.py", "pyproject.toml", "requirements.txt", "LICENSE", "README.md",
                   "web/pso_training_monitor.js", "demo_model/pso_demo_digits.safetensors",
                   "demo_model/pso_demo_shapes.safetensors", "demo_model/striped_shapes/shape0_0.png"):
        assert needed in kept, needed
    for folder in ("nodes", "pso", "web", "example_workflows"):
        inside = [f for f in tracked if f.startswith(folder + "/")]
        assert inside and set(inside) <= kept, f"{folder}/ must ship"
    # what ships never imports what is left out (the host would fail to load the pack)
    for f in kept:
        if f.endswith(".py"):
            mods = _imports(REPO / f)
            assert not {m for m in mods if m.split(".")[0] in ("tools", "tests", "bench", "scripts")}, f
