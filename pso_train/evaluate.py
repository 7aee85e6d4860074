"""``pso-eval``: the paper's evaluation protocol (:mod:`pso.eval_protocol`) on a diffusers model.

    pso-eval --model sdxl-dmd2/ --lora pso=out/pso_lora_00001.safetensors \\
        --prompts pickapic_test=test-00000-of-00001.parquet --prompts parti=PartiPrompts.tsv \\
        --reward pickscore=rewards/PickScore_v1 --reward clip_score=rewards/open_clip_model.safetensors \\
        --reward image_reward=rewards/ImageReward.pt \\
        --reward aesthetic=rewards/clip-vit-large-patch14,rewards/sac+logos+ava1-l14-linearMSE.pth \\
        --steps 1,4 --schedule trailing --sampler renoise --size 1024 --out eval/dmd2_pso

Every model (``base``, the model without a LoRA, and each ``--lora NAME=FILE``) samples prompt i of
every set with noise seed ``seed + i`` (ComfyUI's RandomNoise for a one-image batch; per-step noise
from a generator seeded the same way, one per image, so batching does not change an image) at each
step count, through the same denoiser convention the headless trainer uses; the VAE decodes as
ComfyUI does (``latent / scaling_factor``), and every reward scores the images. LoRA files are read
with diffusers' own LoRA loader (``lora_state_dict`` + ``load_lora_adapter``), which also checks that
the file loads in that common tool. The output folder gets ``table1.md`` / ``table1.csv`` (the paper's
Table 1 shape), ``scores.csv`` (every per-prompt score) and, with two or more models,
``comparison.md`` / ``comparison.csv`` (win rate of each LoRA over ``base`` with a bootstrap
interval). Files are never overwritten: the folder must be new or empty.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pso import eval_protocol, evaluation
from pso import io as pso_io
from pso.rewards import load_reward
from pso.samplers import POLICIES, initial_latent, sample_trajectory
from pso.schedules import few_step_sigmas

from .model import DiffusersDenoiser, LoadedModel, load_model, require

logger = logging.getLogger(__name__)

BASE = "base"


@dataclass(frozen=True)
class ModelSpec:
    """What :func:`pso_train.model.load_model` reads (a subset of the training config)."""

    model: str
    model_config: str | None = None
    family: str = "auto"
    prediction: str = "auto"


def per_image_noise_sampler(x: torch.Tensor, seeds: list[int]):
    """Step noise drawn per image from its own generator (seeded with its prompt's seed), so an image
    does not depend on the other images of its batch. Shapes: x (B, ...) -> draws (B, ...)."""
    gens = [torch.Generator(device=x.device).manual_seed(int(s)) for s in seeds]
    row = (1, *x.shape[1:])

    def draw(sigma, sigma_next) -> torch.Tensor:
        return torch.cat([torch.randn(row, dtype=x.dtype, device=x.device, generator=g) for g in gens])

    return draw


def load_vae(spec: ModelSpec, vae_path: str | None, device: torch.device):
    """diffusers AutoencoderKL: ``vae_path`` (a diffusers VAE folder) if given, else the model's own
    (``vae/`` of the diffusers folder, or of ``model_config`` beside a single-file checkpoint)."""
    diffusers = require("diffusers", "pso-eval")
    if vae_path:
        vae = diffusers.AutoencoderKL.from_pretrained(vae_path, local_files_only=True)
    elif Path(spec.model).is_dir():
        vae = diffusers.AutoencoderKL.from_pretrained(spec.model, subfolder="vae", local_files_only=True)
    else:
        vae = diffusers.AutoencoderKL.from_single_file(spec.model, config=spec.model_config, subfolder="vae",
                                                       local_files_only=True)
    return vae.requires_grad_(False).eval().to(device)


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Inner-space latents (B, C, h, w) -> IMAGE (B, H, W, 3) in [0, 1], as ComfyUI's VAE Decode."""
    with torch.no_grad():
        pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return ((pixels.float() + 1) / 2).clamp(0, 1).movedim(1, -1).cpu()


class Sampler:
    """``sample(model_name, prompts, seeds, steps) -> IMAGE``: base or a LoRA, at a step count."""

    def __init__(self, loaded: LoadedModel, vae, loras: dict[str, str], schedule: str, policy: str,
                 size: tuple[int, int], device: torch.device) -> None:
        diffusers = require("diffusers", "pso-eval")
        self.loaded, self.vae, self.schedule, self.policy, self.device = loaded, vae, schedule, policy, device
        self.size = size
        self.names = [BASE, *loras]
        for name, path in loras.items():
            state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(path))
            loaded.unet.load_lora_adapter(state, network_alphas=alphas, prefix="unet", adapter_name=name)
            logger.info("pso-eval: LoRA %s loaded from %s (%d tensors)", name, path, len(state))
        self.denoiser = DiffusersDenoiser(loaded.unet, loaded.schedule)
        self.latent_channels = int(loaded.unet.config.in_channels)

    def _select(self, name: str) -> None:
        unet = self.loaded.unet
        if len(self.names) == 1:
            return
        if name == BASE:
            unet.disable_adapters()
        else:
            unet.enable_adapters()
            unet.set_adapters(name)

    def __call__(self, name: str, prompts: list[str], seeds: list[int], steps: int) -> torch.Tensor:
        self._select(name)
        ms = self.loaded.schedule
        sigmas = few_step_sigmas(ms, evaluation.step_timesteps(self.schedule, steps)).to(self.device)
        h, w = self.size
        shape = (1, self.latent_channels, h // 8, w // 8)
        noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
                           for s in seeds])
        noise = noise.to(self.device)
        x = initial_latent(ms, sigmas, noise)
        self.denoiser.encoded = self.loaded.text.encode(list(prompts))
        cond = torch.arange(len(prompts), device=self.device)
        traj = sample_trajectory(self.denoiser, x, sigmas, cond, ms, self.policy, None, grad=False,
                                 noise_sampler=per_image_noise_sampler(x, seeds))
        return decode(self.vae, traj.final)


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"pso-eval: {what} needs NAME=PATH, got {item!r}")
        if name in out or name == BASE and what == "--lora":
            raise SystemExit(f"pso-eval: {what} name {name!r} is given twice (or is the reserved 'base')")
        out[name] = path
    return out


def _check_out(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise SystemExit(f"pso-eval: output folder {folder} exists and is not empty; results are never "
                         "overwritten, choose a new folder")


def _write(folder: Path, name: str, text: str) -> None:
    pso_io.atomic_write_bytes(folder / name, text.encode("utf-8"))


def _comparison_csv(rows, model_a: str, model_b: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model_a", "model_b", "dataset", "steps", "reward", "win_rate", "low", "high", "wins", "ties",
                "losses", "mean_diff", "prompts", "confidence"])
    for set_name, n, k, c in rows:
        w.writerow([model_a, model_b, set_name, n, k, c.win_rate, c.low, c.high, c.wins, c.ties, c.losses,
                    c.mean_diff, c.n, c.confidence])
    return buf.getvalue()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pso-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a diffusers folder or a single-file .safetensors checkpoint")
    p.add_argument("--model-config", help="for a single file: a local diffusers folder of the same family "
                                          "(configs, tokenizers, vae/config.json)")
    p.add_argument("--vae", help="a diffusers VAE folder to use instead of the model's own")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=FILE",
                   help="a LoRA to evaluate against the base model; repeatable")
    p.add_argument("--prompts", action="append", required=True, metavar="NAME=FILE",
                   help="a prompt set: Pick-a-Pic parquet (caption), PartiPrompts .tsv (Prompt) or .txt; "
                        "repeatable")
    p.add_argument("--limit", type=int, default=0, help="first N unique prompts of each set (0 = all)")
    p.add_argument("--reward", action="append", required=True, metavar="KIND=PATH[,HEAD]",
                   help="a reward model from local files; kinds as pso.rewards ("
                        f"{', '.join(eval_protocol.TABLE1_REWARDS)} are the paper's four); aesthetic takes "
                        "its head after a comma")
    p.add_argument("--tokenizer-fallback", help="CLIP vocab.json + merges.txt folder for a transformers "
                                                "reward folder without tokenizer files (PickScore)")
    p.add_argument("--steps", default="1,4", help="step counts (default 1,4 as the paper)")
    p.add_argument("--schedule", default="trailing", choices=sorted(evaluation.STEP_SCHEDULES),
                   help="timestep set per step count (trailing: DMD2; lcm; turbo)")
    p.add_argument("--sampler", default="renoise", choices=sorted(POLICIES),
                   help="step policy: renoise = ComfyUI's lcm (DMD2, LCM), euler_ancestral (Turbo)")
    p.add_argument("--size", type=int, nargs="+", default=[1024], help="image size: S or H W (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses noise seed seed + i (default 0)")
    p.add_argument("--batch-size", type=int, default=4, help="images sampled and scored together")
    p.add_argument("--bootstrap", type=int, default=2000,
                   help="bootstrap resamples for the win-rate interval")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="a new (or empty) output folder")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = Path(args.out)
    _check_out(out)
    loras, sets = _pairs(args.lora, "--lora"), _pairs(args.prompts, "--prompts")
    reward_paths = _pairs(args.reward, "--reward")
    steps = evaluation.parse_steps(args.steps)
    size = tuple(args.size * 2 if len(args.size) == 1 else args.size[:2])
    if any(s % 8 for s in size):
        raise SystemExit(f"pso-eval: --size {list(size)} must be multiples of 8 (the VAE's factor)")
    prompt_sets = {name: eval_protocol.read_prompts(path, args.limit) for name, path in sets.items()}
    device = torch.device(args.device)
    rewards = {}
    for kind, spec in reward_paths.items():
        path, _, head = spec.partition(",")
        rewards[kind] = load_reward(kind, path, head or None, device=device, batch_size=args.batch_size,
                                    tokenizer_fallback=args.tokenizer_fallback)
    model = ModelSpec(args.model, args.model_config)
    loaded = load_model(model, device, size)
    sampler = Sampler(loaded, load_vae(model, args.vae, device), loras, args.schedule, args.sampler, size,
                      device)

    def progress(done: int, total: int) -> None:
        logger.info("pso-eval: batch %d / %d", done, total)

    results = eval_protocol.run_protocol(sampler.names, prompt_sets, steps, rewards, sampler, args.seed,
                                         args.batch_size, progress)
    out.mkdir(parents=True, exist_ok=True)
    _write(out, "table1.md", eval_protocol.table1_markdown(results) + "\n")
    _write(out, "table1.csv", eval_protocol.table1_csv(results))
    _write(out, "scores.csv", eval_protocol.scores_csv(results, prompt_sets, args.seed))
    md, rows_csv = [], []
    for name in loras:
        rows = eval_protocol.comparisons(results, name, BASE, args.bootstrap, args.seed)
        md.append(eval_protocol.comparison_markdown(rows, name, BASE))
        rows_csv.append(_comparison_csv(rows, name, BASE))
    if loras:
        _write(out, "comparison.md", "\n\n".join(md) + "\n")
        _write(out, "comparison.csv", rows_csv[0] + "".join(r.split("\n", 1)[1] for r in rows_csv[1:]))
    settings = {"model": args.model, "loras": loras, "prompt_sets": sets, "prompts": {k: len(v) for k, v in
                prompt_sets.items()}, "rewards": reward_paths, "steps": steps, "schedule": args.schedule,
                "sampler": args.sampler, "size": list(size), "seed": args.seed, "bootstrap": args.bootstrap}
    pso_io.atomic_write_json(out / "settings.json", settings)
    print(eval_protocol.table1_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
