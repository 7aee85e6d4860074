"""`pip install .` gives the pure `pso` package, the headless application `pso_train` and its commands."""

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
    for package in ("pso", "pso_train"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("comfyui_pso-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    assert (target / "pso_train" / "cli.py").is_file() and (target / "pso" / "lora.py").is_file()
    assert not (target / "nodes").exists()  # the ComfyUI layer is loaded by the host, not installed
    script = target / "bin" / "pso-train"
    assert script.is_file() and (target / "bin" / "pso-import-pickapic").is_file()
    assert (target / "bin" / "pso-eval").is_file()
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, str(script), "--help"], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "usage: pso-train" in out.stdout and "accelerate launch" in out.stdout
    # launch scripts written before the application left the algorithm package keep working
    old = subprocess.run([sys.executable, "-m", "pso.headless.cli", "--help"], env=env, capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert old.returncode == 0 and "usage: pso-train" in old.stdout, old.stderr


def test_the_headless_package_imports_without_comfyui_or_the_optional_libraries():
    """pso_train imports diffusers / transformers / peft / accelerate lazily, and never the host."""
    code = ("import sys; import pso_train.cli, pso_train.config, pso.headless.data, "
            "pso_train.train; bad = sorted(m for m in ('diffusers', 'transformers', 'peft', 'accelerate', "
            "'comfy', 'folder_paths') if m in sys.modules); print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_algorithm_package_does_not_import_the_application():
    """pso is the algorithm: nothing in it imports pso_train (the application around it) or accelerate,
    except the forwarder that keeps `python -m pso.headless.cli` working."""
    import ast

    for path in sorted((REPO / "pso").rglob("*.py")):
        if path == REPO / "pso" / "headless" / "cli.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        bad = {m for m in names if m.split(".")[0] in ("pso_train", "accelerate")}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"
