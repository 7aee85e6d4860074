"""Train a shipped demo model (``demo_model/pso_demo_<task>.safetensors``) from scratch.

Usage: ``python -m tools.train_demo_model [--task digits|shapes] [--out FILE] [--scale 1.0]`` (about
30 minutes each on one CPU thread; ``--scale 0.02`` runs a short prefix of every stage, which the
tests use).

Data, ``digits``: scikit-learn's digits (1437 training images of the 80/20 split of
``bench.digits.data``), 8x8 grey rendered as 32x32 RGB (bilinear up-sampling, white ink on black),
captioned ``"a handwritten digit <d>"``. ``shapes``: ``bench.digits.shapes``' coloured shapes (4
shapes x 6 colours, 160 training drawings each, hard edges), drawn at 16 px and shown at 32 px (each
pixel 2x2), captioned ``"a red circle"``; its VAE also learns the striped and outlined versions of the
same drawings (:func:`shapes_data`), its diffusion model only the plain ones. Stages, all through the
host's classes built by
``nodes/demo_model.py``, with fixed seeds and ``torch.set_num_threads(1)``:

1. **VAE**: the TAESD-shaped autoencoder (4x4x4 latents) trained on reconstruction error, then
   ``vae_scale`` / ``vae_shift`` set so that the UNet's input (the latent times SD1.5's 0.18215)
   has zero mean and unit variance over the data.
2. **Text encoder**: ComfyUI's SD1 CLIP, shrunken, with seeded random weights, kept frozen (rounded to
   fp16 first, as shipped); its outputs for the captions and the empty prompt are the UNet's
   cross-attention context. The UNet learns to read them; nothing in the encoder needs training for
   a few fixed captions.
3. **Teacher**: the SD1.5-class UNet trained with the DDPM eps objective (``bench.digits.teacher``
   recipe: SD's scaled-linear schedule, captions dropped to the empty prompt 10% of the time, EMA).
4. **4-step student**: ODE-trajectory distillation of the guided teacher onto DMD2's timesteps
   999/749/499/249 for the re-noising (``lcm``) sampler, as ``bench.digits.distill`` explains.

The file stores fp16 weights (``model.diffusion_model.*``, ``clip.*``, ``vae.*``) and, in its
metadata, the settings, per-stage losses and wall times.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bench.digits.data import load_splits
from bench.digits.model import make_schedule
from bench.digits.sampling import STUDENT_TIMESTEPS, teacher_timesteps
from bench.digits.teacher import cosine_lr
from pso.samplers import initial_latent, sample_trajectory
from pso.schedules import few_step_sigmas
from tools.comfy_host import REPO_ROOT, host_sys_path

#: SD1.5's latent scale factor (``comfy.latent_formats.SD15``): the UNet sees latents times this.
SD15_SCALE = 0.18215


@dataclass(frozen=True)
class DemoTrainConfig:
    vae_steps: int = 200
    vae_batch: int = 16
    vae_lr: float = 2e-3
    teacher_steps: int = 1500
    teacher_batch: int = 64
    teacher_lr: float = 1.5e-3
    teacher_ema: float = 0.99
    cond_drop: float = 0.1
    guidance: float = 1.5
    trajectories: int = 1024
    steps_per_segment: int = 5
    distill_steps: int = 800
    distill_batch: int = 64
    distill_lr: float = 5e-4
    weight_power: float = 0.5
    seed: int = 0
    #: "digits" (the first demo model) or "shapes" (coloured shapes, :func:`shapes_data`).
    task: str = "digits"

    def scaled(self, scale: float) -> DemoTrainConfig:
        """Every step count times ``scale`` (at least 2): a short prefix of the same run."""
        n = lambda v: max(2, int(round(v * scale)))  # noqa: E731
        return replace(self, vae_steps=n(self.vae_steps), teacher_steps=n(self.teacher_steps),
                       trajectories=max(16, int(round(self.trajectories * scale))),
                       distill_steps=n(self.distill_steps))


#: The shapes model's budget: 24 captions with colour take a longer teacher and more trajectories; its
#: VAE must draw colours and a stripe texture: at the digits' lr (2e-3) it mixed the colours (red,
#: green and yellow decoded as one orange; colour error 0.18 vs 0.012 at 5e-4 after 400 steps).
SHAPES_CONFIG = DemoTrainConfig(task="shapes", vae_steps=1500, vae_lr=5e-4, teacher_steps=4000,
                                trajectories=2048, distill_steps=1500)
TASK_CONFIGS = {"digits": DemoTrainConfig(), "shapes": SHAPES_CONFIG}


@functools.lru_cache(maxsize=1)
def load_demo_module():
    """``nodes/demo_model.py`` loaded by file path (the ``nodes`` package needs a running host)."""
    for entry in reversed(host_sys_path()):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    spec = importlib.util.spec_from_file_location("pso_demo_model", REPO_ROOT / "nodes" / "demo_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(x8: torch.Tensor) -> torch.Tensor:
    """8x8 digits in [-1, 1] -> 32x32 RGB in [0, 1]. Shapes: (N, 1, 8, 8) -> (N, 3, 32, 32)."""
    up = torch.nn.functional.interpolate((x8 + 1) / 2, size=(32, 32), mode="bilinear", align_corners=False)
    return up.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()


def render_shapes(x16: torch.Tensor) -> torch.Tensor:
    """16x16 shapes in [-1, 1] -> 32x32 RGB in [0, 1], each pixel drawn as 2x2 (edges stay hard).

    Shapes: (N, 3, 16, 16) -> (N, 3, 32, 32).
    """
    up = torch.nn.functional.interpolate((x16 + 1) / 2, scale_factor=2, mode="nearest")
    return up.clamp(0, 1).contiguous()


def captions(task: str, dm=None) -> list[str]:
    """The captions a demo model is trained on, class by class (class c is caption c); ``dm``: the
    already loaded ``nodes/demo_model.py`` (loaded here if None)."""
    dm = dm if dm is not None else load_demo_module()
    if task == "digits":
        return [dm.prompt(d) for d in range(10)]
    from bench.digits import shapes

    return [dm.shape_prompt(*c.split()) for c in shapes.CAPTIONS]


def shapes_data(dm) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """The shapes model's data: ``bench.digits.shapes`` (4 shapes x 6 colours, 160 training drawings
    each), rendered at 32 px. Returns (teacher images, labels, captions, VAE images).

    The teacher learns the plain shapes only. The VAE, like a real model's VAE that encodes any image,
    learns plain, striped and outlined drawings (the same drawings in three styles), so a style a
    fine-tune reaches can be decoded; the diffusion model never sees a style before fine-tuning.
    """
    from bench.digits import shapes

    plain = shapes.load_splits("striped_fixed", seed=0)
    outlined = shapes.load_splits("outlined", seed=0)
    images = render_shapes(plain.base_train_x)
    styled = [render_shapes(plain.target_train_x), render_shapes(outlined.target_train_x)]
    vae_images = torch.cat([images, *styled])
    return images, plain.base_train_y, captions("shapes", dm), vae_images


def digits_data(dm) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """The digits model's data (sklearn's digits, 32 px): (images, labels, captions, VAE images)."""
    splits = load_splits("bold", seed=0)
    images = render(splits.base_train_x)
    return images, splits.base_train_y, captions("digits", dm), images


def train_vae(taesd, images: torch.Tensor, cfg: DemoTrainConfig, log: list) -> None:
    """Reconstruction training of the TAESD module in place. Shapes: images (N, 3, 32, 32) in [0, 1]."""
    gen = torch.Generator().manual_seed(cfg.seed + 10)
    taesd.train().requires_grad_(True)
    params = [*taesd.taesd_encoder.parameters(), *taesd.taesd_decoder.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.vae_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.vae_steps, warmup=20))
    for step in range(cfg.vae_steps):
        x = images[torch.randint(0, images.shape[0], (cfg.vae_batch,), generator=gen)]
        e = taesd.taesd_encoder(x)
        e = e + 0.05 * torch.randn(e.shape, generator=gen)  # a decoder that tolerates imperfect latents
        loss = (taesd.taesd_decoder(e) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == cfg.vae_steps - 1:
            log.append(float(loss.detach()))
            print(f"[vae] step {step} loss {log[-1]:.5f}", flush=True)
    taesd.eval().requires_grad_(False)
    with torch.no_grad():
        e = torch.cat([taesd.taesd_encoder(c) for c in images.split(256)])
        scale = SD15_SCALE * e.std()
        taesd.vae_scale.fill_(float(scale))
        taesd.vae_shift.fill_(float(-e.mean() / scale))


class UNetDenoiser:
    """``denoiser(x, sigma, cond) -> x0`` over the comfy UNet, with ComfyUI's EPS arithmetic.

    ``cond`` indexes ``contexts`` (N_prompts, 77, 32); index ``uncond`` is the empty prompt, used for
    classifier-free guidance when ``guidance != 1``. Shapes: x (B, 4, 4, 4), sigma (B,), cond (B,).
    """

    def __init__(self, unet, model_sampling, contexts, uncond: int, guidance: float = 1.0) -> None:
        self.unet, self.ms, self.contexts = unet, model_sampling, contexts
        self.uncond, self.guidance = uncond, guidance

    def eps(self, x, sigma, cond):
        x_in = self.ms.calculate_input(sigma, x)
        t = self.ms.timestep(sigma).float()
        if self.guidance == 1.0:
            return self.unet(x_in, t, context=self.contexts[cond])
        both = self.unet(torch.cat([x_in, x_in]), torch.cat([t, t]),
                         context=self.contexts[torch.cat([cond, torch.full_like(cond, self.uncond)])])
        eps_c, eps_u = both.chunk(2)
        return eps_u + self.guidance * (eps_c - eps_u)

    def __call__(self, x, sigma, cond):
        return self.ms.calculate_denoised(sigma, self.eps(x, sigma, cond), x)


def train_teacher(unet, latents, labels, contexts, ms, cfg: DemoTrainConfig, log: list):
    """DDPM eps training (``bench.digits.teacher`` recipe) of ``unet``; returns its EMA copy."""
    gen = torch.Generator().manual_seed(cfg.seed + 20)
    unet.train().requires_grad_(True)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.Adam(unet.parameters(), lr=cfg.teacher_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.teacher_steps))
    sigmas, uncond = ms.sigmas, contexts.shape[0] - 1
    for step in range(cfg.teacher_steps):
        idx = torch.randint(0, latents.shape[0], (cfg.teacher_batch,), generator=gen)
        x0, y = latents[idx], labels[idx].clone()
        y[torch.rand(cfg.teacher_batch, generator=gen) < cfg.cond_drop] = uncond
        t = torch.randint(0, sigmas.numel(), (cfg.teacher_batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = ms.noise_scaling(sigmas[t], noise, x0)
        eps = unet(ms.calculate_input(sigmas[t], x_t), t.float(), context=contexts[y])
        loss = (eps - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1.0 - cfg.teacher_ema)
        if step % 100 == 0 or step == cfg.teacher_steps - 1:
            log.append(float(loss.detach()))
            print(f"[teacher] step {step} loss {log[-1]:.4f}", flush=True)
    return ema.eval()


@torch.no_grad()
def ode_pairs(teacher: UNetDenoiser, ms, cfg: DemoTrainConfig, n_captions: int, chunk: int = 512):
    """The guided teacher's ODE (Euler = DDIM) through the student timesteps: (x_t, labels, x0, sigmas)."""
    gen = torch.Generator().manual_seed(cfg.seed + 30)
    anchors = STUDENT_TIMESTEPS[4]
    grid = teacher_timesteps(cfg.steps_per_segment, anchors)
    sig = few_step_sigmas(ms, grid)
    xs, x0s, ys = [], [], []
    for start in range(0, cfg.trajectories, chunk):
        n = min(chunk, cfg.trajectories - start)
        y = torch.arange(start, start + n) % n_captions
        x = initial_latent(ms, sig, torch.randn((n, 4, 4, 4), generator=gen), max_denoise=True)
        traj = sample_trajectory(teacher, x, sig, y, ms, "euler", None)
        xs.append(traj.latents[:, [grid.index(t) for t in anchors]])
        x0s.append(traj.final)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys), torch.cat(x0s), ms.sigma(torch.tensor(anchors))


def distill(teacher_unet, ms, contexts, cfg: DemoTrainConfig, log: list):
    """Student = teacher's copy trained to map each ODE latent to its trajectory's end (x0 error)."""
    uncond = contexts.shape[0] - 1
    teacher = UNetDenoiser(teacher_unet, ms, contexts, uncond, cfg.guidance)
    x_t, labels, x0, sigmas = ode_pairs(teacher, ms, cfg, uncond)
    gen = torch.Generator().manual_seed(cfg.seed + 40)
    unet = copy.deepcopy(teacher_unet).train().requires_grad_(True)
    student = UNetDenoiser(unet, ms, contexts, uncond)
    opt = torch.optim.Adam(unet.parameters(), lr=cfg.distill_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.distill_steps))
    weights = 1.0 / (sigmas**2 + 1.0) ** (cfg.weight_power / 2)
    m, k = x_t.shape[:2]
    for step in range(cfg.distill_steps):
        i = torch.randint(0, m, (cfg.distill_batch,), generator=gen)
        j = torch.randint(0, k, (cfg.distill_batch,), generator=gen)
        err = (student(x_t[i, j], sigmas[j], labels[i]) - x0[i]).pow(2).flatten(1).mean(dim=1)
        loss = (weights[j] * err).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.distill_steps - 1:
            log.append(float(loss.detach()))
            print(f"[distill] step {step} loss {log[-1]:.5f}", flush=True)
    return unet.eval().requires_grad_(False)


def train(cfg: DemoTrainConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """Run every stage; returns the fp16 state dict to save and the metadata record."""
    dm = load_demo_module()
    torch.manual_seed(cfg.seed)
    times, losses = {}, {"vae": [], "teacher": [], "distill": []}
    if cfg.task not in TASK_CONFIGS:
        raise ValueError(f"unknown demo task {cfg.task!r}; valid: {sorted(TASK_CONFIGS)}")
    data = shapes_data if cfg.task == "shapes" else digits_data
    images, labels, captions, vae_images = data(dm)

    t0 = time.monotonic()
    taesd = dm.build_taesd(seed=cfg.seed + 2)
    train_vae(taesd, vae_images, cfg, losses["vae"])
    times["vae_s"] = time.monotonic() - t0

    t0 = time.monotonic()
    clip = dm.build_clip(seed=cfg.seed + 1)
    with torch.no_grad():
        for p in clip.cond_stage_model.parameters():
            p.copy_(p.half().float())  # the context the UNet learns is the one the fp16 file gives
    contexts = torch.cat([clip.encode_from_tokens(clip.tokenize(c)) for c in [*captions, ""]]).float()
    with torch.no_grad():
        latents = torch.cat([(taesd.taesd_encoder(c) / taesd.vae_scale + taesd.vae_shift) * SD15_SCALE
                             for c in images.split(256)])
    ms = make_schedule()  # SD1.5's scaled-linear eps schedule, the one comfy's SD15 model_sampling uses
    unet = dm.build_model(seed=cfg.seed).model.diffusion_model
    teacher = train_teacher(unet, latents, labels, contexts, ms, cfg, losses["teacher"])
    times["teacher_s"] = time.monotonic() - t0

    t0 = time.monotonic()
    student = distill(teacher, ms, contexts, cfg, losses["distill"])
    times["distill_s"] = time.monotonic() - t0

    state = {f"model.diffusion_model.{k}": v for k, v in student.state_dict().items()}
    state |= {f"clip.{k}": v for k, v in clip.cond_stage_model.state_dict().items()}
    state |= {f"vae.{k}": v for k, v in taesd.state_dict().items()}
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    meta = {"config": asdict(cfg), "wall_time_s": {k: round(v, 1) for k, v in times.items()},
            "losses": losses, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "task": cfg.task, "captions": captions, "image_size": dm.IMAGE_SIZE, "sampler": "lcm",
            "sigmas": "PSOFewStepSigmas dmd2 (999/749/499/249)", "cfg": 1.0}
    return state, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASK_CONFIGS), default="digits",
                        help="digits (pso_demo_digits.safetensors) or shapes (pso_demo_shapes.safetensors)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: demo_model/pso_demo_<task>.safetensors")
    parser.add_argument("--scale", type=float, default=1.0, help="step counts times this (a short prefix)")
    args = parser.parse_args(argv)
    from pso.io import atomic_save_safetensors

    torch.set_num_threads(1)
    cfg = TASK_CONFIGS[args.task]
    cfg = cfg.scaled(args.scale) if args.scale != 1.0 else cfg
    if args.out is None:
        args.out = REPO_ROOT / "demo_model" / f"pso_demo_{args.task}.safetensors"
    t0 = time.monotonic()
    state, meta = train(cfg)
    meta["wall_time_s"]["total_s"] = round(time.monotonic() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(state, args.out, metadata={"pso_demo": json.dumps(meta), "format": "pt"})
    n = sum(v.numel() for v in state.values())
    print(f"[train_demo_model] {n / 1e6:.2f} M parameters, {args.out.stat().st_size / 1e6:.1f} MB -> "
          f"{args.out} in {meta['wall_time_s']['total_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
