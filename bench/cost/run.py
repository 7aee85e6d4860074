"""PSO training cost against its baselines, as ratios measured in one run.

``python -m bench.cost`` from the repository root (``--help`` for the options). For every family
(tiny SD1.5- and SDXL-shaped models by default; ``--real-size`` for the full architectures with
random weights), on the same two latents, the same prompt, the same LoRA rank and layers, the same
dtype:

1. PSO pair step vs plain SFT step on the same two images (target <= 1.40), and the PSO Train
   node's default step (every transition, the reference re-sampled before every step) vs SFT
   (target <= 2.00, the fidelity issue's);
2. PSO pair step vs ComfyUI's native "Train LoRA" node step (target <= 1.50);
3. peak memory of a PSO training call vs an SFT one (target <= 1.10);
4. few-step sampling with trajectory capture vs the host's plain sampler (target <= 1.05);

and, once, pair-dataset loading at N and 10 N pairs (peak memory and time per batch, flat: <= 1.10).

Candidate and baseline are run alternately (A B C, then C B A, ...) so that load from other
processes hits both; each ratio is taken within one repeat and the figure is the median over the
repeats with the min–max spread. Writes ``results.md`` and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from pso.io import atomic_write_bytes, atomic_write_json

from . import datasets, stats, workloads
from .host import FAMILIES, build_setup, import_host, machine_info, machine_line
from .memory import peak_bytes

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "out" / "cost"
TARGETS = {
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

logger = logging.getLogger("bench.cost")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="sd15,sdxl", help="comma-separated families (sd15, sdxl)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved runs per figure (median, min–max)")
    p.add_argument("--steps", type=int, default=4, help="measured training steps per run")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="unmeasured training steps at the start of each run "
        "(one more runs before them: the first step has no start time stamp)",
    )
    p.add_argument("--latent", type=int, default=16, help="latent size S of the (2, 4, S, S) training images")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (the native node's default)")
    p.add_argument(
        "--target",
        default="all",
        help="pso.lora target preset (default: every Linear/Conv2d, the layers the native node adapts)",
    )
    p.add_argument("--memory-steps", type=int, default=2, help="training steps per peak-memory call")
    p.add_argument(
        "--sample-calls",
        type=int,
        default=6,
        help="sampling calls of each kind per repeat, alternating call by call (median)",
    )
    p.add_argument("--dataset-pairs", type=int, default=64, help="N of the N vs 10 N dataset comparison")
    p.add_argument(
        "--dataset-latent",
        type=int,
        default=64,
        help="latent size of the dataset pairs (64 = SD1.5 at 512 px)",
    )
    p.add_argument("--shard-size", type=int, default=16, help="pairs per dataset shard")
    p.add_argument(
        "--real-size",
        action="store_true",
        help="full SD1.5 / SDXL UNets with random weights "
        "(slow: minutes per step on a CPU, 4 GB / 11 GB of RAM for the weights)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="cuda: bf16 autocast, gradient checkpointing, peak CUDA memory",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    p.add_argument(
        "--skip", default="", help="comma-separated parts to skip: train, memory, sampling, dataset"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for results.md / results.json")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="1 repeat of 1 step, tiny datasets: checks the pipeline, the numbers mean nothing",
    )
    args = p.parse_args(argv)
    args.families = [f.strip() for f in args.family.split(",") if f.strip()]
    bad = [f for f in args.families if f not in FAMILIES]
    if bad:
        p.error(f"--family {bad} unknown; choose from {list(FAMILIES)}")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.smoke:
        args.repeats, args.steps, args.warmup, args.memory_steps, args.sample_calls = 1, 1, 1, 1, 1
        args.dataset_pairs, args.dataset_latent, args.shard_size = 4, 8, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    if args.repeats < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--repeats and --steps must be >= 1, --warmup >= 0")
    return args


def _order(kinds: list[str], repeat: int) -> list[str]:
    """A B C on even repeats, C B A on odd ones."""
    return kinds if repeat % 2 == 0 else kinds[::-1]


def train_figures(h, s, args, opts: workloads.TrainOptions, log) -> list[stats.Figure]:
    kinds = list(workloads.TRAIN_KINDS)
    per_kind: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.repeats):
        for kind in _order(kinds, r):
            secs = workloads.step_seconds(h, s, kind, args.steps, args.warmup, opts)
            per_kind[kind].append(min(secs))  # the run's least-disturbed step
        log(
            f"  train repeat {r + 1}/{args.repeats}: "
            + ", ".join(f"{k} {per_kind[k][-1] * 1e3:.1f} ms" for k in kinds)
        )
    common = dict(family=s.family, unit="ms", steps=args.steps, warmup=args.warmup)
    return [
        stats.make_figure(
            "pso_vs_sft_step",
            what="PSO pair step vs SFT step",
            candidate="PSO pair step",
            baseline="SFT step",
            cand=per_kind["pso"],
            base=per_kind["sft"],
            target=TARGETS["pso_vs_sft_step"],
            **common,
        ),
        stats.make_figure(
            "pso_default_vs_sft_step",
            what="PSO Train's default step (all transitions, fresh reference) vs SFT step",
            candidate="default PSO step",
            baseline="SFT step",
            cand=per_kind["pso_default"],
            base=per_kind["sft"],
            target=TARGETS["pso_default_vs_sft_step"],
            **common,
        ),
        stats.make_figure(
            "pso_vs_native_step",
            what="PSO pair step vs native Train LoRA step",
            candidate="PSO pair step",
            baseline="TrainLoraNode step",
            cand=per_kind["pso"],
            base=per_kind["native"],
            target=TARGETS["pso_vs_native_step"],
            **common,
        ),
        stats.make_figure(
            "online_first_vs_online_step",
            what="PSO Online Train's step with first_step_weight on vs off",
            candidate="online step, first_step_weight 0.01",
            baseline="online step (default)",
            cand=per_kind["online_first"],
            base=per_kind["online"],
            target=TARGETS["online_first_vs_online_step"],
            **common,
        ),
    ]


def memory_figure(h, s, args, opts, log) -> stats.Figure:
    per_kind: dict[str, list[float]] = {"pso": [], "sft": []}
    method = ""
    for kind in ("pso", "sft"):  # warm-up: first-call allocations of the process are not training cost
        peak_bytes(lambda kind=kind: workloads.train_ours(h, s, kind, 1, opts), args.device)
    for r in range(args.repeats):
        for kind in _order(["pso", "sft"], r):
            peak, method = peak_bytes(
                lambda kind=kind: workloads.train_ours(h, s, kind, args.memory_steps, opts), args.device
            )
            per_kind[kind].append(float(peak))
        log(
            f"  memory repeat {r + 1}/{args.repeats}: pso {per_kind['pso'][-1] / 2**20:.1f} MiB, "
            f"sft {per_kind['sft'][-1] / 2**20:.1f} MiB"
        )
    return stats.make_figure(
        "pso_vs_sft_memory",
        s.family,
        "peak memory, PSO vs SFT training call",
        "PSO",
        "SFT",
        "MiB",
        per_kind["pso"],
        per_kind["sft"],
        TARGETS["pso_vs_sft_memory"],
        method=method,
        steps=args.memory_steps,
    )


def sampling_figure(h, s, args, log) -> stats.Figure:
    sampler, latent = workloads.sampling_inputs(h, s)
    fns = {
        "capture": lambda: workloads.sample_capture(h, s, sampler, latent, 11),
        "plain": lambda: workloads.sample_plain(h, s, sampler, latent, 11),
    }
    for fn in fns.values():  # warm-up
        fn()
    per: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(args.repeats):
        calls: dict[str, list[float]] = {k: [] for k in fns}
        for c in range(args.sample_calls):  # call by call, alternating, so both see the same load
            for k in _order(list(fns), c):
                calls[k].append(workloads.call_seconds(fns[k], 1, args.device))
        for k in fns:
            per[k].append(min(calls[k]))
        log(
            f"  sampling repeat {r + 1}/{args.repeats}: capture {per['capture'][-1] * 1e3:.1f} ms, "
            f"plain {per['plain'][-1] * 1e3:.1f} ms"
        )
    return stats.make_figure(
        "capture_vs_plain_sampling",
        s.family,
        "4-step sampling: capture vs plain",
        "sample_trajectories",
        "SamplerCustomAdvanced",
        "ms",
        per["capture"],
        per["plain"],
        TARGETS["capture_vs_plain_sampling"],
        calls=args.sample_calls,
        batch=2,
        sampler="lcm",
    )


def dataset_figures(h, args, log) -> list[stats.Figure]:
    n = args.dataset_pairs
    sizes = {"N": n, "10N": 10 * n}
    with tempfile.TemporaryDirectory(prefix="pso-bench-") as tmp:
        t0 = time.perf_counter()
        folders = {
            k: datasets.write_dataset(h, Path(tmp) / k, v, args.dataset_latent, args.shard_size)
            for k, v in sizes.items()
        }
        log(f"  wrote datasets of {n} and {10 * n} pairs in {time.perf_counter() - t0:.1f} s")
        datasets.measure(h, folders["N"], 2)  # warm-up (imports, page cache)
        tpb: dict[str, list[float]] = {"N": [], "10N": []}
        mem: dict[str, list[float]] = {"N": [], "10N": []}
        all_mem: dict[str, list[float]] = {"N": [], "10N": []}
        for r in range(args.repeats):
            for k in _order(["N", "10N"], r):
                t, m = datasets.measure(h, folders[k], 2, epochs=10 if k == "N" else 1)
                tpb[k].append(t)
                mem[k].append(float(m))
                all_mem[k].append(float(datasets.measure_load_all(h, folders[k])[1]))
            log(
                f"  dataset repeat {r + 1}/{args.repeats}: per batch N {tpb['N'][-1] * 1e3:.2f} ms / "
                f"10N {tpb['10N'][-1] * 1e3:.2f} ms; peak N {mem['N'][-1] / 2**20:.1f} MiB / "
                f"10N {mem['10N'][-1] / 2**20:.1f} MiB; load-all N {all_mem['N'][-1] / 2**20:.1f} MiB / "
                f"10N {all_mem['10N'][-1] / 2**20:.1f} MiB"
            )
    common = dict(family="-", pairs=n, latent=args.dataset_latent, shard_size=args.shard_size, batch=2)
    # the N pass can grow by ~0 bytes on a tiny smoke dataset: never divide by less than one page
    floor = [max(v, 4096.0) for v in mem["N"]]
    floor_all = [max(v, 4096.0) for v in all_mem["N"]]
    return [
        stats.make_figure(
            "dataset_memory_10x",
            what="dataset streaming: peak memory, 10N vs N pairs",
            candidate=f"{10 * n} pairs",
            baseline=f"{n} pairs",
            unit="MiB",
            cand=mem["10N"],
            base=floor,
            target=TARGETS["dataset_memory_10x"],
            # what the 9 N extra pairs cost each (the manifest's records are kept in memory)
            bytes_per_extra_pair=round(
                sorted(a - b for a, b in zip(mem["10N"], mem["N"], strict=True))[len(mem["N"]) // 2] / (9 * n)
            ),
            **common,
        ),
        stats.make_figure(
            "dataset_time_per_batch_10x",
            what="dataset streaming: time per batch, 10N vs N",
            candidate=f"{10 * n} pairs",
            baseline=f"{n} pairs",
            unit="ms",
            cand=tpb["10N"],
            base=tpb["N"],
            target=TARGETS["dataset_time_per_batch_10x"],
            **common,
        ),
        stats.make_figure(
            "dataset_load_all_memory_10x",
            what="dataset through PSO Load Pairs -> PSO Train (streamed, one epoch)",
            candidate=f"{10 * n} pairs",
            baseline=f"{n} pairs",
            unit="MiB",
            cand=all_mem["10N"],
            base=floor_all,
            target=TARGETS["dataset_load_all_memory_10x"],
            **common,
        ),
    ]


def run(args: argparse.Namespace, log=print) -> dict:
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    h = import_host(args.device)
    info = machine_info(args.device)
    log(f"machine: {machine_line(info)}")
    opts = workloads.TrainOptions(
        rank=args.rank,
        target=args.target,
        device=args.device,
        gradient_checkpointing=args.device == "cuda",
        bf16=args.device == "cuda",
    )
    figures: list[stats.Figure] = []
    setups = {}
    def setup(family: str):
        t0 = time.perf_counter()
        s = build_setup(h, family, args.latent, real_size=args.real_size)
        setups[family] = {"params": s.num_params(), "latent": list(s.latents.shape),
                          "sigmas": [round(float(x), 4) for x in s.sigmas]}
        log(f"{family}: {s.num_params() / 1e6:.2f} M UNet parameters, latents {tuple(s.latents.shape)}, "
            f"built in {time.perf_counter() - t0:.1f} s")
        if args.device == "cuda":
            s.latents = s.latents.cuda()
        return s

    # Timings first: measuring CPU memory pins glibc's mmap threshold for the rest of the process
    # (bench/cost/memory.py), and every timing should run under the allocator's default behaviour.
    for family in args.families:
        if {"train", "sampling"} <= args.skip:
            break
        s = setup(family)
        if "train" not in args.skip:
            figures += train_figures(h, s, args, opts, log)
        if "sampling" not in args.skip:
            figures.append(sampling_figure(h, s, args, log))
        del s
    for family in args.families:
        if "memory" in args.skip:
            break
        s = setup(family)  # rebuilt: the same seed gives the same model
        figures.append(memory_figure(h, s, args, opts, log))
        del s
    order = {k: i for i, k in enumerate(TARGETS)}
    figures.sort(key=lambda f: (args.families.index(f.family), order[f.key]))
    if "dataset" not in args.skip:
        figures += dataset_figures(h, args, log)
    wall = time.perf_counter() - t_start
    config = {
        k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
    }
    result = {
        "machine": info,
        "machine_line": machine_line(info),
        "config": config,
        "models": setups,
        "lora": {
            "rank": opts.rank,
            "target": opts.target,
            "dtype": "bf16 autocast" if opts.bf16 else "fp32",
            "gradient_checkpointing": opts.gradient_checkpointing,
        },
        "figures": [f.to_dict() for f in figures],
        "wall_seconds": round(wall, 1),
    }
    write_results(args.out, result, figures)
    log("\n" + stats.text_table(figures))
    log(f"\nwall time {wall:.0f} s; results in {args.out}")
    return result


def write_results(out: Path, result: dict, figures: list[stats.Figure]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", result)
    cfg = result["config"]
    models = ", ".join(f"{k} {v['params'] / 1e6:.2f} M parameters" for k, v in result["models"].items())
    md = [
        "# PSO training cost (bench.cost)\n",
        f"Machine: {result['machine_line']}.\n",
        f"Models: {models}"
        f"{' (real size, random weights)' if cfg['real_size'] else ' (tiny fixtures)'}; training latents "
        f"(2, 4, {cfg['latent']}, {cfg['latent']}); LoRA rank {result['lora']['rank']} on "
        f"'{result['lora']['target']}', {result['lora']['dtype']}, gradient checkpointing "
        f"{'on' if result['lora']['gradient_checkpointing'] else 'off'}; {cfg['repeats']} interleaved "
        f"repeats of {cfg['steps']} steps after {cfg['warmup']} warm-up step(s); device {cfg['device']}.\n",
        stats.markdown_table(figures),
        "",
        f"Wall time {result['wall_seconds']:.0f} s. Medians over repeats, [min–max] over repeats; each ratio "
        "is taken within a repeat (candidate and baseline run back to back).\n",
    ]
    atomic_write_bytes(out / "results.md", "\n".join(md).encode())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
