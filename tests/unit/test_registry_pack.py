"""What the Comfy Registry would receive: the pack built by the registry's own client.

``comfy node pack`` (comfy-cli, installed by scripts/bootstrap.sh into ``.venv-tools``) zips the
git-tracked files minus ``.comfyignore`` plus ``[tool.comfy].includes``; ``comfy node validate``
runs the checks ``comfy node publish`` runs first (pyproject metadata, the security lint). Both run
on a copy of the tracked files in a folder named unlike the project (``ComfyUI-PSO-clone``), with
telemetry off and a private HOME, so nothing is sent and nothing of the user's comfy-cli set-up is
touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS_VENV = Path(os.environ.get("PSO_VENV_TOOLS") or REPO / ".venv-tools")
COMFY = TOOLS_VENV / "bin" / "comfy"
LEFT_OUT = ("tests/", "tools/", "scripts/", "bench/", "docs/", ".ci/")


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if not COMFY.is_file():
        pytest.skip(f"comfy-cli not found at {COMFY}: run `bash scripts/bootstrap.sh` "
                    "(or set PSO_VENV_TOOLS)")
    if shutil.which("git") is None:
        pytest.skip("the registry packaging test needs git (comfy node pack zips git-tracked files)")
    root = tmp_path_factory.mktemp("registry") / "ComfyUI-PSO-clone"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
                             ).stdout.decode().split("\0")
    for name in filter(None, tracked):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    return root


def _comfy(clone: Path, *args: str) -> subprocess.CompletedProcess:
    home = clone.parent / "home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(home), "DO_NOT_TRACK": "1", "COMFY_NO_TELEMETRY": "1"}
    return subprocess.run([str(COMFY), "--skip-prompt", *args], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=300)


def test_comfy_node_validate_passes_without_security_warnings(clone):
    out = _comfy(clone, "node", "validate")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "All validation checks passed" in text and "Security warnings" not in text, text


def test_comfy_node_pack_ships_the_extension_and_nothing_of_the_development_tools(clone):
    out = _comfy(clone, "node", "pack")
    assert out.returncode == 0, out.stdout + out.stderr
    with zipfile.ZipFile(clone / "node.zip") as z:
        names = set(z.namelist())
    leaked = sorted(n for n in names if n.startswith(LEFT_OUT))
    assert not leaked, f".comfyignore not respected: {leaked[:10]}"
    for needed in ("__init__.py", "pyproject.toml", "requirements.txt", "LICENSE", "README.md",
                   "demo_model/pso_demo_digits.safetensors", "demo_model/pso_demo_shapes.safetensors",
                   "demo_model/striped_shapes/shape0_0.png"):
        assert needed in names, needed
    for folder, suffix in (("web", ".js"), ("example_workflows", ".json"), ("nodes", ".py"), ("pso", ".py")):
        expected = {str(p.relative_to(REPO)) for p in (REPO / folder).rglob(f"*{suffix}")
                    if "__pycache__" not in p.parts}
        assert expected and expected <= names, sorted(expected - names)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
