"""The digits benchmark, end to end: ``python -m bench.digits.run [--task digits|shapes]`` from the
repository root.

Phases (wall time of each is printed): data and judge, teacher (cached), student distillation
(cached), reference rows, one fine-tuning run per (method, learning rate), outputs. Writes
``results.json``, ``results.md`` and ``samples.png`` to ``--out`` (default ``bench/out/digits``).
See bench/README.md for what every number means.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import pso
from pso.io import atomic_write_bytes, atomic_write_json

from .cache import CACHE_DIR, cached_state_dict, plain
from .distill import DistillConfig, distill_student
from .finetune import METHODS, FinetuneConfig, StepHook, finetune
from .grid import image_grid, labelled_rows, save_png
from .metrics import Judge, JudgeConfig, Reference, evaluate, make_reference, train_judge
from .model import EpsDenoiser, EpsMLP, make_schedule
from .report import TARGETS, aggregate, best_lrs, cost_rows, fmt_ms, target_checks
from .sampling import STUDENT_TIMESTEPS, draw_noise, sample, teacher_timesteps
from .tasks import TASKS, Task, arch_key, make_net
from .teacher import TeacherConfig, train_teacher

STEP_COUNTS = tuple(STUDENT_TIMESTEPS)  # (1, 2, 4)
METRIC_COLUMNS = (("on_target", "on-target", "{:.2f}"), ("fd", "FD", "{:.0f}"),
                  ("fd_clamped", "FD clamped", "{:.0f}"), ("sharpness", "sharp", "{:.2f}"),
                  ("class_acc", "class", "{:.2f}"))
#: The method the PSO Train node's defaults correspond to, and the baseline it must beat.
DEFAULT_METHOD = "pso_offline_fresh_mix_sft_ema_final"
#: A run stops before fine-tuning when the starting student's 4-step class accuracy is below this (a
#: broken teacher or student would otherwise give a full table of meaningless numbers).
MIN_START_CLASS_ACC = 0.5
BASELINE = "sft"
#: Also checked against, for the quality targets: SFT with the same moving average as the defaults (SFT
#: gains from it too, so it is the fair baseline of an averaged PSO run).
AVERAGED_BASELINE = "sft_ema"
#: Methods of a default run (the others stay available with --methods).
DEFAULT_METHODS = ("sft", "sft_ema", "pso_offline_fresh_mix_sft", "pso_offline_fresh_sft_ema_final",
                   "pso_offline_fresh_mix_sft_ema_final")
#: The held-out split (part of every cache key: the teacher and the judge are trained on it).
SPLIT = {"test_fraction": 0.2, "seed": 0}
OUT_ROOT = Path(__file__).resolve().parent.parent / "out"


@dataclass(frozen=True)
class BenchConfig:
    """Everything a run depends on (written to results.json)."""

    task: str = "digits"
    style: str = "bold"
    reward: str = ""  # the online rows' reward (a key of Task.rewards; "" = the task's first)
    teacher: TeacherConfig = TeacherConfig()
    distill: DistillConfig = DistillConfig()
    judge: JudgeConfig = JudgeConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = DEFAULT_METHODS
    curve_every: int = 50  # evaluate the 4-step FD every this many steps (time-to-quality)
    teacher_steps_per_segment: int = 10
    n_eval: int = 1000
    eval_seed: int = 1234
    grid_per_class: int = 2


class PhaseTimer:
    """Wall time per phase, printed as each ends."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def end(self, name: str, note: str = "") -> None:
        dt = time.perf_counter() - self._t0
        self.times[name] = self.times.get(name, 0.0) + dt
        print(f"[{sum(self.times.values()):7.1f}s] {name}: {dt:.1f}s {note}", flush=True)
        self._t0 = time.perf_counter()


def _net_from(state: dict[str, torch.Tensor], config: TeacherConfig, task: Task) -> EpsMLP:
    net = make_net(task, config.model)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


def _sample_all(net: EpsMLP, ms, labels: torch.Tensor, seed: int,
                steps: Sequence[int] = STEP_COUNTS) -> dict[int, torch.Tensor]:
    """Final samples at 1, 2 and 4 steps (renoise policy), each from the same starting noise and
    the same sampler generator. Shapes: labels (N,) -> {steps: (N, 1, 8, 8)}."""
    out = {}
    for n in steps:
        ts = STUDENT_TIMESTEPS[n]
        gen = torch.Generator().manual_seed(seed)
        noise = draw_noise(labels.shape[0], gen, net.image_shape)
        out[n] = sample(EpsDenoiser(net, ms), noise, labels, ts, ms, "renoise", gen).final
    return out


def _grid_rows(images: torch.Tensor, labels: torch.Tensor, per_class: int, num_classes: int) -> torch.Tensor:
    """The first ``per_class`` samples of each class, ordered class-major for a grid row.

    Shapes: images (N, 1, 8, 8), labels (N,) -> (per_class * 10, 1, 8, 8)."""
    idx = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(num_classes)])
    return images[idx]


def time_per_step(student, ms, splits, best: dict[str, float], cfg: BenchConfig, repeats: int = 3,
                  steps: int = 40, reward=None) -> dict[str, float]:
    """Seconds per optimizer step of each method at its best lr, measured in this process one run at a
    time, methods interleaved (A B C, then C B A, ...) so that other load hits all of them; the median
    over ``repeats`` short runs (``steps`` steps each, seed 0)."""
    methods = list(best)
    samples: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(repeats):
        for m in (methods if r % 2 == 0 else methods[::-1]):
            ft_cfg = dataclasses.replace(cfg.finetune, lr=best[m], seed=0, steps=steps)
            samples[m].append(finetune(student, ms, splits, m, ft_cfg, reward=reward).seconds / steps)
    return {m: statistics.median(v) for m, v in samples.items()}


#: What the fine-tuning jobs share (set before they start; inherited by forked workers).
_CTX: dict = {}


def _finetune_job(job: tuple[str, float, int]) -> tuple[str, dict, torch.Tensor]:
    """One (method, lr, seed) run: fine-tune, evaluate at 1, 2, 4 steps, keep the grid rows."""
    name, lr, seed = job
    c = _CTX
    torch.set_num_threads(c["threads"])
    cfg, ms, labels, ref = c["cfg"], c["ms"], c["labels"], c["ref"]
    ft_cfg = dataclasses.replace(cfg.finetune, lr=lr, seed=seed)
    curve: list[tuple[int, float, float, float]] = []

    def point(step: int, net: EpsMLP, seconds: float) -> None:
        m = evaluate(_sample_all(net, ms, labels, cfg.eval_seed, steps=(4,))[4], labels, ref)
        curve.append((step, seconds, m["fd"], m["fd_clamped"]))

    hook = StepHook(cfg.curve_every, point) if cfg.curve_every else None
    run = finetune(c["student"], ms, c["splits"], name, ft_cfg, on_step=hook, reward=c["reward"])
    out = _sample_all(run.net, ms, labels, cfg.eval_seed)
    metrics = {n: evaluate(x, labels, ref) for n, x in out.items()}
    info = {"method": name, "lr": lr, "seed": seed, "description": METHODS[name].description,
            "metrics": metrics, "seconds": run.seconds, "steps": ft_cfg.steps, "curve": curve,
            "training": _train_summary(run)}
    grid = torch.cat([_grid_rows(out[n], labels, c["per_class"], run.net.num_classes) for n in STEP_COUNTS])
    return f"{name} @ lr {lr:g} seed {seed}", info, grid


def _reused_runs(path: Path, cfg: BenchConfig) -> dict[str, dict]:
    """The runs of an earlier results.json written with the same configuration (else an error)."""
    import json

    old = json.loads(path.read_text())
    if old["config"] != plain(cfg):
        raise SystemExit(f"--reuse: {path} was written with another configuration; run without --reuse")
    return {k: {**v, "metrics": {int(n): m for n, m in v["metrics"].items()}} for k, v in old["runs"].items()}


def _collect(job, key, info, grid, runs, grid_by_key, timer, cfg) -> None:
    name, lr, seed = job
    runs[key] = info
    if seed == cfg.seeds[0]:
        grid_by_key[(name, lr)] = grid
    m = info["metrics"]
    timer.end(f"finetune {key}",
              f"(train {info['seconds']:.1f}s; 4-step FD {m[4]['fd']:.0f} / clamped {m[4]['fd_clamped']:.0f} "
              f"sharp {m[4]['sharpness']:.2f}; 1-step FD {m[1]['fd']:.0f}; 2-step FD {m[2]['fd']:.0f})")


def _train_summary(run) -> dict[str, float]:
    """Loss and loss metrics of the last 10% of steps, plus cost."""
    hist, losses = run.result.metrics_history, run.result.loss_history
    tail = max(1, len(hist) // 10)
    keys = sorted({k for m in hist[-tail:] for k in m})
    out = {f"last10_{k}": sum(m.get(k, math.nan) for m in hist[-tail:]) / tail for k in keys}
    out.update(first_loss=losses[0], last10_loss=sum(losses[-tail:]) / tail, seconds=run.seconds,
               reference_samplings=run.reference_samplings)
    return out


def _fmt(value: float, spec: str) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else spec.format(value)


def reference_table(rows: dict[str, dict[str, float]], extra: Sequence[str] = ()) -> list[str]:
    """Markdown lines of the reference rows (no step split), with the task's ``extra`` metrics."""
    columns = (*METRIC_COLUMNS, *((k, k, "{:.2f}") for k in extra))
    head = "| reference | " + " | ".join(h for _, h, _ in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m[k], f) for k, _, f in columns) + " |")
    return lines


def method_table(cells: dict, rows_single: dict[str, dict[int, dict[str, float]]],
                 extra: Sequence[str] = ()) -> list[str]:
    """Markdown lines of every (method, lr) cell: mean ± std over seeds of FD (raw, clamped) and
    sharpness at 1, 2 and 4 steps, the task's ``extra`` metrics at 1, 2 and 4 steps, 4-step on-target
    and class; single rows (the start) first."""
    cols = [("fd", n) for n in STEP_COUNTS] + [("fd_clamped", n) for n in STEP_COUNTS] + \
        [("sharpness", n) for n in STEP_COUNTS] + [(k, n) for k in extra for n in STEP_COUNTS] + \
        [("on_target", 4), ("class_acc", 4)]
    fmt = {"fd": "{:.0f}", "fd_clamped": "{:.0f}", "sharpness": "{:.2f}", "on_target": "{:.2f}",
           "class_acc": "{:.2f}", **dict.fromkeys(extra, "{:.2f}")}
    head = {"fd": "FD", "fd_clamped": "FDc", "sharpness": "sharp", "on_target": "on-target",
            "class_acc": "class", **{k: k for k in extra}}
    lines = ["| model | lr | seeds | " + " | ".join(f"{head[k]} {n}" for k, n in cols) + " |",
             "|" + "---|" * (len(cols) + 3)]
    for name, by_steps in rows_single.items():
        lines.append(f"| {name} | | | " + " | ".join(_fmt(by_steps[n][k], fmt[k]) for k, n in cols) + " |")
    for (method, lr), cell in cells.items():
        m = cell["metrics"]
        lines.append(f"| {method} | {lr:g} | {len(cell['seeds'])} | "
                     + " | ".join(fmt_ms(m[n][k], fmt[k]) for k, n in cols) + " |")
    return lines


def lr_choice(method: str) -> str:
    """What the lr :func:`best_lrs` picks for ``method`` is: the best (lowest 4-step FD to the targets)
    for a method that trains on target images; for an online row, which never sees them, the same
    rule picks the lr of least drift from the start, not the one that raised its reward most."""
    return "least drift" if METHODS[method].references == "online" else "best"


def best_table(cells: dict, best: dict[str, float], cost: dict[str, dict]) -> list[str]:
    """Markdown lines: each method at its best lr (lowest mean raw 4-step FD): FD raw / clamped at
    1, 2, 4 steps, 4-step sharpness, time per step vs SFT and time to SFT's final 4-step FD."""
    lines = ["| method (best lr) | lr | FD 4 | FDc 4 | sharp 4 | FD 2 | FDc 2 | FD 1 | FDc 1 | "
             "ms / step | step cost vs sft | time to sft's FD 4 (raw) | time to sft's FDc 4 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, lr in best.items():
        m, c = cells[(method, lr)]["metrics"], cost[method]
        lines.append(
            f"| {method} | {lr:g} | {fmt_ms(m[4]['fd'], '{:.0f}')} | "
            f"{fmt_ms(m[4]['fd_clamped'], '{:.0f}')} | "
            f"{fmt_ms(m[4]['sharpness'], '{:.2f}')} | {fmt_ms(m[2]['fd'], '{:.0f}')} | "
            f"{fmt_ms(m[2]['fd_clamped'], '{:.0f}')} | {fmt_ms(m[1]['fd'], '{:.0f}')} | "
            f"{fmt_ms(m[1]['fd_clamped'], '{:.0f}')} | {c['seconds_per_step'] * 1e3:.1f} | "
            f"{c['step_cost_ratio']:.2f}x | "
            f"{_fmt(c['ttq_seconds'], '{:.1f}')} s ({c['ttq_reached']}) | "
            f"{_fmt(c['ttq_clamped_seconds'], '{:.1f}')} s ({c['ttq_clamped_reached']}) |")
    return lines


def _check_lines(checks: Sequence[tuple[str, bool, str]]) -> list[str]:
    """The report's pass/fail lines of :func:`target_checks`' results."""
    return [f"- {'PASS' if ok else 'FAIL'} {dict(TARGETS)[n]}: {text}" for n, ok, text in checks]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.digits.run", description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits", choices=sorted(TASKS),
                   help="digits (grey 8x8, class tokens, target bold) or shapes (16x16 RGB, caption words, "
                        "target striped)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (results.json/.md, samples.png); default bench/out/<task>")
    p.add_argument("--fresh", action="store_true",
                   help="retrain the judge, teacher and student (ignore the cache)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per fine-tuning job (default 1)")
    p.add_argument("--timing-repeats", type=int, default=5,
                   help="interleaved short runs per method for the time-per-step figures (median)")
    p.add_argument("--reuse", action="store_true",
                   help="take the fine-tuning runs from --out's results.json (same configuration) and redo "
                        "only the timing pass and the report")
    p.add_argument("--jobs", type=int, default=2,
                   help="fine-tuning runs in parallel processes (default 2; results do not depend on it)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {list(METHODS)}")
    p.add_argument("--lrs", default=",".join(f"{v:g}" for v in BenchConfig.lrs),
                   help="learning rates swept, the same for every method")
    p.add_argument("--seeds", default=",".join(str(v) for v in BenchConfig.seeds),
                   help="fine-tuning seeds (LoRA init, batches, noise); every (method, lr) runs each")
    p.add_argument("--curve-every", type=int, default=BenchConfig.curve_every,
                   help="evaluate the 4-step FD every this many steps (time-to-quality); 0 = never")
    p.add_argument("--steps", type=int, default=FinetuneConfig.steps, help="fine-tuning steps per run")
    p.add_argument("--batch", type=int, default=FinetuneConfig.batch, help="pairs per step")
    p.add_argument("--refresh-every", type=int, default=FinetuneConfig.refresh_every,
                   help="steps between reference re-samplings (pso_offline_refresh)")
    p.add_argument("--style", default=None, help="target style (default: the task's; digits: bold, italic; "
                                                  "shapes: striped, outlined)")
    p.add_argument("--reward", default="", help="the online rows' reward (shapes: stripes (default), "
                                                "brightness, centre)")
    p.add_argument("--n-eval", type=int, default=None,
                   help="samples per evaluation, a multiple of the classes (digits: 1000, shapes: 960)")
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="where trained networks are cached")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny teacher/student/fine-tuning budgets, 200 samples, one lr (numbers "
                        "are meaningless)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"unknown methods {unknown}; valid: {list(METHODS)}", file=sys.stderr)
        return 2
    task = TASKS[args.task]
    online = [m for m in methods if METHODS[m].references == "online"]
    if online and task.reward() is None:
        print(f"methods {online} are online PSO and need a reward; task {task.name} has none (use --task "
              "shapes, whose rewards are the stripe score, the brightness and the centring)", file=sys.stderr)
        return 2
    if args.reward and args.reward not in task.rewards:
        print(f"--reward {args.reward!r} is not a reward of task {task.name}; valid: {list(task.rewards)}",
              file=sys.stderr)
        return 2
    style = args.style or task.default_style
    if style not in task.styles:
        print(f"--style {style!r} is not a style of task {task.name}; valid: {list(task.styles)}",
              file=sys.stderr)
        return 2
    args.n_eval = args.n_eval or task.n_eval
    if args.n_eval < task.num_classes or args.n_eval % task.num_classes:
        print(f"--n-eval must be a positive multiple of {task.num_classes} (task {task.name}'s classes), "
              f"got {args.n_eval}", file=sys.stderr)
        return 2
    out_dir = args.out or OUT_ROOT / task.name
    reward = task.reward(args.reward or None)  # the online rows' (None for a task without rewards)
    cfg = BenchConfig(
        task=task.name, style=style, reward=args.reward,
        teacher=TeacherConfig(model=task.model, steps=task.teacher_steps),
        distill=DistillConfig(trajectories=task.distill_trajectories, steps=task.distill_steps),
        judge=JudgeConfig(hidden=task.judge_hidden), grid_per_class=2 if task.num_classes <= 10 else 1,
        lrs=tuple(float(v) for v in args.lrs.split(",")), methods=methods,
        n_eval=args.n_eval, seeds=tuple(int(v) for v in args.seeds.split(",")), curve_every=args.curve_every,
        finetune=FinetuneConfig(steps=args.steps, batch=args.batch, refresh_every=args.refresh_every),
    )
    if args.quick:
        cfg = dataclasses.replace(
            cfg, teacher=TeacherConfig(model=task.model, steps=200),
            distill=DistillConfig(steps=200, trajectories=512),
            judge=JudgeConfig(hidden=task.judge_hidden, steps=200),
            finetune=dataclasses.replace(cfg.finetune, steps=10, pool_size=50),
            lrs=cfg.lrs[:1], seeds=cfg.seeds[:2], n_eval=10 * task.num_classes, curve_every=5)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # see pso-notes: subnormal Adam states slow CPU training ~8x
    timer = PhaseTimer()
    print(f"{task.name} benchmark: torch {torch.__version__}, {args.threads} threads, cache {args.cache_dir}",
          flush=True)

    # ---- data, schedule, judge --------------------------------------------------------------
    splits = task.load(cfg.style, **SPLIT)
    ms = make_schedule()
    cache = {"fresh": args.fresh, "folder": args.cache_dir}
    pre = task.cache_prefix
    judge_state, hit = cached_state_dict(
        f"{pre}judge", (cfg.style, SPLIT, cfg.judge),
        lambda: train_judge(splits, cfg.judge, task.num_classes)[0].state_dict(), **cache)
    judge = Judge(cfg.judge, task.image_shape, task.num_classes)
    judge.load_state_dict(judge_state)
    judge.eval().requires_grad_(False)
    ref: Reference = make_reference(judge, splits, task.metrics)
    timer.end("data + judge", "(cached)" if hit else "(trained)")

    # ---- teacher and student ----------------------------------------------------------------
    teacher_state, hit = cached_state_dict(
        f"{pre}teacher", (SPLIT, cfg.teacher, *arch_key(task)),
        lambda: train_teacher(splits.base_train_x, splits.base_train_y, ms, cfg.teacher,
                              make_net=lambda mc: make_net(task, mc))[0].state_dict(),
        **cache)
    teacher = _net_from(teacher_state, cfg.teacher, task)
    timer.end("teacher", "(cached)" if hit else "(trained)")
    student_state, hit = cached_state_dict(
        f"{pre}student", (SPLIT, cfg.teacher, cfg.distill, *arch_key(task)),
        lambda: distill_student(teacher, ms, cfg.distill, shape=task.image_shape)[0].state_dict(), **cache)
    student = _net_from(student_state, cfg.teacher, task)
    timer.end("student distillation", "(cached)" if hit else "(trained)")

    # ---- reference rows ---------------------------------------------------------------------
    k = task.num_classes
    labels = torch.arange(cfg.n_eval) % k
    per_class = cfg.grid_per_class
    gen = torch.Generator().manual_seed(cfg.eval_seed)
    pick = torch.randperm(splits.target_train_x.shape[0], generator=gen)[: cfg.n_eval]
    references: dict[str, dict[str, float]] = {
        "real target (train split)": evaluate(splits.target_train_x[pick], splits.target_train_y[pick], ref),
        "real base (train split)": evaluate(splits.base_train_x[pick], splits.base_train_y[pick], ref),
    }
    grid_blocks = [
        ("real target", _grid_rows(splits.target_train_x[pick], splits.target_train_y[pick], per_class, k)),
        ("real base", _grid_rows(splits.base_train_x[pick], splits.base_train_y[pick], per_class, k)),
    ]
    grid_gen = torch.Generator().manual_seed(cfg.eval_seed)
    grid_noise = draw_noise(cfg.n_eval, grid_gen, task.image_shape)
    guided = EpsDenoiser(teacher, ms, cfg.distill.guidance)
    t_steps = teacher_timesteps(cfg.teacher_steps_per_segment)
    teacher_x = sample(guided, grid_noise, labels, t_steps, ms, "euler", None).final
    teacher_name = f"teacher ({len(t_steps) - 1}-step DDIM, cfg {cfg.distill.guidance})"
    references[teacher_name] = evaluate(teacher_x, labels, ref)
    grid_blocks.append((f"teacher\n{len(t_steps) - 1}-step DDIM",
                        _grid_rows(teacher_x, labels, per_class, k)))
    rows: dict[str, dict[int, dict[str, float]]] = {}
    start = _sample_all(student, ms, labels, cfg.eval_seed)
    rows["student (start)"] = {n: evaluate(x, labels, ref) for n, x in start.items()}
    grid_blocks.append(("student (start)\n1 / 2 / 4 steps",
                        torch.cat([_grid_rows(start[n], labels, per_class, k) for n in STEP_COUNTS])))
    timer.end("reference rows")
    start_acc = rows["student (start)"][4]["class_acc"]
    if not args.quick and not start_acc >= MIN_START_CLASS_ACC:
        print(f"the distilled student's 4-step samples are unusable: the judge reads their {task.name} class "
              f"correctly in {start_acc:.0%} of samples (need >= {MIN_START_CLASS_ACC:.0%}; chance "
              f"{1 / task.num_classes:.0%}). Fine-tuning it would measure nothing. The teacher's metrics: "
              f"{references[teacher_name]}; retrain with --fresh after fixing the model.", file=sys.stderr)
        return 3

    # ---- fine-tuning runs -------------------------------------------------------------------
    runs: dict[str, dict] = {}
    grid_by_key: dict[tuple[str, float], torch.Tensor] = {}
    _CTX.update(student=student, ms=ms, splits=splits, labels=labels, ref=ref, cfg=cfg, per_class=per_class,
                threads=args.threads, reward=reward)
    jobs = [(name, lr, seed) for name in methods for lr in cfg.lrs for seed in cfg.seeds]
    if args.reuse:
        runs.update(_reused_runs(out_dir / "results.json", cfg))
        jobs = []
    if args.jobs > 1 and jobs:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(args.jobs) as workers:
            results = workers.imap(_finetune_job, jobs)
            for job, (key, run_info, grid) in zip(jobs, results, strict=True):
                _collect(job, key, run_info, grid, runs, grid_by_key, timer, cfg)
    else:
        for job in jobs:
            _collect(job, *_finetune_job(job), runs, grid_by_key, timer, cfg)

    # ---- outputs ----------------------------------------------------------------------------
    cells = aggregate(runs)
    best = best_lrs(cells)
    best = {m: best[m] for m in methods if m in best}  # table order: the --methods order
    for method, lr in best.items():
        if (method, lr) in grid_by_key:  # not with --reuse
            grid_blocks.append((f"{method}\nlr {lr:g} ({lr_choice(method)})\n1 / 2 / 4 steps",
                                grid_by_key[(method, lr)]))
    md = [f"# {task.name.capitalize()} benchmark ({cfg.style} target)", "",
          f"Fine-tuning: {cfg.finetune.steps} steps, batch {cfg.finetune.batch}, "
          f"LoRA rank {cfg.finetune.rank}, lrs {list(cfg.lrs)} and seeds {list(cfg.seeds)} for every method "
          f"(mean ± std over seeds). Metrics on {cfg.n_eval} samples ({cfg.n_eval // k} per class, "
          "same noise for every row). FDc: FD of the samples clamped to [-1, 1].", "",
          *reference_table(references, tuple(task.metrics)), "",
          *method_table(cells, rows, tuple(task.metrics)), ""]
    if any(lr_choice(m) != "best" for m in best):
        md += ["Online rows see no target images: the lr chosen for them (the best-lr table, samples.png) "
               "is the lr of least drift (lowest 4-step FD to the targets), not of the highest reward; "
               "compare the reward column across lrs in the table above.", ""]
    checks: list[tuple[str, bool, str]] = []
    if BASELINE in best:
        timer.start()
        sps = time_per_step(student, ms, splits, best, cfg, repeats=args.timing_repeats, reward=reward)
        per_step = ", ".join(f"{m} {v * 1e3:.1f} ms" for m, v in sps.items())
        timer.end("timing pass", f"({per_step} per step)")
        cost = cost_rows(runs, cells, best, BASELINE, sps)
        md += [*best_table(cells, best, cost), ""]
        if DEFAULT_METHOD in best:
            checks = target_checks(cells, best, cost, DEFAULT_METHOD, BASELINE)
            md += [f"Targets: {DEFAULT_METHOD} (the node's defaults) vs {BASELINE}, each at its best lr:", ""]
            md += [*_check_lines(checks), ""]
            if AVERAGED_BASELINE in best:
                fair = [c for c in target_checks(cells, best, cost, DEFAULT_METHOD, AVERAGED_BASELINE)
                        if c[0] not in ("sharp4", "step_cost", "ttq")]  # those do not depend on the baseline
                md += [f"The quality targets against {AVERAGED_BASELINE} (SFT with the same moving average):",
                       ""]
                md += [*_check_lines(fair), ""]
                checks += [(f"{n} vs {AVERAGED_BASELINE}", ok, text) for n, ok, text in fair]
    else:
        cost = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "results.md", "\n".join(md).encode())
    produced_by = f"bench.digits.run (comfyui-pso {pso.__version__})"
    atomic_write_json(out_dir / "results.json", {
        "produced_by": produced_by, "python": platform.python_version(), "torch": torch.__version__,
        "threads": args.threads, "config": plain(cfg), "references": references,
        "rows": {k: {str(n): m for n, m in v.items()} for k, v in rows.items()},
        "runs": {k: {**v, "metrics": {str(n): m for n, m in v["metrics"].items()}} for k, v in runs.items()},
        "cells": {f"{m} @ lr {lr:g}": {**c, "metrics": {str(n): v for n, v in c["metrics"].items()}}
                  for (m, lr), c in cells.items()},
        "best_lr": best, "cost": cost,
        "targets": [{"target": n, "pass": ok, "measured": t} for n, ok, t in checks],
        "phase_seconds": timer.times,
    })
    if not args.reuse:  # a reused run has no samples of its own: keep the earlier picture
        blocks = [(label, image_grid(x, per_class * k)) for label, x in grid_blocks]
        save_png(labelled_rows(blocks), out_dir / "samples.png", {"produced_by": produced_by})
    timer.end("outputs")
    print("\n".join(md))
    for name, ok, text in checks:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {dict(TARGETS)[name.split(' vs ')[0]]}: {text}")
    print(f"total wall time {sum(timer.times.values()):.1f}s; wrote {out_dir}/results.json, results.md"
          + ("" if args.reuse else ", samples.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
