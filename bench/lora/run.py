"""Which LoRA implementation should each side use? The candidates on the same models in one run.

Host side (ComfyUI in this process, the tiny SD1.5 / SDXL fixtures built from the host's own
classes, every Linear and Conv2d adapted at rank 8, as ComfyUI's native Train LoRA adapts them):

- ``pso_patch`` (baseline): :class:`pso.lora.LoRANetwork` through ``ModelPatcher.add_weight_wrapper``
  (``weight_patch``), what the PSO Train node does for an unquantized model;
- ``host_lora``: the host's ``comfy.weight_adapter`` ``LoraDiff`` through the same weight wrappers,
  what the native Train LoRA node (comfy_extras/nodes_train.py) does;
- ``pso_hook``: ``LoRANetwork.attach`` (forward hooks: PSO's bypass mode for quantized models);
- ``host_bypass`` (hosts that have ``comfy.weight_adapter.bypass``, ComfyUI 0.33): ``LoraDiff`` in the
  host's ``BypassInjectionManager``, what the native node does with ``bypass_mode``.

Every variant starts from the same adapter tensors (``down`` kaiming, ``up`` small random, so the
LoRA changes the output from the first step) and takes the same AdamW steps on the same loss
(``apply_model`` on two latents at one sigma, MSE to a fixed target). Then:

- exactness: the variant's LoRA is written as the file its trainer writes (``LORA_MODEL`` keys with
  alpha), read back with ``comfy.utils.load_torch_file`` and applied with
  ``comfy.sd.load_lora_for_models`` (LoraLoader's two calls); the max |difference| between that
  model's prediction and the trained model's, relative to the LoRA's own effect on the prediction;
  and the max |difference| of the variant's trained prediction from the baseline's (same math, same
  steps: rounding only);
- speed: seconds per training step (forward, backward, AdamW), median over steps;
- memory: peak resident-set growth during one step (bench.cost.memory).

Headless side (the diffusers UNet of the headless tests): ``peft`` (baseline: what pso-train used)
vs ``pso_hook`` (``LoRANetwork.attach`` on the same UNet, what pso-train uses since issue 18), same
start tensors and steps: agreement of the trained predictions, speed and memory.

Speed and memory are ratios to the baseline measured in the same run, repeat by repeat (variants
interleaved within a repeat), reported as median [min-max] over repeats: the machine is shared.

    .venv/bin/python -m bench.lora                      # both sides, 5 repeats
    .venv-0.33/bin/python -m bench.lora --side host --repeats 3 --json /tmp/lora.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.cost.memory import peak_bytes
from bench.cost.stats import Stat

RANK = 8
LR = 1e-3
SIGMA = 2.0


def _step_seconds(step: Callable[[], None], steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

def _host_variants(h: SimpleNamespace) -> list[str]:
    names = ["pso_patch", "host_lora", "pso_hook"]
    try:
        import comfy.weight_adapter.bypass  # noqa: F401

        names.append("host_bypass")
    except ImportError:
        pass
    return names


class HostCase:
    """One family's model, inputs and the shared adapter start values."""

    def __init__(self, h: SimpleNamespace, family: str, latent: int, seed: int = 0):
        self.h = h
        self.family = family
        self.setup = h.setup_mod.build_setup(h, family, latent, seed=seed)
        model = self.setup.model
        self.unet = model.get_model_object("diffusion_model")
        gen = torch.Generator().manual_seed(seed + 10)
        self.net0 = h.lora.LoRANetwork.for_module(self.unet, h.lora.LoRAConfig(rank=RANK, target="all"), gen)
        with torch.no_grad():
            for p in self.net0.paths:
                up = self.net0.lora_up(p)
                up.copy_(torch.randn(up.shape, generator=gen) * 0.02)
        self.x = self.setup.latents.clone()
        self.sigma = torch.full((self.x.shape[0],), SIGMA)
        self.target = torch.randn(self.x.shape, generator=gen)
        self.context = self.setup.positive[0][0].expand(self.x.shape[0], -1, -1).clone()
        extra = self.setup.positive[0][1]
        self.kwargs = {}
        if "pooled_output" in extra:  # SDXL: the ADM vector as the host's encode_adm builds it
            self.kwargs["y"] = model.model.encode_adm(pooled_output=extra["pooled_output"].expand(
                self.x.shape[0], -1), width=64, height=64, target_width=64, target_height=64,
                crop_w=0, crop_h=0, prompt_type="positive")
        self.x_eval = torch.randn(self.x.shape, generator=gen)

    def predict(self, patcher, x: torch.Tensor) -> torch.Tensor:
        ms = patcher.get_model_object("model_sampling")
        t = ms.timestep(self.sigma)
        xin = ms.calculate_input(self.sigma, x)
        return patcher.model.apply_model(xin, t, c_crossattn=self.context, **self.kwargs)

    # ---- building the variants ---------------------------------------------------------------
    def build(self, name: str):
        """(patcher ready to run, parameters, () -> the LoRA as the trainer saves it, cleanup)."""
        h, mm = self.h, self.h.mm
        base = self.setup.model
        clone = base.clone()
        prefix = "diffusion_model."
        if name in ("pso_patch", "pso_hook"):
            net = h.lora.LoRANetwork.for_module(self.unet, h.lora.LoRAConfig(rank=RANK, target="all"),
                                                torch.Generator().manual_seed(0))
            net.load_state_dict(self.net0.state_dict())
            params = list(net.parameters())
            handles = []
            if name == "pso_patch":
                for p in net.paths:
                    clone.add_weight_wrapper(f"{prefix}{p}.weight", net.weight_patch(p))
            mm.load_models_gpu([clone])
            if name == "pso_hook":
                handles.append(net.attach(self.unet))

            def export():
                return h.host_training.lora_model_dict(net)

            return clone, params, export, lambda: [x.remove() for x in handles]
        from comfy.weight_adapter.lora import LoraDiff

        adapters = {}
        for p in self.net0.paths:
            up = self.net0.lora_up(p).detach().flatten(1).clone()
            down = self.net0.lora_down(p).detach().flatten(1).clone()
            adapters[p] = LoraDiff((up, down, float(RANK), None, None, None))
        params = [q for a in adapters.values() for q in a.parameters() if q.requires_grad]
        cleanup = []
        if name == "host_lora":
            for p, a in adapters.items():
                clone.add_weight_wrapper(f"{prefix}{p}.weight", a)
            mm.load_models_gpu([clone])
        else:  # host_bypass, as nodes_train._setup_lora_adapters_bypass
            from comfy.weight_adapter.bypass import BypassInjectionManager

            manager = BypassInjectionManager()
            for p, a in adapters.items():
                manager.add_adapter(f"{prefix}{p}.weight", a, strength=1.0)
            injections = manager.create_injections(clone.model)
            mm.load_models_gpu([clone])
            for inj in injections:
                inj.inject(clone)
            cleanup = [lambda: [inj.eject(clone) for inj in injections]]

        def export():  # as TrainLoraNode's lora_sd: named parameters of each adapter, alpha included
            return {f"{prefix}{p}.{n}": t.detach().clone() for p, a in adapters.items()
                    for n, t in a.named_parameters()}

        return clone, params, export, lambda: [c() for c in cleanup]

    def run(self, name: str, steps: int, warmup: int) -> dict:
        """Train ``warmup + steps`` steps of ``name``; time them, measure one more step's memory."""
        clone, params, export, cleanup = self.build(name)
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(self.predict(clone, self.x), self.target)
            loss.backward()
            opt.step()

        try:
            with torch.inference_mode(False):
                seconds = _step_seconds(step, steps, warmup)
                mem, method = peak_bytes(step, "cpu")
                with torch.no_grad():
                    trained = self.predict(clone, self.x_eval)
                lora = export()
        finally:
            cleanup()
        return {"seconds": seconds, "memory": mem, "memory_method": method, "trained": trained,
                "lora": lora}

    def stock_loader(self, lora: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction of the base model, prediction with the file applied as LoraLoader applies it)."""
        import comfy.sd
        import comfy.utils
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "lora.safetensors")
            save_file({k: v.contiguous() for k, v in lora.items()}, path)
            sd = comfy.utils.load_torch_file(path, safe_load=True)
        loaded = comfy.sd.load_lora_for_models(self.setup.model, None, sd, 1.0, 0.0)[0]
        with torch.inference_mode(False), torch.no_grad():
            self.h.mm.load_models_gpu([self.setup.model])
            base = self.predict(self.setup.model, self.x_eval)
            self.h.mm.load_models_gpu([loaded])
            out = self.predict(loaded, self.x_eval)
            if len(sd) and not any(k in lora for k in sd):
                raise RuntimeError("the stock loader read none of the LoRA's keys")
        return base, out


def _rel(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    return float((a - b).abs().max() / scale.abs().max().clamp_min(1e-30))


def host_side(args) -> dict:
    from bench.cost import host as host_mod

    h = host_mod.import_host("cpu")
    h.setup_mod = host_mod
    names = _host_variants(h)
    out = {"variants": names, "families": {}}
    for family in args.families:
        case = HostCase(h, family, args.latent)
        rows = {n: {"seconds": [], "memory": []} for n in names}
        exact = {}
        for r in range(args.repeats):
            order = names if r % 2 == 0 else [names[0], *reversed(names[1:])]
            trained = {}
            for n in order:
                res = case.run(n, args.steps, args.warmup)
                rows[n]["seconds"].append(sorted(res["seconds"])[len(res["seconds"]) // 2])
                rows[n]["memory"].append(res["memory"])
                trained[n] = res["trained"]
                if r == 0:
                    base, loaded = case.stock_loader(res["lora"])
                    if not (float((res["trained"] - base).abs().max()) > 0
                            and float((loaded - base).abs().max()) > 0):
                        raise RuntimeError(f"{n}: the LoRA does not change the prediction (trained or "
                                           "loaded); the comparison would mean nothing")
                    exact[n] = {"vs_stock_loader": _rel(loaded, res["trained"], res["trained"] - base),
                                "lora_effect": float((res["trained"] - base).abs().max()),
                                "memory_method": res["memory_method"]}
            if r == 0:
                for n in names:
                    exact[n]["vs_baseline"] = _rel(trained[n], trained[names[0]],
                                                   trained[names[0]] - base)
            print(f"  {family} repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
        out["families"][family] = {"exactness": exact, "runs": rows,
                                   "params": case.setup.num_params(), "lora_paths": len(case.net0.paths)}
    return out


# --------------------------------------------------------------------------------------------
# Headless side
# --------------------------------------------------------------------------------------------

class HeadlessCase:
    def __init__(self, seed: int = 0):
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
        import headless_models

        from pso import lora as pso_lora

        self.pso_lora = pso_lora
        self.unet0 = headless_models.build_unet(seed).requires_grad_(False)
        self.unet = self.unet0
        gen = torch.Generator().manual_seed(seed + 10)
        lat = headless_models.LATENT
        self.x = torch.randn(2, *lat, generator=gen)
        self.x_eval = torch.randn(2, *lat, generator=gen)
        self.target = torch.randn(2, *lat, generator=gen)
        self.t = torch.tensor([500.0, 500.0])
        self.context = torch.randn(2, 77, headless_models.UNET_CONFIG["cross_attention_dim"], generator=gen)
        self.net0 = pso_lora.LoRANetwork.for_module(self.unet, pso_lora.LoRAConfig(rank=RANK, target="all"),
                                                    gen)
        with torch.no_grad():
            for p in self.net0.paths:
                up = self.net0.lora_up(p)
                up.copy_(torch.randn(up.shape, generator=gen) * 0.02)

    def predict(self, x):
        return self.unet(x, self.t, encoder_hidden_states=self.context, return_dict=False)[0]

    def build(self, name: str):
        """A fresh copy of the UNet per run (peft leaves its wrapper layers behind)."""
        self.unet = copy.deepcopy(self.unet0)
        if name == "pso_hook":
            config = self.pso_lora.LoRAConfig(rank=RANK, target="all")
            net = self.pso_lora.LoRANetwork.for_module(self.unet, config, torch.Generator().manual_seed(0))
            net.load_state_dict(self.net0.state_dict())
            handle = net.attach(self.unet)
            return list(net.parameters()), handle.remove
        import peft  # what pso-train used before issue 18: peft's LoRA through diffusers' add_adapter
        from peft.utils import set_peft_model_state_dict

        config = peft.LoraConfig(r=RANK, lora_alpha=float(RANK), target_modules=list(self.net0.paths),
                                 init_lora_weights=True)
        self.unet.add_adapter(config, adapter_name="bench")
        tensors = {}
        for p in self.net0.paths:
            tensors[f"{p}.lora_A.weight"] = self.net0.lora_down(p).detach().clone()
            tensors[f"{p}.lora_B.weight"] = self.net0.lora_up(p).detach().clone()
        result = set_peft_model_state_dict(self.unet, tensors, adapter_name="bench")
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"peft did not take {result.unexpected_keys[:3]}")
        params = [q for n, q in self.unet.named_parameters() if ".lora_" in n]
        for q in params:
            q.requires_grad_(True)
        return params, lambda: None

    def run(self, name: str, steps: int, warmup: int) -> dict:
        params, cleanup = self.build(name)
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(self.predict(self.x), self.target).backward()
            opt.step()

        try:
            seconds = _step_seconds(step, steps, warmup)
            mem, method = peak_bytes(step, "cpu")
            with torch.no_grad():
                trained = self.predict(self.x_eval)
        finally:
            cleanup()
        return {"seconds": seconds, "memory": mem, "memory_method": method, "trained": trained}


def headless_side(args) -> dict:
    case = HeadlessCase()
    names = ["peft", "pso_hook"]
    rows = {n: {"seconds": [], "memory": []} for n in names}
    exact = {}
    with torch.no_grad():
        base = case.predict(case.x_eval)  # the pristine UNet
    for r in range(args.repeats):
        trained = {}
        for n in (names if r % 2 == 0 else list(reversed(names))):
            res = case.run(n, args.steps, args.warmup)
            rows[n]["seconds"].append(sorted(res["seconds"])[len(res["seconds"]) // 2])
            rows[n]["memory"].append(res["memory"])
            trained[n] = res["trained"]
        if r == 0:
            if not float((trained["peft"] - base).abs().max()) > 0:
                raise RuntimeError("the peft LoRA does not change the prediction; nothing to compare")
            exact["pso_hook"] = {"vs_baseline": _rel(trained["pso_hook"], trained["peft"],
                                                     trained["peft"] - base),
                                 "lora_effect": float((trained["peft"] - base).abs().max())}
        print(f"  headless repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    return {"variants": names, "families": {"diffusers_tiny": {"exactness": exact, "runs": rows,
                                                              "lora_paths": len(case.net0.paths)}}}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _ratios(c: list[float], b: list[float]) -> Stat:
    return Stat.of([x / y if y > 0 else math.inf for x, y in zip(c, b, strict=True)])


def report(side: str, result: dict) -> str:
    names = result["variants"]
    base = names[0]
    lines = [f"## {side} side (baseline: {base})", "",
             "| model | variant | step time ratio median [min-max] | peak-memory ratio median [min-max] "
             "| step ms (median) | peak MiB (median) | max rel. diff, stock loader vs trained "
             "| max rel. diff vs baseline | LoRA effect (max abs) |", "|" + "---|" * 9]
    for fam, data in result["families"].items():
        runs, exact = data["runs"], data["exactness"]
        for n in names:
            t = _ratios(runs[n]["seconds"], runs[base]["seconds"])
            m = _ratios(runs[n]["memory"], runs[base]["memory"])
            e = exact.get(n, {})
            stock = e.get("vs_stock_loader")
            vs = e.get("vs_baseline")
            lines.append(
                f"| {fam} | {n} | {t.fmt(1, 3)} | {m.fmt(1, 3)} | "
                f"{Stat.of(runs[n]['seconds']).median * 1e3:.1f} | "
                f"{Stat.of(runs[n]['memory']).median / 2**20:.1f} | "
                f"{'-' if stock is None else f'{stock:.1e}'} | {'-' if vs is None else f'{vs:.1e}'} | "
                f"{e.get('lora_effect', float('nan')):.2e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=("host", "headless", "both"), default="both")
    parser.add_argument("--families", default="sd15,sdxl", help="host side: tiny fixtures to use")
    parser.add_argument("--latent", type=int, default=16, help="host side: latent size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = parser.parse_args(argv)
    args.families = [f for f in args.families.split(",") if f]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {}
    if args.side in ("host", "both"):
        results["host"] = host_side(args)
        print(report("host", results["host"]))
        print()
    if args.side in ("headless", "both"):
        results["headless"] = headless_side(args)
        print(report("headless", results["headless"]))
    print(f"\n{args.repeats} repeats x {args.steps} timed steps (after {args.warmup} warm-up), "
          f"{args.threads} thread(s), torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.2f}; ratios are per repeat against the baseline of the same repeat.")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0
