"""The paper's evaluation protocol (Section 4.1, Tables 1-2): prompt sets, fixed seeds, 1 and 4 steps,
four rewards, a table shaped like Table 1, and a paired comparison between two models.

- Prompt sets are local files (never downloaded): the Pick-a-Pic v2 test split as a parquet with a
  ``caption`` column (the unique captions, in file order; the paper uses its 500 unique prompts) and
  PartiPrompts as the TSV the authors publish (``PartiPrompts.tsv``, column ``Prompt``; 1632
  prompts), or any ``.txt`` with one prompt per line (:func:`read_prompts`).
- Prompt i of a set is sampled with noise seed ``seed + i`` in every model and at every step count,
  so models are compared on identical starting noise (:func:`run_protocol`).
- Rewards in the paper's column order: PickScore, CLIP score, ImageReward, aesthetic
  (:data:`TABLE1_REWARDS`). The paper's CLIP score column is the cosine (~0.37); pso's
  ``clip_score`` reward is torchmetrics' ``100 * max(cos, 0)``, so the table divides it by 100.
- :func:`paired_comparison`: per prompt, model A wins when its score is higher (a tie counts half);
  the win rate's interval is a percentile bootstrap over prompts with an explicit generator.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .evaluation import EvalScores

__all__ = ["TABLE1_HEADERS", "TABLE1_REWARDS", "PairedComparison", "comparison_markdown", "paired_comparison",
           "read_prompts", "run_protocol", "scores_csv", "table1_csv", "table1_markdown"]

#: The paper's reward columns, in Table 1's order.
TABLE1_REWARDS = ("pickscore", "clip_score", "image_reward", "aesthetic")
#: Column header and the factor from pso's reward units to the paper's.
TABLE1_HEADERS: dict[str, tuple[str, float]] = {
    "pickscore": ("PickScore", 1.0), "clip_score": ("CLIP Score", 0.01),
    "image_reward": ("ImageReward", 1.0), "aesthetic": ("Aesthetic Score", 1.0), "hpsv2": ("HPSv2", 1.0)}
#: Prompt columns looked for, in order: Pick-a-Pic's, PartiPrompts', generic ones.
PROMPT_COLUMNS = ("caption", "Prompt", "prompt", "text")


def _unique(items: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for s in items:
        s = str(s).strip() if s is not None else ""
        if s and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def read_prompts(path: str | Path, limit: int = 0) -> list[str]:
    """Unique, non-empty prompts of a local prompt file, in file order (the first ``limit`` if > 0).

    ``.parquet``: the first of :data:`PROMPT_COLUMNS` present (Pick-a-Pic: ``caption``; read with
    pyarrow, only that column). ``.tsv``: the same columns from the header row (PartiPrompts:
    ``Prompt``). ``.txt``: one prompt per line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist; give a local Pick-a-Pic parquet, "
                                "PartiPrompts.tsv or a .txt with one prompt per line (nothing is downloaded)")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError(f"reading {path.name} needs pyarrow: pip install pyarrow ({exc})") from exc
        names = pq.read_schema(str(path)).names
        column = next((c for c in PROMPT_COLUMNS if c in names), None)
        if column is None:
            raise ValueError(f"{path.name} has no prompt column (looked for {list(PROMPT_COLUMNS)}; it has "
                             f"{names[:10]})")
        prompts = pq.read_table(str(path), columns=[column]).column(column).to_pylist()
    elif suffix == ".tsv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        names = list(rows[0]) if rows else []
        column = next((c for c in PROMPT_COLUMNS if c in names), None)
        if column is None:
            raise ValueError(f"{path.name} has no prompt column in its header (looked for "
                             f"{list(PROMPT_COLUMNS)}; it has {names[:10]})")
        prompts = [r[column] for r in rows]
    elif suffix == ".txt":
        prompts = path.read_text(encoding="utf-8").splitlines()
    else:
        raise ValueError(f"prompt file {path.name}: use a .parquet (Pick-a-Pic), .tsv (PartiPrompts) or .txt")
    prompts = _unique(prompts)
    if not prompts:
        raise ValueError(f"{path.name} holds no prompt")
    return prompts[:limit] if limit > 0 else prompts


@dataclass(frozen=True)
class PairedComparison:
    """Model A against model B on the same prompts and seeds.

    win_rate: mean over prompts of 1 (A higher), 0.5 (equal), 0 (B higher); low / high: its
    percentile-bootstrap interval at ``confidence``; mean_diff: mean of A - B.
    """

    win_rate: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int
    mean_diff: float
    n: int
    confidence: float


def paired_comparison(a: torch.Tensor, b: torch.Tensor, n_boot: int = 2000, seed: int = 0,
                      confidence: float = 0.95) -> PairedComparison:
    """Win rate of A over B with a percentile bootstrap interval over prompts.

    Shapes: a, b (P,) scores of the same P prompts (same seeds). The bootstrap draws P prompts with
    replacement ``n_boot`` times from a generator seeded with ``seed``.
    """
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"paired comparison needs two equal-length, non-empty score lists, got {a.numel()} "
                         f"and {b.numel()}")
    if not 0 < confidence < 1 or n_boot < 1:
        raise ValueError(f"confidence must be in (0, 1) and n_boot >= 1, got {confidence}, {n_boot}")
    outcome = (a > b).double() + 0.5 * (a == b).double()                      # (P,)
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, outcome.numel(), (int(n_boot), outcome.numel()), generator=g)
    boot = outcome[idx].mean(dim=1)                                           # (n_boot,)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(boot, torch.tensor([tail, 1 - tail], dtype=boot.dtype)).tolist()
    return PairedComparison(win_rate=float(outcome.mean()), low=float(low), high=float(high),
                            wins=int((a > b).sum()), ties=int((a == b).sum()), losses=int((a < b).sum()),
                            mean_diff=float((a - b).mean()), n=int(a.numel()), confidence=float(confidence))


#: ``sample_images(model, prompts, seeds, steps) -> (B, H, W, 3)`` in [0, 1].
SampleImages = Callable[[str, list[str], list[int], int], torch.Tensor]


def run_protocol(models: Sequence[str], prompt_sets: Mapping[str, Sequence[str]], steps: Sequence[int],
                 rewards: Mapping[str, object], sample_images: SampleImages, seed: int = 0,
                 batch_size: int = 4, on_batch: Callable[[int, int], None] | None = None
                 ) -> dict[str, EvalScores]:
    """Sample every prompt of every set with every model at every step count and score it.

    Prompt i of a set uses noise seed ``seed + i`` everywhere. ``rewards``: kind -> object with
    ``score(images, prompts)``. Returns one :class:`EvalScores` per prompt set.
    """
    if not models or not prompt_sets or not steps or not rewards:
        raise ValueError("the protocol needs at least one model, prompt set, step count and reward")
    total = sum(math.ceil(len(p) / batch_size) for p in prompt_sets.values()) * len(models) * len(steps)
    done = 0
    out: dict[str, EvalScores] = {}
    for set_name, prompts in prompt_sets.items():
        result = EvalScores()
        for model in models:
            for n in steps:
                per_reward: dict[str, list[torch.Tensor]] = {k: [] for k in rewards}
                for i in range(0, len(prompts), batch_size):
                    chunk = list(prompts[i:i + batch_size])
                    images = sample_images(model, chunk, [seed + i + j for j in range(len(chunk))], int(n))
                    for kind, reward in rewards.items():
                        s = torch.as_tensor(reward.score(images, chunk)).detach().float().cpu().reshape(-1)
                        if s.numel() != len(chunk) or not bool(torch.isfinite(s).all()):
                            raise ValueError(f"reward {kind} returned {s.tolist()[:8]} for {len(chunk)} "
                                             "images; it must return one finite score per image")
                        per_reward[kind].append(s)
                    done += 1
                    if on_batch is not None:
                        on_batch(done, total)
                for kind, parts in per_reward.items():
                    result.add(model, int(n), kind, torch.cat(parts))
        out[set_name] = result
    return out


def _ordered(kinds: Sequence[str]) -> list[str]:
    return [k for k in TABLE1_REWARDS if k in kinds] + [k for k in kinds if k not in TABLE1_REWARDS]


def _header(kind: str) -> tuple[str, float]:
    return TABLE1_HEADERS.get(kind, (kind, 1.0))


def _table_rows(results: Mapping[str, EvalScores]) -> tuple[list[str], list[list[str]], list[list[float]]]:
    kinds = _ordered(next(iter(results.values())).rewards)
    head = ["Dataset", "Method", "Inference Steps", *[_header(k)[0] for k in kinds]]
    rows, values = [], []
    for set_name, res in results.items():
        for m in res.models:
            for n in res.steps:
                means = []
                for k in kinds:
                    scale = _header(k)[1]
                    means.append(res.mean_sem(m, n, k)[0] * scale if (m, n, k) in res.scores else math.nan)
                rows.append([set_name, m, str(n)])
                values.append(means)
    return head, rows, values


def _fmt(kind: str, value: float) -> str:
    if math.isnan(value):
        return ""
    digits = {"pickscore": 2, "clip_score": 4, "image_reward": 4, "aesthetic": 3}.get(kind, 4)
    return f"{value:.{digits}f}"


def table1_markdown(results: Mapping[str, EvalScores]) -> str:
    """Mean rewards as the paper's Table 1: Dataset | Method | Inference Steps | PickScore | CLIP Score |
    ImageReward | Aesthetic Score (CLIP Score as the cosine, like the paper)."""
    head, rows, values = _table_rows(results)
    kinds = _ordered(next(iter(results.values())).rewards)
    lines = ["| " + " | ".join(head) + " |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in kinds) + " |"]
    last = None
    for row, vals in zip(rows, values, strict=True):
        name = row[0] if row[0] != last else ""
        last = row[0]
        cells = [name, row[1], row[2], *[_fmt(k, v) for k, v in zip(kinds, vals, strict=True)]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table1_csv(results: Mapping[str, EvalScores]) -> str:
    """The same table as CSV, full precision, plus each cell's standard error and prompt count."""
    head, rows, values = _table_rows(results)
    kinds = _ordered(next(iter(results.values())).rewards)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head + [f"{_header(k)[0]} sem" for k in kinds] + ["prompts"])
    for row, vals in zip(rows, values, strict=True):
        res = results[row[0]]
        m, n = row[1], int(row[2])
        sems = [res.mean_sem(m, n, k)[1] * _header(k)[1] if (m, n, k) in res.scores else math.nan
                for k in kinds]
        count = next((res.scores[(m, n, k)].numel() for k in kinds if (m, n, k) in res.scores), 0)
        w.writerow(row + [repr(v) for v in vals] + [repr(s) for s in sems] + [count])
    return buf.getvalue()


def scores_csv(results: Mapping[str, EvalScores], prompt_sets: Mapping[str, Sequence[str]], seed: int) -> str:
    """Every per-prompt score (dataset, model, steps, reward, prompt index, seed, prompt, score), in
    pso's reward units, for any later analysis."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "model", "steps", "reward", "prompt_index", "seed", "prompt", "score"])
    for set_name, res in results.items():
        for (m, n, k), s in res.scores.items():
            for i, v in enumerate(s.tolist()):
                w.writerow([set_name, m, n, k, i, seed + i, prompt_sets[set_name][i], repr(v)])
    return buf.getvalue()


def comparisons(results: Mapping[str, EvalScores], model_a: str, model_b: str, n_boot: int = 2000,
                seed: int = 0, confidence: float = 0.95) -> list[tuple[str, int, str, PairedComparison]]:
    """(dataset, steps, reward, comparison of A vs B) for every cell both models have."""
    out = []
    for set_name, res in results.items():
        for n in res.steps:
            for k in _ordered(res.rewards):
                if (model_a, n, k) in res.scores and (model_b, n, k) in res.scores:
                    out.append((set_name, n, k, paired_comparison(res.scores[(model_a, n, k)],
                                                                  res.scores[(model_b, n, k)], n_boot, seed,
                                                                  confidence)))
    return out


def comparison_markdown(rows: Sequence[tuple[str, int, str, PairedComparison]], model_a: str,
                        model_b: str) -> str:
    """Win rate of A over B per (dataset, steps, reward), with its bootstrap interval."""
    conf = rows[0][3].confidence if rows else 0.95
    lines = [f"**{model_a}** vs **{model_b}**: win rate of {model_a} over prompts (a tie counts half), "
             f"{conf:.0%} percentile-bootstrap interval over prompts.", "",
             "| Dataset | Inference Steps | Reward | win rate | interval | wins / ties / losses "
             "| mean diff |",
             "| --- | ---: | --- | ---: | --- | --- | ---: |"]
    for set_name, n, k, c in rows:
        lines.append(f"| {set_name} | {n} | {_header(k)[0]} | {c.win_rate:.3f} | "
                     f"[{c.low:.3f}, {c.high:.3f}] | {c.wins} / {c.ties} / {c.losses} | "
                     f"{c.mean_diff * _header(k)[1]:+.4g} |")
    return "\n".join(lines)
