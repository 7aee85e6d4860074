"""bench.cost: the report's structure and the measuring instruments, never timings.

The benchmark runs once in its smoke mode (one repeat of one step, a tiny dataset) as the command a
user types; the tests check what it printed and wrote. Speed and memory targets are the benchmark's
business (bench/README.md), not the test suite's.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.cost import stats
from bench.cost.workloads import intervals

REPO_ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {
    "pso_vs_sft_step": 1.40,
    "pso_default_vs_sft_step": 2.00,
    "pso_vs_native_step": 1.50,
    "online_first_vs_online_step": 1.10,
    "pso_vs_sft_memory": 1.10,
    "capture_vs_plain_sampling": 1.05,
    "dataset_memory_10x": 1.10,
    "dataset_time_per_batch_10x": 1.10,
    "dataset_load_all_memory_10x": 1.10,
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_cost")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cost", "--smoke", "--family", "sd15", "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_smoke_run_reports_every_figure_with_target_and_mark(smoke):
    out, stdout = smoke
    result = json.loads((out / "results.json").read_text())
    figures = {f["key"]: f for f in result["figures"]}
    assert set(figures) == set(EXPECTED)
    for key, f in figures.items():
        assert f["target"] == EXPECTED[key]
        assert f["mark"] == ("PASS" if f["ratio"]["median"] <= f["target"] else "FALLS SHORT")
        for stat in ("cand", "base", "ratio"):
            assert math.isfinite(f[stat]["median"]) and f[stat]["lo"] <= f[stat]["median"] <= f[stat]["hi"]
        assert f["cand"]["median"] > 0 and f["base"]["median"] > 0
        assert math.isclose(f["ratio"]["median"], f["cand"]["median"] / f["base"]["median"], rel_tol=1e-9)
        assert f"target <= {f['target']:.2f}" in stdout
    assert figures["pso_vs_sft_step"]["family"] == "sd15"
    assert result["machine"]["cores"] == os.cpu_count() and result["machine"]["torch"] == torch.__version__
    assert result["machine_line"] in stdout
    md = (out / "results.md").read_text()
    assert result["machine_line"] in md
    assert md.count("| sd15 |") == 6 and md.count("| - |") == 3  # 6 per family + 3 dataset rows


def test_the_sampling_figure_compares_the_same_sampler_and_batch(smoke):
    out, _ = smoke
    f = {f["key"]: f for f in json.loads((out / "results.json").read_text())["figures"]}
    s = f["capture_vs_plain_sampling"]
    assert (s["candidate"], s["baseline"]) == ("sample_trajectories", "SamplerCustomAdvanced")
    assert s["extra"] == {"calls": 1, "batch": 2, "sampler": "lcm"}


_PEAK_SCRIPT = """
import json, torch
from bench.cost.memory import peak_cpu_bytes
n = 32 * 2**20
def alloc():
    x = torch.ones(n // 4)
    return float(x[0])
first, method = peak_cpu_bytes(alloc)
second, _ = peak_cpu_bytes(alloc)
print(json.dumps([first, second, method]))
"""


def test_peak_memory_sees_torch_allocations_that_tracemalloc_misses():
    # in a child process: the measurement pins glibc's mmap threshold for the process that runs it
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second, method = json.loads(proc.stdout.strip().splitlines()[-1])
    n = 32 * 2**20  # a 32 MiB float32 tensor
    assert "VmHWM" in method or "ru_maxrss" in method
    assert 0.95 * n <= first < 2 * n
    if "VmHWM" in method:  # freed memory of the first call must not hide the second
        assert 0.95 * n <= second < 2 * n


def test_stats_ratios_are_paired_per_repeat_and_marked_against_the_target():
    f = stats.make_figure(
        "k", "sd15", "what", "A", "B", "ms", cand=[2.0, 3.0, 9.0], base=[1.0, 2.0, 10.0], target=1.4
    )
    assert [round(x, 6) for x in stats.paired_ratios([2.0, 3.0, 9.0], [1.0, 2.0, 10.0])] == [2.0, 1.5, 0.9]
    assert f.ratio == stats.Stat(1.5, 0.9, 2.0, 3)
    assert f.cand == stats.Stat(3.0, 2.0, 9.0, 3)
    assert f.mark == stats.FALLS_SHORT
    f.target = 1.5
    assert f.mark == stats.PASS
    with pytest.raises(ValueError, match="equally many runs"):
        stats.paired_ratios([1.0], [1.0, 2.0])
    assert "| sd15 | what | A | B | 3000.0 [2000.0–9000.0] ms |" in stats.markdown_table([f])


def test_step_intervals_drop_the_warmup():
    assert intervals([0.0, 1.0, 3.0, 6.0, 10.0], warmup=2) == [3.0, 4.0]
    assert intervals([5.0], warmup=0) == []
