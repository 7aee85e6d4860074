#!/usr/bin/env bash
# Run the test suite against every test host: installs what it needs on first use
# (scripts/bootstrap.sh), then the tests once per host (ComfyUI 0.3.75 and 0.33.0).
# Extra arguments go to each pytest pass, e.g. `bash scripts/test.sh -k losses` or `--run-slow`.
# PSO_HOST=0.3.75 or PSO_HOST=0.33.0 runs one host; COMFYUI_PATH runs one pass on your own checkout.
# Where the 0.33.0 tarball is not at hand (PSO_HOST_TARBALL), that host is skipped with a message
# and the run still passes on the hosts it has.
#
# Order: with no extra arguments, two hosts and two or more cores, the hosts' tests outside
# tests/browser run side by side (each pytest process and its test server use about one core), then
# each host's browser tests run alone (Chromium is many processes: two browser passes at once
# overloaded a 2-core machine). PSO_PARALLEL_HOSTS=0, one core, or extra arguments: each host's whole
# pass in turn.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/hosts.sh
source "$ROOT/scripts/hosts.sh"
hosts="$(pso_hosts)" || exit 2
bash "$ROOT/scripts/bootstrap.sh" || exit $?
cd "$ROOT"
# Cores before OMP_NUM_THREADS is set: GNU nproc obeys that variable.
cores="$(OMP_NUM_THREADS='' nproc 2>/dev/null || echo 1)"
# 2-core machines: one thread per process keeps the server and the test process from fighting.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

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

run_pass() {  # version label pytest-args... -> pytest's exit code
  local version="$1" label="$2"; shift 2
  local venv host_dir
  venv="$(pso_host_venv "$version")"
  host_dir="$(pso_host_dir "$version")"
  printf '\n[test] ===== ComfyUI %s, %s (%s, python %s) =====\n' "$version" "$label" "$host_dir" \
    "$venv/bin/python" >&2
  # Own cache folder per host: passes that run side by side must not write one file.
  COMFYUI_PATH="$host_dir" PSO_HOST_VERSION="$version" "$venv/bin/python" -m pytest \
    -o "cache_dir=.pytest_cache/$version" "$@"
}

record() {  # version label rc seconds
  if [[ $3 == 0 ]]; then
    summary+=("ComfyUI $1, $2: passed in $4 s")
  elif [[ $3 == 5 ]]; then  # no tests collected (a -k that matches nothing): not a failure
    summary+=("ComfyUI $1, $2: no tests selected ($4 s)")
  else
    summary+=("ComfyUI $1, $2: FAILED (pytest exit $3) in $4 s")
    status=1
  fi
}

# Side by side only for the whole suite: extra arguments (paths, -k, -m) could select browser tests
# into the first part or other tests into the second.
parallel=0
if [[ "${PSO_PARALLEL_HOSTS:-1}" != 0 ]] && (( $# == 0 && ${#runnable[@]} > 1 && cores >= 2 )); then
  parallel=1
fi

t_all=$(date +%s)
if [[ "$parallel" == 1 ]]; then
  logs="$(mktemp -d)"
  trap 'rm -rf "$logs"' EXIT
  printf '\n[test] tests outside tests/browser: ComfyUI %s side by side (%s cores; PSO_PARALLEL_HOSTS=0 runs the hosts in turn)\n' \
    "${runnable[*]}" "$cores" >&2
  declare -A pids
  first="${runnable[0]}"
  t0=$(date +%s)
  for version in "${runnable[@]}"; do
    if [[ "$version" == "$first" ]]; then  # the first host prints as it goes, the others when done
      ( run_pass "$version" "tests outside tests/browser" --ignore=tests/browser "$@"
        echo $? > "$logs/$version.rc"; date +%s > "$logs/$version.end" ) &
    else
      ( run_pass "$version" "tests outside tests/browser" --ignore=tests/browser "$@" > "$logs/$version.log" 2>&1
        echo $? > "$logs/$version.rc"; date +%s > "$logs/$version.end" ) &
    fi
    pids[$version]=$!
  done
  for version in "${runnable[@]}"; do
    wait "${pids[$version]}"
    [[ "$version" == "$first" ]] || cat "$logs/$version.log"
    record "$version" "tests outside tests/browser" "$(cat "$logs/$version.rc")" \
      "$(( $(cat "$logs/$version.end") - t0 ))"
  done
  for version in "${runnable[@]}"; do
    t0=$(date +%s)
    run_pass "$version" "browser tests" tests/browser "$@"
    rc=$?
    record "$version" "browser tests" "$rc" "$(( $(date +%s) - t0 ))"
  done
else
  for version in "${runnable[@]}"; do
    t0=$(date +%s)
    run_pass "$version" "all tests" "$@"
    rc=$?
    record "$version" "all tests" "$rc" "$(( $(date +%s) - t0 ))"
  done
fi

printf '\n[test] ===== summary =====\n' >&2
printf '[test] %s\n' "${summary[@]}" >&2
printf '[test] %s s in all\n' "$(( $(date +%s) - t_all ))" >&2
exit $status
