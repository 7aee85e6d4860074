"""ComfyUI web frontends to test the extension's JavaScript against.

The host pins one frontend (``comfyui-frontend-package`` in its requirements; 1.32.9 for ComfyUI
0.3.75) while users who update the frontend run PyPI's newest one, which the host serves with
``--front-end-root <folder>``. :func:`newest_frontend` puts the newest wheel's ``static`` folder in a
cache (``<repo>/.host/frontends/<version>/static``, git-ignored) once and reuses it: a later call
asks the registry only for the newest version number (``pip index versions``, about a second), and
with no registry at hand it falls back to the newest version already cached.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .comfy_host import REPO_ROOT

logger = logging.getLogger(__name__)

PACKAGE = "comfyui-frontend-package"
CACHE = REPO_ROOT / ".host" / "frontends"
_VERSION = re.compile(r"^\d+(\.\d+)*$")


class FrontendError(RuntimeError):
    """The newest frontend could not be found or unpacked."""


def pinned_frontend_version() -> str | None:
    """The version of the frontend installed beside the host (what it serves without a flag)."""
    from importlib import metadata

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def _pip(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
                          capture_output=True, text=True, timeout=timeout, check=False)


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def cached_versions(cache: Path = CACHE) -> list[str]:
    """Versions whose unpacked ``static/index.html`` is in the cache, oldest first."""
    if not cache.is_dir():
        return []
    found = [p.name for p in cache.iterdir()
             if _VERSION.match(p.name) and (p / "static" / "index.html").is_file()]
    return sorted(found, key=_key)


def newest_version_on_index() -> str:
    """PyPI's (the configured index's) newest release number of the frontend package."""
    proc = _pip("index", "versions", PACKAGE, timeout=60)
    match = re.search(rf"{re.escape(PACKAGE)} \(([\d.]+)\)", proc.stdout)
    if proc.returncode != 0 or not match:
        raise FrontendError(f"`pip index versions {PACKAGE}` found no version (exit {proc.returncode}): "
                            f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    return match.group(1)


def fetch_frontend(version: str, cache: Path = CACHE) -> Path:
    """The ``static`` folder of ``comfyui-frontend-package==version``, downloaded once into the cache
    (unpacked into a temporary folder and renamed, so a concurrent or interrupted run never leaves
    half a frontend)."""
    if not _VERSION.match(version):
        raise FrontendError(f"frontend version {version!r} is not a release number such as '1.58.1'")
    target = cache / version / "static"
    if (target / "index.html").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        proc = _pip("download", "--no-deps", "--quiet", "-d", tmp, f"{PACKAGE}=={version}", timeout=600)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise FrontendError(f"could not download {PACKAGE}=={version}: {proc.stderr.strip()[-500:]}")
        staging = Path(tmp) / "unpacked"
        prefix = "comfyui_frontend_package/static/"
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(staging, [n for n in z.namelist() if n.startswith(prefix)])
        if not (staging / prefix / "index.html").is_file():
            raise FrontendError(f"{wheels[0].name} has no {prefix}index.html")
        (Path(tmp) / version).mkdir()
        shutil.move(str(staging / prefix), str(Path(tmp) / version / "static"))
        try:
            os.rename(Path(tmp) / version, cache / version)
        except OSError:
            if not (target / "index.html").is_file():  # not a concurrent run that finished first
                raise
    logger.info("cached %s %s in %s", PACKAGE, version, target)
    return target


def newest_frontend(cache: Path = CACHE) -> tuple[str, Path]:
    """``(version, static folder)`` of the newest frontend: from the index, else the newest cached."""
    try:
        version = newest_version_on_index()
    except (FrontendError, subprocess.TimeoutExpired) as exc:
        cached = cached_versions(cache)
        if not cached:
            raise FrontendError(f"the newest {PACKAGE} is unknown (no package index answered) and none "
                                f"is cached in {cache}: {exc}") from exc
        logger.warning("package index not reachable (%s); using the newest cached frontend %s",
                       exc, cached[-1])
        version = cached[-1]
    return version, fetch_frontend(version, cache)
