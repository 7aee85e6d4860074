"""The README's library example runs as written and trains: the loss falls from log 2."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_readme_example_runs_and_the_loss_falls():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- readme-example:start -->\n```python\n(.*?)```\n<!-- readme-example:end -->",
                      readme, re.S)
    assert block, "the README lost its example block"
    proc = subprocess.run([sys.executable, "-c", block.group(1)], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                          timeout=600)  # generous: importing torch on a busy 2-core machine
    assert proc.returncode == 0, proc.stderr
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", proc.stdout).groups())
    assert abs(first - math.log(2)) < 1e-3  # a fresh LoRA changes nothing: model == frozen
    assert last < 0.5 * first
