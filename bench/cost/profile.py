"""Where a PSO / SFT training step spends its time: ``python -m bench.cost.profile``.

cProfile around the same ``train_on_host`` calls the benchmark times, split into the phases of a
step by the functions that run them (cumulative time per step):

- ``model forward``: ``pso.methods.forward_noised_errors`` minus the frozen part (LoRA on, grad);
- ``frozen forward``: ``pso.lora.frozen_denoiser``'s ``frozen`` (adapter off, no grad);
- ``backward``: ``torch.Tensor.backward``;
- ``optimizer``: the optimizer's ``step`` and ``clip_grad_norm_``;
- ``other``: the rest of ``Trainer._train_step`` (batch, levels, loss, bookkeeping).

cProfile adds a constant cost to every Python call, so Python-heavy phases (forwards through
ComfyUI's module wrappers) look somewhat larger than they are; compare phases between PSO and SFT
rather than reading absolute milliseconds. ``--torch`` adds torch.profiler's top operators.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats

import torch

from . import workloads
from .host import build_setup, import_host, machine_info, machine_line

PHASES = {
    "forward_noised_errors": ("methods.py", "forward_noised_errors"),
    "frozen forward": ("lora.py", "frozen"),
    "backward": ("_tensor.py", "backward"),
    "optimizer step": ("optimizer.py", "wrapper"),
    "clip_grad_norm_": ("clip_grad.py", "clip_grad_norm_"),
    "step total": ("trainer.py", "_train_step"),
}


def _cumtime(st: pstats.Stats, file_end: str, name: str) -> float:
    total = 0.0
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in st.stats.items():
        if func == name and file.replace(os.sep, "/").endswith(file_end):
            total += ct
    return total


def profile_kind(h, s, kind: str, steps: int, opts: workloads.TrainOptions) -> dict[str, float]:
    """Milliseconds per step of each phase for ``steps`` steps of ``kind`` (pso / sft)."""
    workloads.train_ours(h, s, kind, 2, opts)  # warm-up outside the profile
    prof = cProfile.Profile()
    prof.enable()
    workloads.train_ours(h, s, kind, steps, opts)
    prof.disable()
    st = pstats.Stats(prof)
    raw = {k: _cumtime(st, *v) * 1e3 / steps for k, v in PHASES.items()}
    out = {
        "model forward": raw["forward_noised_errors"] - raw["frozen forward"],
        "frozen forward": raw["frozen forward"],
        "backward": raw["backward"],
        "optimizer": raw["optimizer step"] + raw["clip_grad_norm_"],
    }
    out["other"] = raw["step total"] - sum(out.values())
    out["step total"] = raw["step total"]
    return out


def torch_top(h, s, kind: str, steps: int, opts: workloads.TrainOptions, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if opts.device == "cuda" else [])
    with profile(activities=acts, profile_memory=True) as prof:
        workloads.train_ours(h, s, kind, steps, opts)
    key = "self_cuda_time_total" if opts.device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cost.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="sd15,sdxl")
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--target", default="all")
    p.add_argument("--real-size", action="store_true")
    p.add_argument("--torch", action="store_true", help="also print torch.profiler's top operators")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    h = import_host("cpu")
    print("machine:", machine_line(machine_info("cpu")))
    opts = workloads.TrainOptions(rank=args.rank, target=args.target)
    for family in args.family.split(","):
        s = build_setup(h, family, args.latent, real_size=args.real_size)
        res = {kind: profile_kind(h, s, kind, args.steps, opts) for kind in ("pso", "sft")}
        print(
            f"\n{family} ({s.num_params() / 1e6:.2f} M parameters, latents {tuple(s.latents.shape)}): "
            "ms per step under cProfile"
        )
        print(f"{'phase':16} {'PSO':>9} {'SFT':>9}  PSO-SFT")
        for phase in res["pso"]:
            a, b = res["pso"][phase], res["sft"][phase]
            print(f"{phase:16} {a:9.1f} {b:9.1f} {a - b:+8.1f}")
        if args.torch:
            for kind in ("pso", "sft"):
                print(f"\n{family} {kind}: torch.profiler top operators")
                print(torch_top(h, s, kind, args.steps, opts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
