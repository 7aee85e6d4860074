"""The README's demo: the shipped style-transfer workflow on the shipped demo model, in a headless ComfyUI.

What it does (``python -m tools.demo [--out DIR] [--steps N]``, or ``bash scripts/demo.sh``):

1. writes a small target set of a *different style* into ComfyUI's ``input/pso_demo_bold/``: bold
   handwritten digits (strokes one pixel wider, ``bench.digits.data``), 4 per digit, each with the
   caption the demo model knows (``"a handwritten digit 3"``);
2. starts a headless ComfyUI with this extension and runs ``example_workflows/pso_style_transfer.json``
   (the workflow shipped for SDXL-Turbo / DMD2 users) with only its loader swapped: Load Checkpoint
   -> PSO Demo Model. The other changes are widget values a user would set for this model
   (:data:`DEMO_SETTINGS`: the folder, 32 px, the DMD2 schedule with ``lcm``, a CPU-sized training
   budget). The graph samples references, builds pairs, trains the LoRA with PSO and saves it, plots
   the loss and samples before/after with the 4-step sampler;
3. runs the same graph again with ``method = sft`` (plain diffusion-loss fine-tuning, same budget);
4. samples 10 images per digit with the stock LoraLoader for the original model, the PSO LoRA and the
   SFT LoRA (same seeds, 4 steps) and measures them (``bench.digits.metrics``: the judge's
   bold-style rate, the distance to the bold targets, sharpness relative to real bold digits);
5. writes ``grid.png``, the LoRAs, the loss plots and ``metrics.md`` / ``metrics.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tools.comfy_host import REPO_ROOT, ComfyServer
from tools.workflow import ui_to_api

EXAMPLE = REPO_ROOT / "example_workflows" / "pso_style_transfer.json"
TARGET_FOLDER = "pso_demo_bold"
#: The only node the demo changes in the example: the loader (same MODEL/CLIP/VAE output slots).
LOADER_SWAP = {"CheckpointLoaderSimple": {"class_type": "PSODemoModelLoader"}}
#: Widget values a user would set for the demo model (size, schedule, a CPU-sized budget).
DEMO_SETTINGS = {
    "PSOTargetImagesFromFolder": {"inputs": {"folder": TARGET_FOLDER, "size": 32}},
    "PSOFewStepSigmas": {"inputs": {"schedule": "dmd2"}},
    "KSamplerSelect": {"inputs": {"sampler_name": "lcm"}},
    "PSOSampleReferences": {"inputs": {"references_per_target": 1}},
    "PSOTrain": {"inputs": {"steps": 100, "learning_rate": 1e-3, "lora_rank": 8, "batch_size": 8,
                            "reference_refresh_every": 1, "training_dtype": "float32",
                            "gradient_checkpointing": False, "preview_every": 20, "lora_target": "all"}},
    "CLIPTextEncode": {"inputs": {"text": "a handwritten digit 4"}},
    "EmptyLatentImage": {"inputs": {"width": 32, "height": 32, "batch_size": 4}},
}
SAMPLES_PER_DIGIT = 10
EVAL_SEED = 1234


def demo_replace(method: str, steps: int | None = None) -> dict:
    """``ui_to_api`` replacements: the loader swap plus the demo's widget values."""
    out = {**LOADER_SWAP, **{k: {"inputs": dict(v["inputs"])} for k, v in DEMO_SETTINGS.items()}}
    out["PSOTrain"]["inputs"]["method"] = method
    if steps is not None:
        out["PSOTrain"]["inputs"]["steps"] = steps
    out["PSOSaveLoRA"] = {"inputs": {"filename_prefix": f"pso_demo/{method}"}}
    out["LossGraphNode"] = {"inputs": {"filename_prefix": f"pso_demo/{method}_loss"}}
    return out


def write_targets(folder: Path, per_digit: int = 4) -> torch.Tensor:
    """Bold digits (held-out split, so not the images the model was trained on) as 32x32 PNGs with
    captions. Returns them as (N, 1, 8, 8) in [-1, 1] (the 8x8 originals)."""
    from PIL import Image

    from bench.digits.data import load_splits
    from tools.train_demo_model import load_demo_module, render

    prompt = load_demo_module().prompt

    splits = load_splits("bold", seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    chosen = []
    for d in range(10):
        idx = torch.nonzero(splits.target_test_y == d).flatten()[:per_digit]
        for k, i in enumerate(idx.tolist()):
            rgb = render(splits.target_test_x[i : i + 1])[0].permute(1, 2, 0).numpy()
            Image.fromarray((rgb * 255).round().astype(np.uint8)).save(folder / f"digit{d}_{k}.png")
            (folder / f"digit{d}_{k}.txt").write_text(prompt(d), encoding="utf-8")
            chosen.append(splits.target_test_x[i])
    return torch.stack(chosen)


#: Step count -> PSO Few-Step Sigmas preset of the evaluation: DMD2's 4 steps and the 2- and 1-step
#: schedules inside them (999/499 and 999), all timesteps the demo model was distilled on.
EVAL_SCHEDULES = {4: "dmd2", 2: "lightning_2", 1: "turbo_1"}


def eval_graph(lora_name: str | None, prefix: str, schedule: str = "dmd2") -> dict:
    """Demo model (+ stock LoraLoader) -> 10 samples per digit with PSO Few-Step Sigmas + lcm."""
    from tools.train_demo_model import load_demo_module

    prompt = load_demo_module().prompt
    g = {"ckpt": {"class_type": "PSODemoModelLoader", "inputs": {}},
         "sigmas": {"class_type": "PSOFewStepSigmas", "inputs": {"model": ["ckpt", 0], "schedule": schedule}},
         "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "lcm"}},
         "latent": {"class_type": "EmptyLatentImage",
                    "inputs": {"width": 32, "height": 32, "batch_size": SAMPLES_PER_DIGIT}},
         "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": EVAL_SEED}}}
    model, clip = ["ckpt", 0], ["ckpt", 1]
    if lora_name is not None:
        g["lora"] = {"class_type": "LoraLoader",
                     "inputs": {"model": model, "clip": clip, "lora_name": lora_name,
                                "strength_model": 1.0, "strength_clip": 1.0}}
        model, clip = ["lora", 0], ["lora", 1]
    for d in range(10):
        g[f"text{d}"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": prompt(d)}}
        g[f"guider{d}"] = {"class_type": "BasicGuider",
                           "inputs": {"model": model, "conditioning": [f"text{d}", 0]}}
        g[f"sample{d}"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": [f"guider{d}", 0], "sampler": ["sampler", 0],
            "sigmas": ["sigmas", 0], "latent_image": ["latent", 0]}}
        g[f"decode{d}"] = {"class_type": "VAEDecode",
                           "inputs": {"samples": [f"sample{d}", 0], "vae": ["ckpt", 2]}}
        g[f"save{d}"] = {"class_type": "SaveImage",
                         "inputs": {"images": [f"decode{d}", 0], "filename_prefix": f"{prefix}_d{d}"}}
    return g


def to_digits8(rgb: np.ndarray) -> torch.Tensor:
    """32x32 RGB uint8 images -> the 8x8 grey scale of the metrics. Shapes: (N, 32, 32, 3) -> (N, 1, 8, 8)."""
    x = torch.from_numpy(rgb.astype(np.float32) / 255.0).mean(dim=-1, keepdim=True).permute(0, 3, 1, 2)
    return torch.nn.functional.avg_pool2d(x, 4) * 2 - 1


def load_outputs(server: ComfyServer, entry: dict) -> tuple[np.ndarray, torch.Tensor]:
    """The eval graph's images, digit by digit: (N, 32, 32, 3) uint8 and their labels (N,)."""
    from PIL import Image

    images, labels = [], []
    for d in range(10):
        for info in entry["outputs"][f"save{d}"]["images"]:
            images.append(np.asarray(Image.open(server.output_path(info)).convert("RGB")))
            labels.append(d)
    return np.stack(images), torch.tensor(labels)


def real_reference():
    """Judge and reference statistics on real digits passed through the same 32 px rendering."""
    from dataclasses import replace

    from bench.digits.data import load_splits
    from bench.digits.metrics import make_reference, train_judge
    from tools.train_demo_model import render

    splits = load_splits("bold", seed=0)

    def through(x):
        return to_digits8((render(x).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))

    rendered = replace(splits, **{f: through(getattr(splits, f)) for f in
                                  ("base_train_x", "base_test_x", "target_train_x", "target_test_x")})
    judge, _ = train_judge(rendered)
    return make_reference(judge, rendered), rendered


def write_grid(rows: list[tuple[str, np.ndarray]], path: Path) -> None:
    """One row per model (first two samples of every digit), upscaled 3x, labelled."""
    from PIL import Image, ImageDraw

    scale, pad, label_w = 3, 2, 120
    cols = rows[0][1].shape[0]
    cell = 32 * scale + pad
    canvas = Image.new("RGB", (label_w + cols * cell + pad, len(rows) * cell + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * cell + cell // 2 - 6), label, fill=(0, 0, 0))
        for c, img in enumerate(images):
            tile = Image.fromarray(img).resize((32 * scale, 32 * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + c * cell + pad, r * cell + pad))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    from pso.io import atomic_write_bytes

    atomic_write_bytes(path, buf.getvalue())


def grid_columns(images: np.ndarray, labels: torch.Tensor, per_digit: int = 2) -> np.ndarray:
    keep = [i for d in range(10) for i in torch.nonzero(labels == d).flatten()[:per_digit].tolist()]
    return images[keep]


def metrics_table(metrics: dict[str, dict]) -> str:
    """Rows: models; columns: each metric at 4, 2 and 1 steps where the row was sampled (real rows: one
    value). FDc: FD of the samples clamped to [-1, 1]."""
    cols = [("on_target", "bold", "{:.2f}"), ("fd", "FD", "{:.0f}"), ("fd_clamped", "FDc", "{:.0f}"),
            ("sharpness", "sharp", "{:.2f}"), ("class_acc", "legible", "{:.2f}")]
    steps = list(EVAL_SCHEDULES)
    head = [f"{h} {n}" for _, h, _ in cols for n in steps] + ["ink 4"]
    lines = ["| model | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(head)]
    for name, m in metrics.items():
        by = m if "4" in m else {str(n): m for n in steps}
        cells = [f.format(by[str(n)][k]) if str(n) in by else "" for k, _, f in cols for n in steps]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {by['4']['ink']:.3f} |")
    return "\n".join(lines)


def _fresh(path: Path) -> Path:
    """``path``, or a numbered sibling if it exists (never overwrite an earlier run's file)."""
    n = 1
    out = path
    while out.exists():
        out = path.with_name(f"{path.stem}_{n}{path.suffix}")
        n += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "demo_output",
                        help="folder for the demo's outputs (created; existing files are kept)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of PSO and of SFT")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    workflow = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    metrics, rows, written, timings = {}, [], [], {}
    with tempfile.TemporaryDirectory(prefix="pso-demo-") as base, \
            ComfyServer(Path(base), with_fixtures=False) as server:
        print(f"[demo] ComfyUI started in {time.monotonic() - t0:.0f} s", flush=True)
        targets8 = write_targets(Path(base) / "input" / TARGET_FOLDER)
        info = server.object_info()
        loras = Path(base) / "models" / "loras"
        lora_files = {}
        for method in ("pso_offline", "sft"):
            t1 = time.monotonic()
            graph = ui_to_api(workflow, info, replace=demo_replace(method, args.steps))
            entry = server.run(graph, timeout=900)
            timings[method] = time.monotonic() - t1
            lora = next((loras / "pso_demo").glob(f"{method}_*.safetensors"))
            lora_files[method] = f"pso_demo/{lora.name}"
            written.append(shutil.copy2(lora, _fresh(out / f"{method}_lora.safetensors")))
            plot = next(k for k, v in graph.items() if v["class_type"] == "LossGraphNode")
            for img in entry["outputs"][plot]["images"]:
                written.append(shutil.copy2(server.output_path(img), _fresh(out / f"{method}_loss.png")))
            for node in (k for k, v in graph.items() if v["class_type"] == "SaveImage"):
                tag = graph[node]["inputs"]["filename_prefix"].rsplit("_", 1)[-1]  # before / after
                for i, img in enumerate(entry["outputs"][node]["images"]):
                    written.append(shutil.copy2(server.output_path(img),
                                                _fresh(out / f"{method}_example_{tag}_{i}.png")))
            print(f"[demo] example workflow with method={method}: {timings[method]:.0f} s", flush=True)
        t1 = time.monotonic()
        ref, rendered = real_reference()
        names = {"original model": None, "PSO LoRA": lora_files["pso_offline"], "SFT LoRA": lora_files["sft"]}
        from bench.digits.metrics import evaluate

        for name, lora_name in names.items():
            metrics[name] = {}
            for n, schedule in EVAL_SCHEDULES.items():
                images, labels = load_outputs(server, server.run(eval_graph(lora_name, "eval", schedule),
                                                                 timeout=600))
                x8 = to_digits8(images)
                metrics[name][str(n)] = evaluate(x8, labels, ref) | {"ink": float(((x8 + 1) / 2).mean())}
                if n in (4, 1):
                    rows.append((f"{name}, {n} step{'s' if n > 1 else ''}", grid_columns(images, labels)))
        n = 10 * SAMPLES_PER_DIGIT  # real rows of the same size give the scale: the floor and the start
        for name, x, y in (("real bold digits (floor)", rendered.target_train_x, rendered.target_train_y),
                           ("real plain digits", rendered.base_test_x, rendered.base_test_y)):
            pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:n]
            real = evaluate(x[pick], y[pick], ref) | {"ink": float(((x[pick] + 1) / 2).mean())}
            metrics[name] = {"4": real}
        timings["evaluation"] = time.monotonic() - t1
    tgt = (torch.nn.functional.interpolate((targets8 + 1) / 2, size=(32, 32), mode="bilinear")
           .clamp(0, 1).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    rows.insert(0, ("bold targets", tgt[[i for d in range(10) for i in (4 * d, 4 * d + 1)]]))
    write_grid(rows, _fresh(out / "grid.png"))
    total = time.monotonic() - t0
    summary = {"metrics": metrics, "seconds": {**{k: round(v, 1) for k, v in timings.items()},
                                               "total": round(total, 1)},
               "settings": demo_replace("pso_offline", args.steps)}
    from pso.io import atomic_write_bytes, atomic_write_json

    atomic_write_json(_fresh(out / "metrics.json"), summary)
    md = (f"# comfyui-pso demo\n\nTarget: bold digits (strokes one pixel wider). Samples at 4, 2 and 1 steps "
          f"(DMD2 timesteps 999/749/499/249 and the 999/499 and 999 inside them, lcm), "
          f"{SAMPLES_PER_DIGIT} per digit, same seeds for every row; decoded images are in range, "
          "so FDc = FD.\n\n"
          f"{metrics_table(metrics)}\n\nWall time {total:.0f} s.\n")
    atomic_write_bytes(_fresh(out / "metrics.md"), md.encode())
    print(metrics_table(metrics))
    print(f"[demo] finished in {total:.0f} s; outputs (grid.png, metrics.md, LoRAs, loss plots) are in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
