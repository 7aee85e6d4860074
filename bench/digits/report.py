"""Aggregation over fine-tuning seeds, best learning rate per method, cost, and the pass/fail targets.

Everything here is plain arithmetic over the per-run results that ``run.py`` collects:

- ``runs[key]``: one fine-tuning run (method, lr, seed) with ``metrics[steps][name]`` (the final
  model at 1, 2 and 4 sampling steps, :data:`bench.digits.metrics.METRICS`), ``seconds`` (training
  wall time without evaluation, disturbed by parallel jobs: not used for cost), ``steps`` and
  ``curve`` ([(step, train_seconds, fd4, fd4_clamped)]).
- a *cell* is (method, lr): the mean and the sample standard deviation over its seeds.
- a method's best lr is the one with the lowest mean 4-step FD on raw samples (ties: clamped FD).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

__all__ = ["TARGETS", "aggregate", "best_lrs", "cost_rows", "steps_to_quality", "target_checks"]

STEP_COUNTS = (1, 2, 4)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if len(vals) < len(values) or not vals:
        return math.nan, math.nan  # a diverged seed makes the cell unusable, not better
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(runs: dict[str, dict]) -> dict[tuple[str, float], dict]:
    """(method, lr) -> {"seeds": [...], "metrics": {steps: {name: (mean, std)}}}."""
    cells: dict[tuple[str, float], list[dict]] = {}
    for run in runs.values():
        cells.setdefault((run["method"], run["lr"]), []).append(run)
    out = {}
    for key, members in cells.items():
        names = members[0]["metrics"][4].keys()
        metrics = {n: {name: _mean_std([m["metrics"][n][name] for m in members]) for name in names}
                   for n in STEP_COUNTS}
        out[key] = {"seeds": [m["seed"] for m in members], "metrics": metrics}
    return out


def best_lrs(cells: dict[tuple[str, float], dict]) -> dict[str, float]:
    """method -> the lr with the lowest mean raw 4-step FD (clamped FD breaks ties; NaN cells last)."""
    by_method: dict[str, list[float]] = {}
    for method, lr in cells:
        by_method.setdefault(method, []).append(lr)

    def rank(method: str, lr: float) -> tuple[float, float]:
        m = cells[(method, lr)]["metrics"][4]
        fd, fdc = m["fd"][0], m["fd_clamped"][0]
        return (fd if math.isfinite(fd) else math.inf, fdc if math.isfinite(fdc) else math.inf)

    return {method: min(lrs, key=lambda lr: rank(method, lr)) for method, lrs in by_method.items()}


def steps_to_quality(runs: Iterable[dict], threshold: float, column: int = 2) -> tuple[float, int, int]:
    """Mean optimizer steps until a run's 4-step FD (curve column 2 raw, 3 clamped) first reaches
    ``threshold``, over the runs that reach it; (mean, reached, runs). NaN when none reaches it."""
    runs = list(runs)
    steps = []
    for run in runs:
        hits = (pt[0] for pt in run["curve"] if math.isfinite(pt[column]) and pt[column] <= threshold)
        hit = next(hits, None)
        if hit is not None:
            steps.append(hit)
    return (statistics.fmean(steps) if steps else math.nan), len(steps), len(runs)


def cost_rows(runs: dict[str, dict], cells: dict, best: dict[str, float], baseline: str,
              seconds_per_step: dict[str, float]) -> dict[str, dict]:
    """Per method at its best lr: seconds per step (``seconds_per_step``: measured in one interleaved
    timing pass, not during the sweep, whose parallel jobs and other load make wall times incomparable),
    its ratio to ``baseline``'s, and the time to first reach the baseline's mean final 4-step FD (raw and
    clamped): mean steps to reach it (curve points) times seconds per step, absolute and as a ratio."""
    base_cell = cells[(baseline, best[baseline])]
    thr_raw = base_cell["metrics"][4]["fd"][0]
    thr_clamped = base_cell["metrics"][4]["fd_clamped"][0]

    def members(method: str) -> list[dict]:
        return [r for r in runs.values() if r["method"] == method and r["lr"] == best[method]]

    base_sps = seconds_per_step[baseline]
    base_ttq = steps_to_quality(members(baseline), thr_raw)[0] * base_sps
    base_ttq_c = steps_to_quality(members(baseline), thr_clamped, 3)[0] * base_sps
    out = {}
    for method, lr in best.items():
        sps = seconds_per_step[method]
        steps, reached, n = steps_to_quality(members(method), thr_raw)
        steps_c, reached_c, _ = steps_to_quality(members(method), thr_clamped, 3)
        out[method] = {"lr": lr, "seconds_per_step": sps, "step_cost_ratio": sps / base_sps,
                       "ttq_steps": steps, "ttq_seconds": steps * sps, "ttq_ratio": steps * sps / base_ttq,
                       "ttq_reached": f"{reached}/{n}", "ttq_clamped_steps": steps_c,
                       "ttq_clamped_seconds": steps_c * sps, "ttq_clamped_ratio": steps_c * sps / base_ttq_c,
                       "ttq_clamped_reached": f"{reached_c}/{n}",
                       "threshold_fd": thr_raw, "threshold_fd_clamped": thr_clamped}
    return out


#: The targets of the fidelity issue, checked for the default method against the baseline (both at
#: their best lr, means over seeds): name -> (description, check(default, baseline, cost) -> (ok, text)).
TARGETS: tuple[tuple[str, str], ...] = (
    ("fd4_raw", "4-step FD <= 0.5x SFT's (raw samples)"),
    ("fd4_clamped", "4-step FD <= 0.5x SFT's (samples clamped to [-1, 1])"),
    ("sharp4", "4-step sharpness within 0.1 of real (1.00)"),
    ("fd1", "1-step FD <= SFT's (raw and clamped)"),
    ("fd2", "2-step FD <= SFT's (raw and clamped)"),
    ("step_cost", "time per step <= 2x SFT's"),
    ("ttq", "reaches SFT's final 4-step FD in no more training time than SFT (raw)"),
)


def target_checks(cells: dict, best: dict[str, float], cost: dict[str, dict], method: str,
                  baseline: str) -> list[tuple[str, bool, str]]:
    """[(target name, passed, "measured vs required")] for ``method`` against ``baseline``."""
    d = cells[(method, best[method])]["metrics"]
    b = cells[(baseline, best[baseline])]["metrics"]

    def fd(m: dict, n: int, clamped: bool = False) -> float:
        return m[n]["fd_clamped" if clamped else "fd"][0]

    out = []
    for name, _ in TARGETS:
        if name in ("fd4_raw", "fd4_clamped"):
            c = name == "fd4_clamped"
            ratio = fd(d, 4, c) / fd(b, 4, c)
            text = f"{fd(d, 4, c):.0f} vs {fd(b, 4, c):.0f} = {ratio:.2f}x (need <= 0.50x)"
            out.append((name, ratio <= 0.5, text))
        elif name == "sharp4":
            s = d[4]["sharpness"][0]
            out.append((name, abs(s - 1.0) <= 0.1, f"{s:.2f} (need 0.90-1.10)"))
        elif name in ("fd1", "fd2"):
            n = 1 if name == "fd1" else 2
            ok = fd(d, n) <= fd(b, n) and fd(d, n, True) <= fd(b, n, True)
            out.append((name, ok, f"raw {fd(d, n):.0f} vs {fd(b, n):.0f}, clamped {fd(d, n, True):.0f} vs "
                                  f"{fd(b, n, True):.0f}"))
        elif name == "step_cost":
            r = cost[method]["step_cost_ratio"]
            out.append((name, r <= 2.0, f"{r:.2f}x (need <= 2.00x)"))
        elif name == "ttq":
            r = cost[method]["ttq_ratio"]
            ok = math.isfinite(r) and r <= 1.0 and cost[method]["ttq_reached"].split("/")[0] == \
                cost[method]["ttq_reached"].split("/")[1]
            text = (f"{cost[method]['ttq_seconds']:.1f}s vs {cost[baseline]['ttq_seconds']:.1f}s = {r:.2f}x, "
                    f"reached in {cost[method]['ttq_reached']} seeds (need <= 1.00x, all)")
            out.append((name, ok, text))
    return out


def fmt_ms(pair: tuple[float, float], spec: str) -> str:
    """'mean ± std' with ``spec`` (e.g. '{:.0f}'); 'nan' for a diverged cell."""
    m, s = pair
    if not math.isfinite(m):
        return "nan"
    return f"{spec.format(m)} ± {spec.format(s)}"
