#!/usr/bin/env bash
# Run the demo: installs what it needs on first use (scripts/bootstrap.sh), starts a headless
# ComfyUI with this extension, runs the demo graph and prints where its outputs are.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The demo runs on the 0.3.75 host in .venv (the floor; PyPI has it): no need to set up the others.
PSO_HOST=0.3.75 bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${PSO_VENV:-$ROOT/.venv}/bin/python" -m tools.demo "$@"
