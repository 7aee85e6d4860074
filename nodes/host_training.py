"""PSO training on the user's MODEL, with every prediction made by the host as their sampler makes it.

How the host is used (the same route as ComfyUI's native "Train LoRA" node):

- the user's MODEL is cloned, never modified; the LoRA is a :class:`pso.lora.LoRANetwork` attached
  with ``ModelPatcher.add_weight_wrapper`` (the host's own mechanism: it is applied wherever the
  host casts or offloads weights, and disappears with the clone);
- training runs inside a ``comfy.samplers.Sampler`` driven by a guider, so conditioning is
  processed by the host (SDXL size embeddings, LCM's distilled model sampling, CFG) and
  ``model_wrap(x, sigma, **extra_args)`` is exactly the x0 prediction the user's sampler uses;
- the frozen model is the same clone with the adapter disabled (no second copy of the weights).

Each pair's prompt is an index into the guider's conditioning list; a batch is evaluated prompt by
prompt (ComfyUI combines all entries of a conditioning list for every sample, so a mixed batch must
be split to give each sample its own prompt).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..pso import families, methods, trainer
from ..pso import lora as pso_lora

logger = logging.getLogger(__name__)

UNET_PREFIX = "diffusion_model."


def clone_tensors(obj: Any) -> Any:
    """Deep copy of the tensors inside conditioning structures, made outside inference mode.

    Nodes run under ``torch.inference_mode()``; tensors created there cannot be saved for backward,
    so everything the training graph touches is cloned in normal mode first.
    """
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: clone_tensors(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone_tensors(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone_tensors(v) for v in obj)
    return obj


class HostDenoiser:
    """``denoiser(x, sigma, idx) -> x0`` through the host's guider, one prompt group at a time.

    Shapes: x (B, C, H, W); sigma (B,); idx (B,) long, indices into the guider's positive
    conditioning list; returns (B, C, H, W).
    """

    def __init__(self, model_wrap, extra_args: dict):
        self.model_wrap = model_wrap
        self.extra_args = extra_args
        self.positive = list(model_wrap.conds["positive"])
        negative = model_wrap.conds.get("negative")
        self.negative = None if negative is None else list(negative)

    def _call(self, x: torch.Tensor, sigma: torch.Tensor, i: int) -> torch.Tensor:
        self.model_wrap.conds["positive"] = [self.positive[i]]
        if self.negative is not None:
            self.model_wrap.conds["negative"] = [self.negative[min(i, len(self.negative) - 1)]]
        return self.model_wrap(x, sigma, **self.extra_args)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        if idx is None:
            idx = torch.zeros(x.shape[0], dtype=torch.long)
        idx = idx.to("cpu", torch.long)
        groups = torch.unique(idx).tolist()
        if len(groups) == 1:
            return self._call(x, sigma, groups[0])
        rows = [torch.nonzero(idx == g).flatten() for g in groups]
        outs = [self._call(x[r.to(x.device)], sigma[r.to(sigma.device)], g)
                for g, r in zip(groups, rows, strict=True)]
        order = torch.argsort(torch.cat(rows)).to(x.device)
        return torch.cat(outs)[order]


def check_trainable_weights(model_patcher) -> None:
    """Refuse base weights a LoRA cannot be trained through, saying what to load instead.

    Float weights of any dtype train (fp8 included: the host casts each weight to the compute dtype
    and the LoRA's weight wrapper adds its delta there), and so do the host's own quantized layers
    (ComfyUI 0.33's ``QuantizedTensor``: in bypass mode, see :func:`attach_lora`). GGUF-quantised
    weights (ComfyUI-GGUF keeps them as tensors carrying ``tensor_type`` / ``tensor_shape`` and
    dequantises them in its own layers) and other integer-packed formats are refused: no test host
    has them working.
    """
    unet = model_patcher.get_model_object("diffusion_model")
    for name, param in unet.named_parameters():
        if hasattr(param, "tensor_type") and hasattr(param, "tensor_shape"):
            raise ValueError(
                f"this MODEL has GGUF-quantised weights (ComfyUI-GGUF; e.g. {name}: "
                f"{getattr(param.tensor_type, 'name', param.tensor_type)}): PSO cannot train a LoRA "
                "through quantised storage. Load the fp16/bf16 (or fp8) version of the same model with "
                "Load Diffusion Model / Load Checkpoint for training; the trained LoRA then also loads "
                "on the GGUF model with ComfyUI-GGUF's LoRA support"
            )
        if not (param.dtype.is_floating_point or param.dtype.is_complex):
            raise ValueError(
                f"this MODEL stores weight {name} as {param.dtype} (a packed quantised format), which "
                "PSO cannot train a LoRA through. Load the fp16/bf16 or fp8 version of the model "
                "(Load Diffusion Model with weight_dtype default or fp8_e4m3fn) for training"
            )


def _host_quantized_layers(unet) -> list[tuple[str, str]]:
    """(weight name, format) of every weight stored as the host's ``QuantizedTensor`` (ComfyUI's
    mixed-precision checkpoints: int8 / fp8 / nvfp4 layouts; their dtype reads as the compute dtype,
    so a dtype check does not see them)."""
    try:
        from comfy.quant_ops import QuantizedTensor
    except ImportError:  # a host without quantized storage
        return []
    found = []
    for name, param in unet.named_parameters():
        if isinstance(param, QuantizedTensor):
            module = unet.get_submodule(name.rpartition(".")[0]) if "." in name else unet
            fmt = getattr(module, "quant_format", None) or getattr(param, "_layout_cls", None) or "quantized"
            found.append((name, str(fmt)))
    return found


def attach_lora(model_patcher, config: pso_lora.LoRAConfig, generator: torch.Generator):
    """Clone ``model_patcher`` and add a fresh LoRA through the host's weight wrappers.

    Returns ``(clone, net)``. The adapter starts at zero (up = 0), so the clone predicts exactly what
    the original does until training changes it.
    """
    check_trainable_weights(model_patcher)
    clone = model_patcher.clone()
    unet = clone.get_model_object("diffusion_model")
    net = pso_lora.LoRANetwork.for_module(unet, config, generator)
    if not net.paths:
        raise ValueError(
            f"LoRA target {config.target!r} matches no layer of this model "
            f"({type(unet).__name__}); choose another target ({sorted(pso_lora.TARGETS)})"
        )
    quantized = {name for name, _ in _host_quantized_layers(unet)}
    if quantized:
        _attach_bypass(clone, net)
        adapted: set[str] = set()  # no weight takes the LoRA: every inference weight needs its copy
    else:
        for path in net.paths:
            clone.add_weight_wrapper(f"{UNET_PREFIX}{path}.weight", net.weight_patch(path))
        adapted = set(net.paths)
    # the originals: while an earlier clone of this MODEL is still patched in (a second training of
    # the same MODEL), its copies sit in the modules and the host restores the originals later
    originals = getattr(clone, "object_patches_backup", {})
    for name, param in unet.named_parameters():
        module = unet.get_submodule(name.rpartition(".")[0]) if "." in name else unet
        original = originals.get(f"{UNET_PREFIX}{name}", param)
        if original.is_inference() and not hasattr(module, "weight_function"):
            # plain parameters outside ComfyUI's ops layers (e.g. Flux's q/k RMSNorm scales) get no
            # weight wrapper; give the clone a normal-tensor copy instead (restored when unpatched)
            copy = torch.nn.Parameter(original.clone(), requires_grad=False)
            clone.add_object_patch(f"{UNET_PREFIX}{name}", copy)
    for path, module in unet.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        for attr in ("weight", "bias"):
            tensor = getattr(module, attr, None)
            key = f"{path}.{attr}"
            if (attr == "bias" or path not in adapted) and tensor is not None and tensor.is_inference() \
                    and key not in quantized:  # the host dequantises those into a new tensor itself
                clone.add_weight_wrapper(f"{UNET_PREFIX}{key}", _copy_out_of_inference)
    return clone, net


#: The injection key of PSO's bypass-mode LoRA on a training clone.
BYPASS_KEY = "pso_lora_bypass"


def _attach_bypass(clone, net: pso_lora.LoRANetwork) -> None:
    """Bypass mode, as ComfyUI 0.33's native trainer trains quantized models: the LoRA runs beside
    each layer through forward hooks (``output + scale * up(down(x))``, pso.lora's hook mode) and
    no weight is patched. The hooks are a host injection of the clone, so the host adds them when
    it loads the clone and removes them when it unloads it: the user's MODEL, which shares the
    modules, never runs with them."""
    import comfy.patcher_extension
    import comfy.sd

    if not hasattr(comfy.sd, "load_bypass_lora_for_models"):  # refused before training, not after
        raise ValueError("this MODEL has quantized layers (ComfyUI's QuantizedTensor weights), which "
                         "PSO trains in bypass mode, and this ComfyUI cannot apply a LoRA in bypass "
                         "mode (added in ComfyUI 0.11.1): update ComfyUI, or load the fp16/bf16 "
                         "version of the model for training")
    handles: list = []

    def inject(patcher) -> None:
        if not handles:
            handles.append(net.attach(patcher.get_model_object("diffusion_model")))

    def eject(patcher) -> None:
        while handles:
            handles.pop().remove()

    clone.set_injections(BYPASS_KEY, [comfy.patcher_extension.PatcherInjection(inject=inject, eject=eject)])


def apply_lora(model_patcher, lora: dict[str, torch.Tensor], strength: float = 1.0):
    """The user's MODEL with a trained LORA_MODEL, as the host's own loaders apply it: bypass mode
    (``comfy.sd.load_bypass_lora_for_models``, ComfyUI 0.11.1+) for a model with quantized layers,
    whose weights cannot take a patch; weight patches (``load_lora_for_models``) otherwise."""
    import comfy.sd

    unet = model_patcher.get_model_object("diffusion_model")
    if _host_quantized_layers(unet):
        if not hasattr(comfy.sd, "load_bypass_lora_for_models"):
            raise ValueError("this MODEL has quantized layers, and this ComfyUI has no bypass LoRA "
                             "loading (added in ComfyUI 0.11.1); update ComfyUI")
        return comfy.sd.load_bypass_lora_for_models(model_patcher, None, lora, strength, 0.0)[0]
    return comfy.sd.load_lora_for_models(model_patcher, None, lora, strength, 0.0)[0]


def _copy_out_of_inference(tensor: torch.Tensor) -> torch.Tensor:
    """Identity weight wrapper. A wrapped weight is copied by the host before every use
    (``cast_bias_weight(copy=True)``), and the copy made during training is a normal tensor: weights
    a loader node created under inference mode could not otherwise be saved for backward."""
    return tensor


def lora_model_dict(net: pso_lora.LoRANetwork, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The LoRA as ComfyUI's LORA_MODEL (``diffusion_model.<path>.lora_up.weight`` ...), which the
    native Save LoRA / Load LoRA Model nodes and ``comfy.lora.load_lora`` read."""
    return net.lora_state_dict(key_fn=lambda p: f"{UNET_PREFIX}{p}", dtype=dtype)


@dataclass
class HostRun:
    """What a training run inside the host needs besides the models: built by the node."""

    method: methods.MethodConfig
    train_config: trainer.TrainConfig
    sigmas: torch.Tensor
    batch_source: Callable[[int, torch.Generator], methods.PairBatch]
    callback: Callable[[trainer.TrainEvent, Callable], None] | None = None  # (event, current denoiser)
    refresh_fn: Callable[[Callable, int, torch.Generator], None] | None = None  # (denoiser, step, gen)
    resume_from: str | None = None
    stateful: dict | None = None  # objects checkpointed with the trainer (e.g. the reference pool)
    setup: Callable[[Any], Any] | None = None  # called with the training clone; returns a cleanup handle


def saved_tensor_copies(base_model):
    """Copy every non-parameter tensor autograd saves, for models that later modify it in place.

    Costs the extra activation memory; a no-op context for other models.
    """

    # Host model classes whose blocks add residuals in place after a norm saved the tensor (ComfyUI
    # 0.3.75's Flux: ``img += ...``), which autograd rejects: the family table says which.
    if not families.in_place_residual(type(base_model).__name__):
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(
        lambda t: t if isinstance(t, torch.nn.Parameter) else t.clone(), lambda t: t)


@contextlib.contextmanager
def host_training_mode(on: bool = True):
    """The host's own "a gradient pass is running" switch, set to ``on`` for the block where the
    host has one.

    ComfyUI 0.33 routes some model ops to kernels without an autograd formula (comfy_kitchen's
    ``apply_rope`` in Flux, INT8 fused linears) unless ``comfy.model_management.in_training`` is
    set, as its native TrainLoraNode sets it around training; 0.3.75 has no such switch and always
    runs the differentiable ops. Training runs under it (loss passes, backward and the forward
    passes gradient checkpointing recomputes there); sampling inside a run (references, online
    rounds, previews) switches it off again, so it uses the ops SamplerCustomAdvanced uses and
    stays bit-identical to it.
    """
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        yield
        return
    before = mm.in_training
    mm.in_training = on
    try:
        yield
    finally:
        mm.in_training = before


def make_training_sampler(run: HostRun, net: pso_lora.LoRANetwork, results: dict):
    """A ``comfy.samplers.Sampler`` whose ``sample`` runs the PSO trainer on the guider's model."""
    import comfy.samplers

    class PSOTrainingSampler(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
                   denoise_mask=None, disable_pbar=False):
            model_wrap.conds = clone_tensors(model_wrap.conds)
            denoiser = HostDenoiser(model_wrap, extra_args)
            ms = model_wrap.inner_model.model_sampling
            step_fn = methods.make_step_fn(run.method, denoiser, pso_lora.frozen_denoiser(denoiser, net),
                                           run.sigmas.to(noise.device), ms)
            refresh = callback = None
            if run.refresh_fn is not None:
                def refresh(step, generator):
                    with host_training_mode(False):  # sampling: the host's inference ops
                        run.refresh_fn(denoiser, step, generator)
            if run.callback is not None:
                def callback(event):
                    with host_training_mode(False):  # previews sample
                        run.callback(event, denoiser)
            tr = trainer.Trainer(net, step_fn, run.batch_source, run.train_config, callback=callback,
                                 refresh_fn=refresh, stateful=run.stateful)
            with saved_tensor_copies(model_wrap.inner_model), host_training_mode():
                try:
                    results["result"] = tr.train(resume_from=run.resume_from)
                except trainer.NonFiniteLossError as exc:
                    if exc.result is None or exc.good_step == 0:
                        raise  # nothing good was trained: the error is the answer
                    # the net holds the newest weights whose forward pass was finite: hand them on,
                    # with the reason in the result (the node puts it into its summary and the log)
                    results["result"] = exc.result
            results["trainer"] = tr
            return latent_image if latent_image is not None else noise

    return PSOTrainingSampler()


def refuse_untrainable_family(model, node: str) -> None:
    """Refuse, before it samples or trains anything, a MODEL whose family row says PSO must not train it
    (:func:`pso.families.training_refusal`: Wan 2.1 T2V / the Wan 2.2 A14B experts); ``node`` names the
    refusing node in the message."""
    config = type(model.model.model_config).__name__
    if reason := families.training_refusal(config):
        raise ValueError(f"{node}: {reason}.")


def unload_other_models(device) -> None:
    """``comfy.model_management.free_memory(1e30, device)``, once more if the host's loop loses an entry.

    ComfyUI 0.3.75's ``free_memory`` pops the unloaded entries of ``current_loaded_models`` by index
    after its loop, but unloading can drop a model's last reference, whose ``weakref.finalize`` runs
    ``cleanup_models`` and pops entries from that list mid-way: ``IndexError: pop from empty list``
    (seen once in a full suite run). The list is consistent again afterwards, so a second call unloads
    what is left.
    """
    import comfy.model_management

    try:
        comfy.model_management.free_memory(1e30, device)
    except IndexError:
        logger.debug("free_memory lost a model entry to its finalizer; unloading again")
        comfy.model_management.free_memory(1e30, device)

def train_on_host(model_patcher, positive: list, latent_shape: tuple[int, ...], run: HostRun,
                  lora_config: pso_lora.LoRAConfig, seed: int
                  ) -> tuple[Any, pso_lora.LoRANetwork, trainer.TrainResult]:
    """Train a LoRA on a clone of ``model_patcher``; return ``(patched clone, net, result)``.

    positive: one CONDITIONING (list of ``[tensor, dict]``) entry per prompt, in the order the pair
    batches index them. latent_shape: (C, H, W) of the training latents.
    """
    import comfy.model_management
    import comfy_extras.nodes_custom_sampler as custom_sampler

    with torch.inference_mode(False):
        generator = torch.Generator().manual_seed(seed)
        clone, net = attach_lora(model_patcher, lora_config, generator)
        device = comfy.model_management.get_torch_device()
        net.to(device)
        unet = clone.get_model_object("diffusion_model")
        frozen_flags = [(p, p.requires_grad) for p in unet.parameters()]
        for p, _ in frozen_flags:
            p.requires_grad_(False)
        results: dict = {}
        cleanup = run.setup(clone) if run.setup is not None else None
        try:
            # Latents and conditionings are cached by now: unload CLIP, VAE and any other model so
            # training has the memory; the guider then loads the clone as the host's settings say
            # (--lowvram / --novram partial loading included).
            unload_other_models(device)
            guider = custom_sampler.Guider_Basic(clone)
            guider.set_conds(single_entries(positive))
            dummy = torch.zeros((1, *latent_shape))
            guider.sample(dummy, dummy, make_training_sampler(run, net, results), run.sigmas, seed=seed)
        finally:
            if cleanup is not None:
                cleanup.remove()
            for p, flag in frozen_flags:
                # weights loaded by a node are inference tensors: their flag can only be set back there
                with torch.inference_mode(p.is_inference()):
                    p.requires_grad_(flag)
        for p in net.parameters():
            p.requires_grad_(False)
        return clone, net, results["result"]


def node_callback(live, on_step: Callable[[trainer.TrainEvent, Callable], None]
                  ) -> Callable[[trainer.TrainEvent, Callable], None]:
    """The trainer callback of a node's run (:attr:`HostRun.callback`), the same for PSO Train and PSO
    Online Train: every event goes to the live chart first (a step that Cancel stops after is done and
    charted), then the host's Cancel is honoured, then ``on_step(event, denoiser)`` runs for each
    optimizer step (the node's previews and progress bar)."""
    import comfy.model_management

    def on_event(event: trainer.TrainEvent, denoiser) -> None:
        live.record(event)  # first: a step that Cancel stops after is done and charted
        comfy.model_management.throw_exception_if_processing_interrupted()
        if event.phase == "step":
            on_step(event, denoiser)

    return on_event


def train_lora(model_patcher, positive: list, latent_shape: tuple[int, ...], run: HostRun,
               lora_config: pso_lora.LoRAConfig, seed: int, live
               ) -> tuple[dict[str, torch.Tensor], trainer.TrainResult]:
    """The training of every node's run: a fresh LoRA trained on a clone of the user's MODEL
    (:func:`train_on_host`), handed out as a LORA_MODEL; the live chart ``live`` is closed with the
    run's outcome. Returns ``(lora, result)``; :func:`apply_lora` puts it on the MODEL."""
    _, net, result = train_on_host(model_patcher, positive, latent_shape, run, lora_config, seed)
    lora = lora_model_dict(net)
    live.finish(result.interrupted)
    return lora, result


def single_entries(positive: list) -> list:
    """One ``[tensor, dict]`` entry per prompt (the guider's list, indexed by pair batches)."""
    bad = [i for i, c in enumerate(positive) if len(c) != 1]
    if bad:
        raise ValueError(
            f"each prompt must be one conditioning entry, but prompts {bad} have several (combined or "
            "area conditioning); encode each prompt with a plain CLIPTextEncode"
        )
    return [c[0] for c in positive]
