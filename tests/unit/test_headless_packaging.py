"""`pip install .` gives the pure `pso` package and the `pso-train` command (headless trainer)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_pip_install_gives_the_pso_train_command(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "pso", src / "pso", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("comfyui_pso-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    assert (target / "pso" / "headless" / "cli.py").is_file()
    assert not (target / "nodes").exists()  # the ComfyUI layer is loaded by the host, not installed
    script = target / "bin" / "pso-train"
    assert script.is_file() and (target / "bin" / "pso-import-pickapic").is_file()
    assert (target / "bin" / "pso-eval").is_file()
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, str(script), "--help"], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "usage: pso-train" in out.stdout and "accelerate launch" in out.stdout


def test_the_headless_package_imports_without_comfyui_or_the_optional_libraries():
    """pso.headless imports diffusers / transformers / peft / accelerate lazily, and never the host."""
    code = ("import sys; import pso.headless.cli, pso.headless.config, pso.headless.data, "
            "pso.headless.train; bad = sorted(m for m in ('diffusers', 'transformers', 'peft', 'accelerate', "
            "'comfy', 'folder_paths') if m in sys.modules); print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stdout + out.stderr
