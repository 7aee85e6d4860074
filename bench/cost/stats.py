"""Figures: a candidate and its baseline measured in the same run, their ratio, a target and a mark.

Pure Python (no torch, no host), so the report format is testable on its own.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

PASS, FALLS_SHORT = "PASS", "FALLS SHORT"


@dataclass(frozen=True)
class Stat:
    """Median of ``n`` runs and their spread (min, max)."""

    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        vals = [float(v) for v in values]
        if not vals:
            raise ValueError("a Stat needs at least one value")
        return cls(statistics.median(vals), min(vals), max(vals), len(vals))

    def fmt(self, scale: float = 1.0, digits: int = 2) -> str:
        m, lo, hi = (v * scale for v in (self.median, self.lo, self.hi))
        return f"{m:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"


@dataclass
class Figure:
    """``ratio`` = candidate / baseline per paired run (same repeat, interleaved), median and spread.

    The mark is PASS when the median ratio is <= ``target``.
    """

    key: str
    family: str
    what: str
    candidate: str
    baseline: str
    unit: str  # of candidate / baseline: "ms", "MiB"
    cand: Stat
    base: Stat
    ratio: Stat
    target: float
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def mark(self) -> str:
        return PASS if math.isfinite(self.ratio.median) and self.ratio.median <= self.target else FALLS_SHORT

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mark"] = self.mark
        return d


def paired_ratios(cand: list[float], base: list[float]) -> list[float]:
    """Per-repeat ratios of runs measured side by side (cand[i] with base[i])."""
    if len(cand) != len(base) or not cand:
        raise ValueError(f"paired ratios need equally many runs, got {len(cand)} and {len(base)}")
    return [c / b if b > 0 else math.inf for c, b in zip(cand, base, strict=True)]


def make_figure(
    key: str,
    family: str,
    what: str,
    candidate: str,
    baseline: str,
    unit: str,
    cand: list[float],
    base: list[float],
    target: float,
    note: str = "",
    **extra,
) -> Figure:
    return Figure(
        key,
        family,
        what,
        candidate,
        baseline,
        unit,
        Stat.of(cand),
        Stat.of(base),
        Stat.of(paired_ratios(cand, base)),
        target,
        note,
        dict(extra),
    )


SCALE = {"ms": 1e3, "MiB": 1.0 / 2**20, "s": 1.0}


def markdown_table(figures: list[Figure]) -> str:
    """One row per figure: medians with [min–max] over runs, the ratio, target and mark."""
    head = (
        "| family | figure | candidate | baseline | candidate median [min–max] | baseline median [min–max] "
        "| ratio median [min–max] | target | mark |"
    )
    rows = [head, "|" + "---|" * 9]
    for f in figures:
        s = SCALE.get(f.unit, 1.0)
        digits = 1 if f.unit in ("ms", "MiB") else 3
        rows.append(
            f"| {f.family} | {f.what} | {f.candidate} | {f.baseline} | {f.cand.fmt(s, digits)} {f.unit} | "
            f"{f.base.fmt(s, digits)} {f.unit} | {f.ratio.fmt(1.0, 3)} | <= {f.target:.2f} | {f.mark} |"
        )
    return "\n".join(rows)


def text_table(figures: list[Figure]) -> str:
    """The same as :func:`markdown_table`, for a terminal."""
    lines = []
    for f in figures:
        s = SCALE.get(f.unit, 1.0)
        digits = 1 if f.unit in ("ms", "MiB") else 3
        lines.append(
            f"{f.family:5} {f.what:44} ratio {f.ratio.fmt(1.0, 3):22} target <= {f.target:.2f}  {f.mark:11} "
            f"({f.candidate} {f.cand.fmt(s, digits)} {f.unit} vs {f.baseline} "
            f"{f.base.fmt(s, digits)} {f.unit}, n={f.ratio.n})"
        )
    return "\n".join(lines)
