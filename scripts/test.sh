#!/usr/bin/env bash
# Run the test suite against every test host: installs what it needs on first use
# (scripts/bootstrap.sh), then one pytest pass per host (ComfyUI 0.3.75, then 0.33.0).
# Extra arguments go to each pytest pass, e.g. `bash scripts/test.sh -k losses` or `--run-slow`.
# PSO_HOST=0.3.75 or PSO_HOST=0.33.0 runs one pass; COMFYUI_PATH runs one pass on your own checkout.
# Where the 0.33.0 tarball is not at hand (PSO_HOST_TARBALL), that pass is skipped with a message
# and the run still passes on the hosts it has.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/hosts.sh
source "$ROOT/scripts/hosts.sh"
hosts="$(pso_hosts)" || exit 2
bash "$ROOT/scripts/bootstrap.sh" || exit $?
cd "$ROOT"
# 2-core machines: one thread per process keeps the server and the test process from fighting.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# Both host passes at once where there are cores for them (each pytest process is single-threaded):
# PSO_PARALLEL_HOSTS=1 forces it, 0 runs them one after the other. In parallel
# the first host's pass prints as it runs, the others write to a file printed whole when they end,
# so the passes never interleave.
run_pass() {  # version -> pytest's exit code; prints the pass's output
  local version="$1"; shift
  local venv host_dir
  venv="$(pso_host_venv "$version")"
  host_dir="$(pso_host_dir "$version")"
  printf '\n[test] ===== ComfyUI %s (%s, python %s) =====\n' "$version" "$host_dir" "$venv/bin/python" >&2
  COMFYUI_PATH="$host_dir" PSO_HOST_VERSION="$version" "$venv/bin/python" -m pytest "$@"
}

summary=()
status=0
runnable=()
for version in $hosts; do
  venv="$(pso_host_venv "$version")"
  if [[ "$version" == "0.33.0" && ! -f "$venv/.pso-bootstrap-stamp" ]]; then
    msg="SKIPPED the current-host pass (ComfyUI 0.33.0): $(pso_tarball_problem)"
    printf '\n[test] %s\n' "$msg" >&2
    summary+=("$msg")
    continue
  fi
  runnable+=("$version")
done

parallel="${PSO_PARALLEL_HOSTS:-auto}"
if [[ "$parallel" == "auto" ]]; then
  parallel=0
  # nproc obeys OMP_NUM_THREADS, set to 1 above for the test processes: ask it without
  if (( ${#runnable[@]} > 1 )) && (( $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) >= 2 )); then
    parallel=1
  fi
fi

record() {  # version rc seconds
  if [[ $2 == 0 ]]; then
    summary+=("ComfyUI $1: passed in $3 s")
  elif [[ $2 == 5 ]]; then  # no tests collected (a -k that matches nothing): not a failure
    summary+=("ComfyUI $1: no tests selected ($3 s)")
  else
    summary+=("ComfyUI $1: FAILED (pytest exit $2) in $3 s")
    status=1
  fi
}

if [[ "$parallel" == 1 ]]; then
  logs="$(mktemp -d)"
  trap 'rm -rf "$logs"' EXIT
  printf '\n[test] running the passes of %s side by side (PSO_PARALLEL_HOSTS=0 runs them in turn)\n' \
    "${runnable[*]}" >&2
  declare -A pids starts
  first="${runnable[0]}"
  for version in "${runnable[@]}"; do
    starts[$version]=$(date +%s)
    if [[ "$version" == "$first" ]]; then  # the first pass prints as it goes, the others when done
      ( run_pass "$version" "$@"; echo $? > "$logs/$version.rc"; date +%s > "$logs/$version.end" ) &
    else
      ( run_pass "$version" "$@" > "$logs/$version.log" 2>&1; echo $? > "$logs/$version.rc"
        date +%s > "$logs/$version.end" ) &
    fi
    pids[$version]=$!
  done
  for version in "${runnable[@]}"; do
    wait "${pids[$version]}"
    took=$(( $(cat "$logs/$version.end") - starts[$version] ))
    [[ "$version" == "$first" ]] || cat "$logs/$version.log"
    record "$version" "$(cat "$logs/$version.rc")" "$took"
  done
else
  for version in "${runnable[@]}"; do
    t0=$(date +%s)
    run_pass "$version" "$@"
    rc=$?
    record "$version" "$rc" "$(( $(date +%s) - t0 ))"
  done
fi

printf '\n[test] ===== summary =====\n' >&2
printf '[test] %s\n' "${summary[@]}" >&2
exit $status
