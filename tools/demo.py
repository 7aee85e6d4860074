"""The README's demo: the shipped style-transfer workflow on the shipped demo model, in a headless ComfyUI.

What it does (``python -m tools.demo [--model shapes|digits] [--out DIR] [--steps N]``, or
``bash scripts/demo.sh``):

1. writes a small target set of a *different style* into ComfyUI's ``input/``: for the shapes model
   (the default) striped shapes (the model's shapes filled with diagonal stripes,
   ``bench.digits.shapes`` ``striped_fixed`` drawn at 32 px), 2 per caption (``"a red circle"``); for
   the digits model bold handwritten digits (strokes one pixel wider, ``bench.digits.data``), 4 per
   digit (``"a handwritten digit 3"``); always held-out drawings with the captions the model knows;
2. starts a headless ComfyUI with this extension and runs ``example_workflows/pso_style_transfer.json``
   (the workflow shipped for SDXL-Turbo / DMD2 users) with only its loader swapped: Load Checkpoint
   -> PSO Demo Model. The other changes are widget values a user would set for this model
   (:data:`DEMO_SETTINGS`: the folder, 32 px, the DMD2 schedule with ``lcm``, a CPU-sized training
   budget). The graph samples references, builds pairs, trains the LoRA with PSO and saves it, plots
   the loss and samples before/after with the 4-step sampler;
3. runs the same graph again with ``method = sft`` (plain diffusion-loss fine-tuning, same budget);
4. samples every caption with the stock LoraLoader for the original model, the PSO LoRA and the
   SFT LoRA (same seeds, 4, 2 and 1 steps) and measures them (``bench.digits.metrics``: the judge's
   target-style rate, the distance to the targets, sharpness relative to real targets, whether the
   judge reads the prompted class; for shapes also the stripe score of ``bench.digits.shapes``);
5. writes ``grid.png``, the LoRAs, the loss plots and ``metrics.md`` / ``metrics.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from tools.comfy_host import REPO_ROOT, ComfyServer
from tools.workflow import ui_to_api

EXAMPLE = REPO_ROOT / "example_workflows" / "pso_style_transfer.json"


@dataclass(frozen=True)
class DemoTask:
    """What differs between the two demo models: folder, captions, target style, how to measure."""

    model: str  # PSODemoModelLoader's ``model`` choice, also the bench.digits task of its data
    bench_style: str  # the bench.digits target style of its targets
    noun: str  # what one image shows ("digit", "shape"): file names and table rows
    target_text: str  # the target in metrics.md
    extra_metrics: tuple[str, ...]  # bench.digits task metrics beside the common ones
    target_folder: str  # under ComfyUI's input/
    style: str  # the target style's word in the table ("bold", "striped")
    targets_label: str  # the grid's first row
    prompt_example: str  # the example graph's before/after prompt
    per_class: int  # evaluation samples per caption
    grid_per_class: int  # of them in the grid
    targets_per_class: int  # target images written per caption


TASKS = {
    "shapes": DemoTask("shapes", "striped_fixed", "shape",
                       "striped shapes (the shapes filled with diagonal stripes, period 8 px)", ("stripes",),
                       "pso_demo_striped", "striped", "striped targets", "a blue square",
                       per_class=5, grid_per_class=1, targets_per_class=2),
    "digits": DemoTask("digits", "bold", "digit", "bold digits (strokes one pixel wider)", (),
                       "pso_demo_bold", "bold", "bold targets", "a handwritten digit 4",
                       per_class=10, grid_per_class=2, targets_per_class=4),
}
#: The digits demo's folder (the name before the shapes model existed).
TARGET_FOLDER = TASKS["digits"].target_folder
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
EVAL_SEED = 1234


def demo_replace(method: str, steps: int | None = None, task: DemoTask = TASKS["digits"],
                 seed: int | None = None) -> dict:
    """``ui_to_api`` replacements: the loader swap plus the demo's widget values; ``seed`` (default: the
    example's 0) seeds the training and the reference sampling."""
    out = {**LOADER_SWAP, **{k: {"inputs": dict(v["inputs"])} for k, v in DEMO_SETTINGS.items()}}
    out["CheckpointLoaderSimple"] = {"class_type": "PSODemoModelLoader", "inputs": {"model": task.model}}
    out["PSOTargetImagesFromFolder"]["inputs"]["folder"] = task.target_folder
    out["CLIPTextEncode"]["inputs"]["text"] = task.prompt_example
    out["PSOTrain"]["inputs"]["method"] = method
    if steps is not None:
        out["PSOTrain"]["inputs"]["steps"] = steps
    if seed is not None:
        out["PSOTrain"]["inputs"]["seed"] = seed
        out["PSOSampleReferences"]["inputs"]["seed"] = seed
    out["PSOSaveLoRA"] = {"inputs": {"filename_prefix": f"pso_demo/{method}"}}
    out["LossGraphNode"] = {"inputs": {"filename_prefix": f"pso_demo/{method}_loss"}}
    return out


def task_captions(task: DemoTask) -> list[str]:
    """The model's captions, class by class (class c is caption c)."""
    return list(_model_captions(task.model))


@functools.cache
def _model_captions(model: str) -> tuple[str, ...]:
    """Read once per model: each read executes ``nodes/demo_model.py``, and the demo asks for them per
    evaluation graph."""
    from tools.train_demo_model import captions

    return tuple(captions(model))


def _bench_task(task: DemoTask):
    from bench.digits.tasks import TASKS as BENCH_TASKS

    return BENCH_TASKS[task.model]


def with_style(task: DemoTask, style: str | None) -> DemoTask:
    """``task`` with another target style of its ``bench.digits`` task (``--style``), for trying a target
    the shipped one is not: e.g. shapes' ``striped`` (the stripes at a random phase per image, whose
    mean is a flat fill: what plain fine-tuning regresses to) or ``outlined``. Its targets go to their
    own folder; None or the task's own style returns ``task``."""
    if style is None or style == task.bench_style:
        return task
    styles = _bench_task(task).styles
    if style not in styles:
        raise ValueError(f"--style {style!r} is not a target style of the {task.model} model; "
                         f"choose one of {list(styles)}")
    return replace(task, bench_style=style, target_folder=f"pso_demo_{task.model}_{style}", style=style,
                   target_text=f"{task.noun}s in the bench.digits style {style!r}",
                   targets_label=f"{style} targets")


def _splits(task: DemoTask):
    """The task's real images (``bench.digits``) at the resolution the judge reads."""
    return _bench_task(task).load(task.bench_style, seed=0)


def to_pixels(task: DemoTask, x: torch.Tensor) -> torch.Tensor:
    """The task's real images -> the 32x32 RGB in [0, 1] the demo model draws (its training rendering)."""
    from tools.train_demo_model import render, render_shapes

    return render(x) if task.model == "digits" else render_shapes(x)


def write_targets(folder: Path, per_digit: int | None = None,
                  task: DemoTask = TASKS["digits"]) -> torch.Tensor:
    """Target-style images (held-out split, so not the images the model was trained on) as 32x32 PNGs
    with their captions, ``per_digit`` (default the task's) per caption. Returns them at the
    judge's resolution, in [-1, 1] ((N, 1, 8, 8) digits, (N, 3, 16, 16) shapes)."""
    from PIL import Image

    per = per_digit or task.targets_per_class
    captions = task_captions(task)
    splits = _splits(task)
    name = task.noun
    folder.mkdir(parents=True, exist_ok=True)
    chosen = []
    for c, caption in enumerate(captions):
        idx = torch.nonzero(splits.target_test_y == c).flatten()[:per]
        for k, i in enumerate(idx.tolist()):
            rgb = to_pixels(task, splits.target_test_x[i : i + 1])[0].permute(1, 2, 0).numpy()
            Image.fromarray((rgb * 255).round().astype(np.uint8)).save(folder / f"{name}{c}_{k}.png")
            (folder / f"{name}{c}_{k}.txt").write_text(caption, encoding="utf-8")
            chosen.append(splits.target_test_x[i])
    return torch.stack(chosen)


#: Step count -> PSO Few-Step Sigmas preset of the evaluation: DMD2's 4 steps and the 2- and 1-step
#: schedules inside them (999/499 and 999), all timesteps the demo model was distilled on.
EVAL_SCHEDULES = {4: "dmd2", 2: "lightning_2", 1: "turbo_1"}


def eval_graph(lora_name: str | None, prefix: str, schedule: str = "dmd2",
               task: DemoTask = TASKS["digits"]) -> dict:
    """Demo model (+ stock LoraLoader) -> ``task.per_class`` samples per caption with PSO Few-Step
    Sigmas + lcm. Caption c's images are saved by node ``save{c}``."""
    g = {"ckpt": {"class_type": "PSODemoModelLoader", "inputs": {"model": task.model}},
         "sigmas": {"class_type": "PSOFewStepSigmas", "inputs": {"model": ["ckpt", 0], "schedule": schedule}},
         "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "lcm"}},
         "latent": {"class_type": "EmptyLatentImage",
                    "inputs": {"width": 32, "height": 32, "batch_size": task.per_class}},
         "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": EVAL_SEED}}}
    model, clip = ["ckpt", 0], ["ckpt", 1]
    if lora_name is not None:
        g["lora"] = {"class_type": "LoraLoader",
                     "inputs": {"model": model, "clip": clip, "lora_name": lora_name,
                                "strength_model": 1.0, "strength_clip": 1.0}}
        model, clip = ["lora", 0], ["lora", 1]
    for d, caption in enumerate(task_captions(task)):
        g[f"text{d}"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": caption}}
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


def to_shapes16(rgb: np.ndarray) -> torch.Tensor:
    """32x32 RGB uint8 images -> the 16x16 RGB the shapes judge reads (2x2 means: the inverse of the
    model's rendering). Shapes: (N, 32, 32, 3) -> (N, 3, 16, 16) in [-1, 1]."""
    x = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    return torch.nn.functional.avg_pool2d(x, 2) * 2 - 1


def to_metric(task: DemoTask, rgb: np.ndarray) -> torch.Tensor:
    """Decoded 32x32 RGB uint8 images -> the judge's input."""
    return to_digits8(rgb) if task.model == "digits" else to_shapes16(rgb)


def load_outputs(server: ComfyServer, entry: dict, classes: int = 10) -> tuple[np.ndarray, torch.Tensor]:
    """The eval graph's images, caption by caption: (N, 32, 32, 3) uint8 and their labels (N,)."""
    from PIL import Image

    images, labels = [], []
    for d in range(classes):
        for info in entry["outputs"][f"save{d}"]["images"]:
            images.append(np.asarray(Image.open(server.output_path(info)).convert("RGB")))
            labels.append(d)
    return np.stack(images), torch.tensor(labels)


def real_reference(task: DemoTask = TASKS["digits"]):
    """Judge and reference statistics on the task's real images passed through the same 32 px rendering."""
    from dataclasses import replace

    from bench.digits.metrics import JudgeConfig, make_reference, train_judge

    bench_task = _bench_task(task)
    splits = _splits(task)

    def through(x):
        rgb = (to_pixels(task, x).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        return to_metric(task, rgb)

    rendered = replace(splits, **{f: through(getattr(splits, f)) for f in
                                  ("base_train_x", "base_test_x", "target_train_x", "target_test_x")})
    judge, _ = train_judge(rendered, JudgeConfig(hidden=bench_task.judge_hidden), bench_task.num_classes)
    extra = {k: bench_task.metrics[k] for k in task.extra_metrics}
    return make_reference(judge, rendered, extra), rendered


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
    """The first ``per_digit`` images of every class, class by class."""
    classes = int(labels.max()) + 1
    keep = [i for d in range(classes) for i in torch.nonzero(labels == d).flatten()[:per_digit].tolist()]
    return images[keep]


def metrics_table(metrics: dict[str, dict], task: DemoTask = TASKS["digits"]) -> str:
    """Rows: models; columns: each metric at 4, 2 and 1 steps where the row was sampled (real rows: one
    value). FDc: FD of the samples clamped to [-1, 1]."""
    cols = [("on_target", task.style, "{:.2f}"), ("fd", "FD", "{:.0f}"), ("fd_clamped", "FDc", "{:.0f}"),
            ("sharpness", "sharp", "{:.2f}"), ("class_acc", "legible", "{:.2f}")]
    cols += [(k, k, "{:.2f}") for k in task.extra_metrics]
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
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the training and the references (default the example's 0); the "
                        "evaluation samples keep their fixed noise")
    parser.add_argument("--model", choices=list(TASKS), default="shapes",
                        help="the demo model: shapes (striped targets) or digits (bold targets)")
    parser.add_argument("--style", default=None,
                        help="another target style of the model's bench.digits task (shapes: striped = "
                        "stripes at a random phase per image, outlined; digits: italic); default: the "
                        "shipped targets' style")
    args = parser.parse_args(argv)
    try:
        task = with_style(TASKS[args.model], args.style)
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(1)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    workflow = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    metrics, rows, written, timings = {}, [], [], {}
    with tempfile.TemporaryDirectory(prefix="pso-demo-") as base, \
            ComfyServer(Path(base), with_fixtures=False) as server:
        print(f"[demo] ComfyUI started in {time.monotonic() - t0:.0f} s", flush=True)
        targets = write_targets(Path(base) / "input" / task.target_folder, task=task)
        info = server.object_info()
        loras = Path(base) / "models" / "loras"
        lora_files = {}
        for method in ("pso_offline", "sft"):
            t1 = time.monotonic()
            graph = ui_to_api(workflow, info, replace=demo_replace(method, args.steps, task, args.seed))
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
        ref, rendered = real_reference(task)
        classes = len(task_captions(task))
        names = {"original model": None, "PSO LoRA": lora_files["pso_offline"], "SFT LoRA": lora_files["sft"]}
        from bench.digits.metrics import evaluate

        for name, lora_name in names.items():
            metrics[name] = {}
            for n, schedule in EVAL_SCHEDULES.items():
                entry = server.run(eval_graph(lora_name, "eval", schedule, task), timeout=600)
                images, labels = load_outputs(server, entry, classes)
                x = to_metric(task, images)
                metrics[name][str(n)] = evaluate(x, labels, ref) | {"ink": float(((x + 1) / 2).mean())}
                if n in (4, 1):
                    rows.append((f"{name}, {n} step{'s' if n > 1 else ''}",
                                 grid_columns(images, labels, task.grid_per_class)))
        n = classes * task.per_class  # real rows of the same size give the scale: the floor and the start
        for name, x, y in ((f"real {task.style} {task.noun}s (floor)", rendered.target_train_x,
                            rendered.target_train_y),
                           (f"real plain {task.noun}s", rendered.base_test_x, rendered.base_test_y)):
            pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:n]
            real = evaluate(x[pick], y[pick], ref) | {"ink": float(((x[pick] + 1) / 2).mean())}
            metrics[name] = {"4": real}
        timings["evaluation"] = time.monotonic() - t1
    tgt = (to_pixels(task, targets).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    per = task.targets_per_class
    first = [per * c + k for c in range(classes) for k in range(task.grid_per_class)]
    rows.insert(0, (task.targets_label, tgt[first]))
    write_grid(rows, _fresh(out / "grid.png"))
    total = time.monotonic() - t0
    summary = {"metrics": metrics, "seconds": {**{k: round(v, 1) for k, v in timings.items()},
                                               "total": round(total, 1)},
               "model": task.model, "style": task.bench_style,
               "settings": demo_replace("pso_offline", args.steps, task, args.seed)}
    from pso.io import atomic_write_bytes, atomic_write_json

    atomic_write_json(_fresh(out / "metrics.json"), summary)
    md = (f"# comfyui-pso demo ({task.model} model)\n\nTarget: {task.target_text}. "
          "Samples at 4, 2 and 1 steps "
          f"(DMD2 timesteps 999/749/499/249 and the 999/499 and 999 inside them, lcm), "
          f"{task.per_class} per caption, same seeds for every row; decoded images are in range, "
          "so FDc = FD.\n\n"
          f"{metrics_table(metrics, task)}\n\nWall time {total:.0f} s.\n")
    atomic_write_bytes(_fresh(out / "metrics.md"), md.encode())
    print(metrics_table(metrics, task))
    print(f"[demo] finished in {total:.0f} s; outputs (grid.png, metrics.md, LoRAs, loss plots) are in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
