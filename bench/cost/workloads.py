"""The measured workloads, each the project's (or the host's) real code path, timed per step.

Training steps (all on the same two latents, the same prompt, the same LoRA rank and layers, the
same dtype, a batch of two images):

- ``pso``: one offline-PSO pair step (Eq. 6) through :func:`nodes.host_training.train_on_host`, as
  the PSO Train node runs it: target = image 0, reference = image 1, one training level per pair
  (``transitions="one"``), model with gradients on both images, frozen model (adapter disabled,
  no grad) on both images, AdamW;
- ``sft``: one plain-SFT step through the same function: both images as targets, one level each;
- ``native``: one step of ComfyUI's own "Train LoRA" node (``TrainLoraNode.execute``, batch size 2).

Each run trains ``warmup + steps`` optimizer steps in one call and time-stamps every step from
inside the loop (the trainer's step event for ours; the start of ``TrainSampler.fwd_bwd`` for the
native node, through a subclass that only records ``time.perf_counter()``), so set-up costs (LoRA
creation, model loading) are outside the measured intervals. The interval between two stamps is one
full step: data, forward, backward, optimizer step, bookkeeping.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .host import Setup

#: pso: one pair, one transition, references fixed (the loss alone); pso_default: the PSO Train
#: node's defaults (every transition, the pair's reference re-sampled from the current model before
#: every step, reference_refresh_every 1); sft: both images as targets; native: ComfyUI's Train LoRA;
#: online / online_first: PSO Online Train's loss on one pair of trajectories sampled through the host
#: once (the round's sampling is not timed), with first_step_weight 0 (the default) / the suggested value.
TRAIN_KINDS = ("pso", "pso_default", "sft", "native", "online", "online_first")


@dataclass(frozen=True)
class TrainOptions:
    """What every training workload shares."""

    rank: int = 8
    target: str = "all"  # pso.lora.TARGETS key; "all" = every Linear/Conv2d, as the native node adapts
    lr: float = 1e-4
    device: str = "cpu"
    gradient_checkpointing: bool = False
    bf16: bool = False

    @property
    def native_dtype(self) -> str:
        return "bf16" if self.bf16 else "fp32"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def intervals(stamps: list[float], warmup: int) -> list[float]:
    """Durations between consecutive stamps, dropping the first ``warmup`` of them."""
    d = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return d[warmup:]


def _host_run(
    h: SimpleNamespace, s: Setup, kind: str, steps: int, opts: TrainOptions, on_step: Callable[[], None]
):
    """A HostRun of ``steps`` steps of PSO (one pair) or SFT (both images as targets)."""
    device = h.mm.get_torch_device()
    lat = s.latents.to(device)
    refresh_fn = None
    ema_decay = 0.0
    if kind == "pso":
        method = h.methods.MethodConfig("pso_offline", transitions="one")
        batch = h.methods.PairBatch(target=lat[:1], reference=lat[1:], cond=torch.zeros(1, dtype=torch.long))
    elif kind == "pso_default":
        # PSO Train's defaults as the node builds them: its loss settings (beta, reduction, the target
        # anchor and its levels), step-count mixing ('auto'), fresh references, the moving average
        d = h.training_run.TrainSettings()
        method = d.method_config()
        ema_decay = d.ema_decay
        counts = h.training_run.mixed_step_counts(d, SimpleNamespace(sigmas=s.sigmas))
        pool = h.references.ReferencePool(lat[1:].clone(), torch.zeros(1, dtype=torch.long), s.sigmas,
                                          "renoise", s.model.get_model_object("model_sampling"))
        subs = [h.training_run.sub_schedule(s.sigmas, k) for k in counts]
        source = h.batches.PairBatchSource(pool, lat[:1], 1, max_age=d.reference_refresh_every, device=device,
                                           sub_schedules=subs)

        def refresh_fn(denoiser, step, generator):
            source.prepare(denoiser, step, generator)

        batch = None
    elif kind in ("online", "online_first"):
        d = h.online_settings.OnlineSettings(
            first_step_weight=h.online_settings.FIRST_STEP_SUGGESTED if kind == "online_first" else 0.0)
        method = d.method_config()
        sampler, latent = sampling_inputs(h, s)
        with torch.inference_mode():
            traj, _ = h.host_sampling.sample_trajectories(s.model, s.positive, None, 1.0, sampler, s.sigmas,
                                                          latent, 3)
        trajs = traj.to(device)
        batch = h.methods.PairBatch(target_traj=trajs.select(torch.arange(1)),
                                    reference_traj=trajs.select(torch.arange(1, 2)),
                                    cond=torch.zeros(1, dtype=torch.long))
    elif kind == "sft":
        method = h.methods.MethodConfig("sft")
        batch = h.methods.PairBatch(target=lat, cond=torch.zeros(2, dtype=torch.long))
    else:
        raise ValueError(f"kind {kind!r} is not trained through train_on_host (pso, sft)")

    def callback(event, denoiser) -> None:
        if event.phase == "step":
            _sync(opts.device)
            on_step()

    setup = None
    if opts.gradient_checkpointing:

        def setup(clone):
            return h.lora.enable_gradient_checkpointing(
                clone.get_model_object("diffusion_model"), h.training_run.checkpoint_predicate
            )

    cfg = h.trainer.TrainConfig(
        steps=steps, lr=opts.lr, seed=1, mixed_precision="bf16" if opts.bf16 else "no",
        ref_refresh_every=1 if refresh_fn else 0,
        ema_decay=ema_decay,
    )
    return h.host_training.HostRun(
        method=method,
        train_config=cfg,
        sigmas=s.sigmas,
        batch_source=(lambda step, gen: batch) if batch is not None else source,
        callback=callback,
        refresh_fn=refresh_fn,
        setup=setup,
    )


def train_ours(h: SimpleNamespace, s: Setup, kind: str, steps: int, opts: TrainOptions) -> list[float]:
    """Time stamps (s) at the end of each of ``steps`` PSO / SFT steps through train_on_host."""
    stamps: list[float] = []
    _sync(opts.device)
    stamps.append(time.perf_counter())
    run = _host_run(h, s, kind, steps, opts, lambda: stamps.append(time.perf_counter()))
    lora_cfg = h.lora.LoRAConfig(rank=opts.rank, target=opts.target)
    with torch.inference_mode():  # ComfyUI runs every node under inference mode
        h.host_training.train_on_host(
            s.model, [s.positive], tuple(s.latents.shape[1:]), run, lora_cfg, seed=2
        )
    return stamps[1:]  # the first stamp is before set-up


@contextlib.contextmanager
def _timed_native_sampler(nodes_train, stamps: list[float], device: str):
    """Let TrainLoraNode build a TrainSampler subclass that records when each step's fwd_bwd starts."""
    original = nodes_train.TrainSampler

    class TimedTrainSampler(original):
        def fwd_bwd(self, *args, **kwargs):
            _sync(device)
            stamps.append(time.perf_counter())
            return super().fwd_bwd(*args, **kwargs)

    nodes_train.TrainSampler = TimedTrainSampler
    try:
        yield
    finally:
        nodes_train.TrainSampler = original


def train_native(h: SimpleNamespace, s: Setup, steps: int, opts: TrainOptions) -> list[float]:
    """Time stamps (s) at the start of each of ``steps`` steps of ComfyUI's TrainLoraNode."""
    stamps: list[float] = []
    node = h.nodes_train.TrainLoraNode
    # Two LATENT inputs of one image each (a single LATENT input hits 0.3.75's UnboundLocalError).
    latents = [{"samples": s.latents[i : i + 1].clone()} for i in range(2)]
    dt = opts.native_dtype
    inputs = dict(
        model=[s.model],
        latents=latents,
        positive=[s.positive],
        batch_size=[2],
        steps=[steps],
        grad_accumulation_steps=[1],
        learning_rate=[opts.lr],
        rank=[opts.rank],
        optimizer=["AdamW"],
        loss_function=["MSE"],
        seed=[0],
        training_dtype=[dt],
        lora_dtype=["fp32"],
        algorithm=["LoRA"],
        gradient_checkpointing=[opts.gradient_checkpointing],
        existing_lora=["[None]"],
    )
    # Inputs later hosts added (ComfyUI 0.33: quantized_backward, checkpoint_depth, offloading,
    # bucket_mode, bypass_mode) get the default the host's own schema declares, as a new node would.
    for inp in node.define_schema().inputs:
        if inp.id not in inputs and getattr(inp, "default", None) is not None:
            inputs[inp.id] = [inp.default]
    with _timed_native_sampler(h.nodes_train, stamps, opts.device), torch.inference_mode():
        node.execute(**inputs)
    return stamps


def step_seconds(
    h: SimpleNamespace, s: Setup, kind: str, steps: int, warmup: int, opts: TrainOptions
) -> list[float]:
    """Seconds of each of ``steps`` measured steps, after ``warmup + 1`` unmeasured ones.

    Both stamp kinds cover the same steps: ``warmup + 2 .. warmup + steps + 1`` of the run (our
    stamps are step ends, so the first step has no start stamp; the native ones are step starts).
    """
    if kind == "native":
        stamps = train_native(h, s, warmup + steps + 2, opts)
        return intervals(stamps, warmup + 1)[:steps]
    stamps = train_ours(h, s, kind, warmup + steps + 1, opts)
    return intervals(stamps, warmup)[:steps]


# --------------------------------------------------------------------------------------------
# Sampling: trajectory capture vs the host's plain sampler
# --------------------------------------------------------------------------------------------


def sampling_inputs(h: SimpleNamespace, s: Setup, batch: int = 2):
    """SAMPLER (lcm, DMD2's sampler) and an empty LATENT of ``batch`` images, made as nodes make them."""
    with torch.inference_mode():
        sampler = h.ncs.KSamplerSelect.execute("lcm")[0]
        latent = {"samples": torch.zeros(batch, *s.latents.shape[1:])}
    return sampler, latent


def sample_capture(h: SimpleNamespace, s: Setup, sampler, latent, seed: int) -> None:
    """PSO's reference sampling: the host's sampler with every step recorded as a Trajectory."""
    with torch.inference_mode():
        h.host_sampling.sample_trajectories(s.model, s.positive, None, 1.0, sampler, s.sigmas, latent, seed)


def sample_plain(h: SimpleNamespace, s: Setup, sampler, latent, seed: int) -> None:
    """The same sampling with the host's own nodes: RandomNoise, BasicGuider, SamplerCustomAdvanced."""
    ncs = h.ncs
    with torch.inference_mode():
        noise = ncs.RandomNoise.execute(seed)[0]
        guider = ncs.BasicGuider.execute(s.model, s.positive)[0]
        ncs.SamplerCustomAdvanced.execute(noise, guider, sampler, s.sigmas, latent)


def call_seconds(fn: Callable[[], None], calls: int, device: str) -> float:
    """Median seconds of ``calls`` calls of ``fn``."""
    times = []
    for _ in range(calls):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
