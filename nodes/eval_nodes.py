"""PSO Evaluate: reward scores of one or more models at several step counts, as a table and a chart.

Each model samples every prompt with seed ``seed + prompt index`` through the host's own sampler
(``host_sampling.sample_trajectories``, the same call PSO Sample References makes), the VAE decodes,
and every connected reward scores the images. The same prompts and seeds are used in every cell,
so a model with and without a LoRA is compared on identical starting noise (the paper's Table 1).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from comfy_api.v0_0_2 import io
from PIL import Image, ImageDraw, ImageFont

from ..pso import eval_protocol, evaluation, schedules
from . import host_sampling, pairing
from .types import REWARD_TYPE

logger = logging.getLogger(__name__)

#: Evaluation presets: "custom" uses the node's inputs as they are; "paper" is the protocol of the
#: paper's Table 1 (steps 1 and 4, the table in its shape, every model's win rate over model 1).
PRESETS = {"custom": "the step counts and prompts as given; one table of mean ± standard error",
           "paper": "the paper's Table 1 protocol: steps 1 and 4, the table shaped like Table 1 "
                    "(PickScore, CLIP Score as the cosine, ImageReward, Aesthetic), and each model's win "
                    "rate over model 1 with a 95% bootstrap interval over prompts"}
BOOTSTRAP = 2000
MAX_MODELS = 4
MAX_REWARDS = 4
PALETTE = [(66, 133, 244), (234, 67, 53), (251, 188, 5), (52, 168, 83)]


def schedule_names() -> list[str]:
    import comfy.samplers

    return list(evaluation.STEP_SCHEDULES) + [s for s in comfy.samplers.SCHEDULER_NAMES
                                              if s not in evaluation.STEP_SCHEDULES]


def sigmas_for(model, schedule: str, steps: int) -> torch.Tensor:
    """(steps+1,) SIGMAS of ``schedule`` on this model: a few-step timestep set or a ComfyUI scheduler."""
    import comfy.samplers

    ms = model.get_model_object("model_sampling")
    if schedule in evaluation.STEP_SCHEDULES:
        if schedules.is_rectified_flow(ms):
            raise ValueError(f"PSO Evaluate: schedule {schedule!r} lists DDPM timesteps, but this model is a "
                             "rectified-flow model (e.g. FLUX.1-schnell); choose the 'simple' scheduler")
        return schedules.few_step_sigmas(ms, evaluation.step_timesteps(schedule, steps)).float().cpu()
    if schedule not in comfy.samplers.SCHEDULER_NAMES:
        raise ValueError(f"PSO Evaluate: unknown schedule {schedule!r}; valid: {schedule_names()}")
    return comfy.samplers.calculate_sigmas(ms, schedule, steps).float().cpu()


def sample_images(model, vae, conds: list, sampler, sigmas: torch.Tensor, width: int, height: int, seed: int,
                  on_image) -> torch.Tensor:
    """One image per prompt (seed + i), decoded. Shapes: -> (P, height, width, 3) float32 on the CPU."""
    images = []
    for i, cond in enumerate(conds):
        latent = {"samples": torch.zeros((1, 4, height // 8, width // 8))}
        _, out = host_sampling.sample_trajectories(model, cond, None, 1.0, sampler, sigmas, latent, seed + i)
        images.append(vae.decode(out["samples"])[..., :3].float().cpu().reshape(-1, height, width, 3))
        on_image()
    return torch.cat(images)


def score_all(rewards_: list, images: torch.Tensor, prompts: list[str]) -> list[torch.Tensor]:
    """Score with each reward, freeing the host's GPU memory for it first. -> R tensors (P,)."""
    import comfy.model_management as mm

    out = []
    for reward in rewards_:
        need = int(getattr(reward, "memory_bytes", 0))
        if need and mm.get_torch_device().type != "cpu":
            mm.free_memory(need * 1.3, mm.get_torch_device())
        scores = reward.score(images, prompts)
        if tuple(scores.shape) != (len(prompts),):
            raise ValueError(f"reward {reward.name!r} returned scores of shape {tuple(scores.shape)} for "
                             f"{len(prompts)} images; a PSO_REWARD returns one score per image")
        out.append(scores.float().cpu())
    return out


def bar_chart(result: evaluation.EvalScores, panel_height: int = 320) -> torch.Tensor:
    """Grouped bars: one panel per reward, a group per step count, a bar per model (mean, with the
    standard error as a whisker). Shapes: -> (1, H, W, 3) float32 in [0, 1] (an IMAGE)."""
    font = ImageFont.load_default()
    n_models, n_steps = len(result.models), len(result.steps)
    bar, gap, left, top, bottom = 26, 22, 64, 36, 44
    group_w = n_models * bar + gap
    panel_w = left + n_steps * group_w + 16
    legend_h = 22 * n_models + 10
    width = max(panel_w * len(result.rewards), 240)
    img = Image.new("RGB", (width, panel_height + legend_h), "white")
    draw = ImageDraw.Draw(img)
    for k, reward in enumerate(result.rewards):
        x0 = k * panel_w
        cells = {(m, n): result.mean_sem(m, n, reward) for m in result.models for n in result.steps}
        lo = min(mu - se for mu, se in cells.values())
        hi = max(mu + se for mu, se in cells.values())
        # rewards differ in the second or third digit (PickScore 21.4 vs 21.7): when every value is well
        # above 0 the axis starts near the smallest one instead (its lower end is printed on it)
        lo = lo - 0.5 * (hi - lo) if lo > 0.5 * hi > 0 else min(lo, 0.0)
        hi = hi if hi > lo else lo + 1.0
        plot_h = panel_height - top - bottom

        def y(v, lo=lo, hi=hi, plot_h=plot_h):
            return top + plot_h * (1 - (v - lo) / (hi - lo))

        draw.text((x0 + left, 8), reward[:40], fill="black", font=font)
        draw.line([(x0 + left - 4, top), (x0 + left - 4, top + plot_h)], fill="black")
        base = min(max(0.0, lo), hi)
        draw.line([(x0 + left - 4, y(base)), (x0 + panel_w - 10, y(base))], fill="black")
        for v in (lo, hi):
            draw.text((x0 + 4, y(v) - 6), f"{v:.3g}", fill="black", font=font)
        for j, n in enumerate(result.steps):
            gx = x0 + left + j * group_w
            draw.text((gx + n_models * bar / 2 - 18, top + plot_h + 8), f"{n} step{'s' * (n != 1)}",
                      fill="black", font=font)
            for i, m in enumerate(result.models):
                mu, se = cells[(m, n)]
                bx = gx + i * bar
                draw.rectangle([bx + 2, min(y(mu), y(base)), bx + bar - 2, max(y(mu), y(base))],
                               fill=PALETTE[i % len(PALETTE)])
                draw.line([(bx + bar / 2, y(mu - se)), (bx + bar / 2, y(mu + se))], fill="black")
    for i, m in enumerate(result.models):
        ly = panel_height + 5 + 22 * i
        draw.rectangle([10, ly, 26, ly + 14], fill=PALETTE[i % len(PALETTE)])
        draw.text((34, ly + 1), m[:60], fill="black", font=font)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def read_prompt_file(name: str, limit: int) -> list[str]:
    """The prompts of a file in ComfyUI's input folder (no path outside it)."""
    import folder_paths

    root = Path(folder_paths.get_input_directory()).resolve()
    path = (root / name.strip()).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"PSO Evaluate: prompt_file {name!r} must be a file in ComfyUI's input folder "
                         f"{root}")
    try:
        return eval_protocol.read_prompts(path, limit)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise ValueError(f"PSO Evaluate: prompt_file {name!r}: {exc}") from exc


def paper_tables(result: evaluation.EvalScores, names: list[str], seed: int) -> str:
    """The paper preset's output: Table 1's shape, then each model against model 1."""
    parts = [eval_protocol.table1_markdown({"prompts": result})]
    for other in names[1:]:
        rows = eval_protocol.comparisons({"prompts": result}, other, names[0], BOOTSTRAP, seed)
        parts.append(eval_protocol.comparison_markdown(rows, other, names[0]))
    return "\n\n".join(parts)


def _model_inputs(index: int) -> list:
    optional = index > 1
    return [
        io.Model.Input(f"model_{index}", optional=optional, tooltip=(
            f"Model {index} to evaluate" + (" (optional), e.g. the same model with your PSO LoRA "
                                            "(LoraLoader)." if optional else ", e.g. the base model."))),
        io.String.Input(f"label_{index}", default="base" if index == 1 else f"model {index}", tooltip=(
            f"Name of model {index} in the table and chart.")),
    ]


class PSOEvaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        rewards_opt = [REWARD_TYPE.Input(f"reward_{k}", optional=True, tooltip=(
            f"Reward model {k} (optional): another PSO Reward Model Loader."))
            for k in range(2, MAX_REWARDS + 1)]
        models = [inp for i in range(1, MAX_MODELS + 1) for inp in _model_inputs(i)]
        return io.Schema(
            node_id="PSOEvaluate",
            display_name="PSO Evaluate (rewards x steps)",
            category="PSO/rewards",
            description=(
                "Reproduces the paper's Table 1 on your models: samples every prompt with a fixed seed under "
                "each connected model at each step count, scores the images with every connected reward "
                "model, and shows a table (mean ± standard error over prompts) and a bar chart. Connect the "
                "same model with and without your LoRA to see what PSO changed at 1, 2 and 4 steps."
            ),
            inputs=[
                io.String.Input("prompts", multiline=True, default="a photo of a red fox in the snow\n"
                                "a lighthouse on a cliff at dusk, oil painting", tooltip=(
                                    "One prompt per line; each is sampled once per model and step count.")),
                io.Clip.Input("clip", tooltip="Text encoder for the prompts (shared by every model)."),
                io.Vae.Input("vae", tooltip="VAE that decodes the samples for the reward models."),
                io.Sampler.Input("sampler", tooltip="The sampler you run the models with: lcm (DMD2, LCM), "
                                 "euler_ancestral (Turbo) or euler (Lightning, Hyper, schnell)."),
                io.Combo.Input("schedule", options=schedule_names(), default="trailing", tooltip=(
                    "How sigmas are made for each step count: "
                    + "; ".join(f"{k}: {v[1]}" for k, v in evaluation.STEP_SCHEDULES.items())
                    + "; or any ComfyUI scheduler (simple for FLUX.1-schnell). Ignored when sigmas is "
                    "connected.")),
                io.String.Input("steps", default="1,2,4",
                                tooltip="Step counts to evaluate, comma-separated."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Prompt i uses seed + i in every model and step count."),
                io.Int.Input("width", default=512, min=16, max=4096, step=16,
                             tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=16, max=4096, step=16,
                             tooltip="Image height in pixels."),
                *models[:2],
                REWARD_TYPE.Input("reward_1", tooltip="Reward model 1 (PSO Reward Model Loader)."),
                *models[2:],
                *rewards_opt,
                io.Sigmas.Input("sigmas", optional=True, tooltip=(
                    "Optional exact SIGMAS (e.g. PSO Few-Step Sigmas): evaluates this one schedule instead "
                    "of "
                    "schedule x steps.")),
                io.Combo.Input("preset", options=list(PRESETS), default="custom", optional=True,
                               tooltip="; ".join(f"{k}: {v}" for k, v in PRESETS.items())),
                io.String.Input("prompt_file", default="", optional=True, tooltip=(
                    "Optional prompt list in ComfyUI's input folder instead of the prompts box: the "
                    "Pick-a-Pic v2 test parquet (caption column; its unique captions), PartiPrompts.tsv "
                    "(Prompt column) or a .txt with one prompt per line. Never downloaded.")),
                io.Int.Input("prompt_limit", default=0, min=0, max=100_000, optional=True, tooltip=(
                    "Use the first N prompts of the prompt file (0 = all; the paper: 500 Pick-a-Pic test "
                    "prompts, 1632 PartiPrompts).")),
            ],
            outputs=[
                io.String.Output(display_name="table", tooltip="Markdown table: mean ± standard error per "
                                 "model, step count and reward."),
                io.Image.Output(display_name="chart",
                                tooltip="Bar chart of the table, one panel per reward."),
                io.Image.Output(display_name="images", tooltip="Every sample, ordered model, step count, "
                                "prompt."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, prompts, clip, vae, sampler, schedule, steps, seed, width, height, model_1, label_1,
                reward_1, model_2=None, label_2="model 2", model_3=None, label_3="model 3", model_4=None,
                label_4="model 4", reward_2=None, reward_3=None, reward_4=None, sigmas=None, preset="custom",
                prompt_file="", prompt_limit=0) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        if preset not in PRESETS:
            raise ValueError(f"PSO Evaluate: preset {preset!r} is unknown; choose one of {list(PRESETS)}")
        prompt_list = (read_prompt_file(prompt_file, prompt_limit) if (prompt_file or "").strip()
                       else evaluation.parse_prompts(prompts))
        if sigmas is not None:
            step_list = [int(sigmas.numel()) - 1]
        else:
            step_list = [1, 4] if preset == "paper" else evaluation.parse_steps(steps)
        if width % 8 or height % 8:
            raise ValueError(f"PSO Evaluate: {width}x{height} is not a multiple of 8 (the VAE's factor)")
        labelled = [(lab, m) for lab, m in ((label_1, model_1), (label_2, model_2), (label_3, model_3),
                                           (label_4, model_4)) if m is not None]
        names = [lab.strip() or f"model {i + 1}" for i, (lab, _) in enumerate(labelled)]
        if len(set(names)) != len(names):
            raise ValueError(f"PSO Evaluate: model labels must differ, got {names}")
        rewards_ = [r for r in (reward_1, reward_2, reward_3, reward_4) if r is not None]
        columns = []
        for r in rewards_:  # one column per connected reward, even if two share a name
            columns.append(r.name if r.name not in columns else f"{r.name} ({len(columns) + 1})")
        conds = [pairing.encode_prompt(clip, p) for p in prompt_list]
        pbar = comfy.utils.ProgressBar(len(labelled) * len(step_list) * len(prompt_list))
        done = [0]

        def on_image():
            done[0] += 1
            pbar.update_absolute(done[0])
            comfy.model_management.throw_exception_if_processing_interrupted()

        kinds = [getattr(r, "kind", None) for r in rewards_]
        by_kind = kinds if None not in kinds and len(set(kinds)) == len(kinds) else columns
        result, paper, all_images = evaluation.EvalScores(), evaluation.EvalScores(), []
        for name, (_, model) in zip(names, labelled, strict=True):
            for n in step_list:
                sig = sigmas.float().cpu() if sigmas is not None else sigmas_for(model, schedule, n)
                images = sample_images(model, vae, conds, sampler, sig, width, height, seed, on_image)
                all_images.append(images)
                for k, scores in enumerate(score_all(rewards_, images, prompt_list)):
                    result.add(name, n, columns[k], scores)
                    paper.add(name, n, by_kind[k], scores)
        table = result.markdown() if preset == "custom" else paper_tables(paper, names, seed)
        logger.info("PSO Evaluate (%d prompts, seed %d):\n%s", len(prompt_list), seed, table)
        return io.NodeOutput(table, bar_chart(result), torch.cat(all_images), ui={"text": [table]})
