"""LoRA adapters that never copy or mutate the base weights (Hu et al. 2021, arXiv 2106.09685).

A :class:`LoRANetwork` holds, for every targeted ``nn.Linear`` / ``nn.Conv2d`` of a model, a pair
``down`` (A, rank x in) and ``up`` (B, out x rank) plus ``alpha``; the adapted weight is
``W + (alpha / rank) * multiplier * up @ down``. ``up`` starts at zero, so a fresh adapter changes
nothing. It reaches the model in one of two ways, never both at once:

- :meth:`LoRANetwork.attach` registers forward hooks that add ``scale * up(down(x))`` to a module's
  output (plain PyTorch, diffusers, the headless trainer);
- :meth:`LoRANetwork.delta_weight` / :meth:`LoRANetwork.weight_patch` give the weight difference for
  hosts that patch weights instead (ComfyUI's ``ModelPatcher.add_weight_wrapper``, whose functions
  ``f(weight) -> weight`` run inside ``comfy.ops.cast_bias_weight``).

``with net.disabled():`` turns the adapter off in both ways; that is the frozen pre-trained model,
without a second copy of the weights (the reference model of Diffusion-DPO and PSO).
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import families

logger = logging.getLogger(__name__)

KeyFn = Callable[[str], str]


# --------------------------------------------------------------------------------------------
# Configuration and target presets
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetPreset:
    """Which modules a LoRA adapts: module types, and (optionally) module-path suffixes.

    ``suffixes`` are tuples of path components matched against the end of the module path, so
    ``("to_out", "0")`` matches ``...attn1.to_out.0`` but not ``...to_out.01``. ``None`` means every
    module of the listed types.
    """

    description: str
    types: tuple[type[nn.Module], ...]
    suffixes: tuple[tuple[str, ...], ...] | None = None

    def matches(self, path: str, module: nn.Module) -> bool:
        if not (isinstance(module, self.types) or (nn.Linear in self.types and _is_linear_like(module))):
            return False
        if self.suffixes is None:
            return True
        parts = tuple(path.split("."))
        return any(parts[-len(s):] == s for s in self.suffixes)


# Module-path suffixes of the attention projections and of the feed-forward / transformer in-out
# layers, per model family in the one family table (pso.families), plus diffusers' joint-attention
# names: a preset matches the union, so one target name means the same layers in every family.
_ATTENTION = families.attention_suffixes()
_MLP = families.mlp_suffixes()

TARGETS: dict[str, TargetPreset] = {
    "attention": TargetPreset(
        "attention projections (to_q, to_k, to_v, to_out.0 and their Flux/SD3 equivalents)",
        (nn.Linear, nn.Conv2d), _ATTENTION),
    "attention_mlp": TargetPreset(
        "attention projections plus feed-forward layers and transformer proj_in/proj_out",
        (nn.Linear, nn.Conv2d), _ATTENTION + _MLP),
    "all_linear": TargetPreset("every nn.Linear", (nn.Linear,)),
    "all": TargetPreset("every nn.Linear and every nn.Conv2d with groups=1", (nn.Linear, nn.Conv2d)),
}

INITS: dict[str, str] = {
    "kaiming": "down ~ kaiming-uniform(a=sqrt(5)) as nn.Linear's default (Hu et al. 2021; peft's default)",
    "gaussian": "down ~ N(0, (1/rank)^2) (peft's init_lora_weights='gaussian')",
}


@dataclass(frozen=True)
class LoRAConfig:
    """Shape and placement of a LoRA adapter.

    rank: inner dimension r (>= 1). alpha: scale numerator, ``scale = alpha / rank``; ``None`` means
    ``alpha = rank`` (scale 1). target: a key of :data:`TARGETS`. dropout: probability in [0, 1) of
    zeroing an input element of ``down`` while training (hook mode only; needs
    ``LoRANetwork.dropout_generator``). init: a key of :data:`INITS` for ``down``; ``up`` is always 0.
    """

    rank: int = 16
    alpha: float | None = None
    target: str = "attention"
    dropout: float = 0.0
    init: str = "kaiming"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank={self.rank!r} must be an integer >= 1 (typical: 4 to 64).")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)
                                           and self.alpha > 0):
            raise ValueError(
                f"LoRAConfig.alpha={self.alpha!r} must be a finite number > 0, or None for alpha = rank.")
        if self.target not in TARGETS:
            raise ValueError(
                f"LoRAConfig.target={self.target!r} is unknown; choose one of {sorted(TARGETS)}.")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoRAConfig.dropout={self.dropout!r} must be in [0, 1) (0 turns it off).")
        if self.init not in INITS:
            raise ValueError(f"LoRAConfig.init={self.init!r} is unknown; choose one of {sorted(INITS)}.")

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


# --------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------

def _param_key(path: str) -> str:
    """Module path -> ParameterDict key (parameter names may not contain '.')."""
    return path.replace(".", "/")


def _is_linear_like(module: nn.Module) -> bool:
    """A linear layer that is not an ``nn.Linear``: integer ``in_features`` / ``out_features`` and a
    weight of shape (out, in), as a host's quantized linear layers are (ComfyUI 0.33's
    mixed-precision ``Linear`` is a plain ``nn.Module`` holding an int8 / fp8 weight tensor). Only
    hook mode (:meth:`LoRANetwork.attach`) adapts them: their weight cannot take a delta."""
    if isinstance(module, nn.Linear):
        return False
    fin, fout = getattr(module, "in_features", None), getattr(module, "out_features", None)
    weight = getattr(module, "weight", None)
    return (isinstance(fin, int) and isinstance(fout, int) and isinstance(weight, torch.Tensor)
            and tuple(weight.shape) == (fout, fin))


def _is_adaptable(module: nn.Module) -> bool:
    """nn.Linear (or a linear-like layer, see :func:`_is_linear_like`), or nn.Conv2d with groups=1
    (a grouped conv's weight is not a rank-r product)."""
    if isinstance(module, nn.Linear) or _is_linear_like(module):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


def _adapter_shapes(module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (down, up): Linear (r, in), (out, r); Conv2d (r, in, kh, kw), (out, r, 1, 1)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return (rank, module.in_channels, kh, kw), (module.out_channels, rank, 1, 1)
    return (rank, module.in_features), (module.out_features, rank)


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``scale * up @ down`` in the base weight's layout.

    Shapes: Linear down (r, in), up (out, r) -> (out, in);
    Conv2d down (r, in, kh, kw), up (out, r, 1, 1) -> (out, in, kh, kw).
    """
    delta = up.flatten(1) @ down.flatten(1)
    return (scale * delta).reshape(up.shape[0], *down.shape[1:])


def lora_forward(module: nn.Module, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                 scale: float | torch.Tensor) -> torch.Tensor:
    """The adapter's contribution ``scale * up(down(x))`` to ``module(x)``, computed in ``down.dtype``.

    Linear: x (..., in) -> (..., out). Conv2d: x (B, in, H, W) -> (B, out, H', W'); ``down`` runs
    as a conv with the base conv's kernel, stride, padding (mode included) and dilation, ``up`` as
    a 1x1 conv, so the result equals ``conv(x, lora_delta(down, up, scale))`` up to rounding.
    """
    x = x.to(down.dtype)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = 0
        else:
            padding = module.padding
        h = F.conv2d(x, down, None, module.stride, padding, module.dilation)
        return F.conv2d(h, up) * scale
    return F.linear(F.linear(x, down), up) * scale


def _dropout(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Inverted dropout with an explicit generator. x: any shape -> same shape."""
    keep = torch.rand(x.shape, generator=generator, device=generator.device) >= p
    return x * keep.to(device=x.device, dtype=x.dtype) / (1.0 - p)


class RemovableHandle:
    """Undoes an :meth:`LoRANetwork.attach` or :func:`enable_gradient_checkpointing`; idempotent.

    Also a context manager: ``with net.attach(model): ...`` removes on exit.
    """

    def __init__(self, undo: Callable[[], None]):
        self._undo: Callable[[], None] | None = undo

    @property
    def active(self) -> bool:
        return self._undo is not None

    def remove(self) -> None:
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()

    def __enter__(self) -> RemovableHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------

class LoRANetwork(nn.Module):
    """Per-module LoRA pairs, keyed by module path (``named_modules()`` names of the base model).

    ``state_dict()`` holds only adapter tensors: ``down.<key>``, ``up.<key>`` (key = path with '.'
    replaced by '/') and ``alphas`` (P,), one per path in :attr:`paths` order. ``enabled``,
    ``multiplier`` and ``dropout_generator`` are runtime settings, not saved.
    """

    def __init__(self, specs: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]], alpha: float,
                 dropout: float = 0.0):
        """specs: path -> (down shape, up shape). Parameters start at zero; use :meth:`for_module`."""
        super().__init__()
        if not specs:
            raise ValueError("a LoRANetwork needs at least one module path; got none.")
        self.paths: tuple[str, ...] = tuple(specs)
        keys = [_param_key(p) for p in self.paths]
        if len(set(keys)) != len(keys):
            raise ValueError(f"module paths collide after replacing '.' by '/': {self.paths}")
        self._keys = dict(zip(self.paths, keys, strict=True))
        self._index = {p: i for i, p in enumerate(self.paths)}
        items = self._keys.items()
        self.down = nn.ParameterDict({k: nn.Parameter(torch.zeros(specs[p][0])) for p, k in items})
        self.up = nn.ParameterDict({k: nn.Parameter(torch.zeros(specs[p][1])) for p, k in items})
        self.register_buffer("alphas", torch.full((len(self.paths),), float(alpha)))
        self.dropout = float(dropout)
        self.enabled = True
        self.multiplier = 1.0
        self.dropout_generator: torch.Generator | None = None
        self._bases: dict[str, weakref.ref] = {}
        self._attached: dict[int, RemovableHandle] = {}

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def for_module(cls, module: nn.Module, config: LoRAConfig, generator: torch.Generator) -> LoRANetwork:
        """Adapter for every ``nn.Linear`` / ``nn.Conv2d`` (subclasses included) of ``module`` that
        ``config.target`` selects. ``down`` is drawn from ``generator`` in path order, ``up`` is 0.

        The returned parameters are float32 on ``generator.device``; move them with ``.to()``.
        """
        preset = TARGETS[config.target]
        specs: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        bases: dict[str, nn.Module] = {}
        skipped = []
        for path, sub in module.named_modules():
            if not path or not preset.matches(path, sub):
                continue
            if not _is_adaptable(sub):
                skipped.append(path)
                continue
            specs[path] = _adapter_shapes(sub, config.rank)
            bases[path] = sub
        if skipped:
            logger.info("LoRA skips %d grouped convolutions (not a rank-r product): %s", len(skipped),
                        ", ".join(skipped[:5]))
        if not specs:
            raise ValueError(
                f"LoRA target {config.target!r} ({preset.description}) matched no module of "
                f"{type(module).__name__}; choose another target from {sorted(TARGETS)} (for example 'all').")
        net = cls(specs, config.effective_alpha, config.dropout)
        net.to(generator.device)
        with torch.no_grad():
            for path in net.paths:
                down = net.down[net._keys[path]]
                if config.init == "kaiming":
                    # As peft and nn.Linear.reset_parameters: kaiming_uniform_(a=sqrt(5)),
                    # i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
                    nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
                else:
                    nn.init.normal_(down, std=1.0 / config.rank, generator=generator)
        net._bases = {p: weakref.ref(m) for p, m in bases.items()}
        logger.debug("LoRA rank %d on %d modules (%s)", config.rank, len(net.paths), config.target)
        return net

    # ---- accessors -------------------------------------------------------------------------
    def lora_down(self, path: str) -> nn.Parameter:
        """Down (A) matrix of ``path``: (r, in) or (r, in, kh, kw)."""
        return self.down[self._key(path)]

    def lora_up(self, path: str) -> nn.Parameter:
        """Up (B) matrix of ``path``: (out, r) or (out, r, 1, 1)."""
        return self.up[self._key(path)]

    def rank(self, path: str) -> int:
        return int(self.lora_down(path).shape[0])

    def scale(self, path: str) -> float:
        """``alpha / rank * multiplier`` for ``path``."""
        return float(self._scale_tensor(path))

    def _scale_tensor(self, path: str) -> torch.Tensor:
        """As :meth:`scale`, as a 0-d tensor on the adapter's device (no host sync in forward)."""
        return self.alphas[self._index[path]] * (self.multiplier / self.rank(path))

    def _key(self, path: str) -> str:
        try:
            return self._keys[path]
        except KeyError:
            raise KeyError(f"{path!r} is not adapted by this LoRA; it has {len(self.paths)} paths, "
                           f"e.g. {list(self.paths[:3])}") from None

    def named_lora_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(f"{path}.lora_down", down)`` and ``(f"{path}.lora_up", up)`` for every path."""
        for path in self.paths:
            yield f"{path}.lora_down", self.lora_down(path)
            yield f"{path}.lora_up", self.lora_up(path)

    # ---- strength and on/off ---------------------------------------------------------------
    def set_multiplier(self, multiplier: float) -> None:
        """Strength applied on top of alpha / rank (1 = as trained, 0 = off, negative = inverted)."""
        if not math.isfinite(multiplier):
            raise ValueError(f"LoRA multiplier={multiplier!r} must be a finite number (1.0 = as trained).")
        self.multiplier = float(multiplier)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Adapter off inside the block (hooks and weight patches): the frozen base model."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    # ---- weight-patching hosts -------------------------------------------------------------
    def delta_weight(self, path: str, like: torch.Tensor | None = None) -> torch.Tensor:
        """``(alpha / rank) * multiplier * up @ down`` shaped, typed and placed like the base weight.

        like: the weight being patched (its dtype and device are used); by default the base
        module's current ``weight``. Ignores :attr:`enabled` (see :meth:`weight_patch`).
        Shape: Linear (out, in); Conv2d (out, in, kh, kw). Differentiable w.r.t. down and up.
        """
        if like is None:
            base = self._bases.get(path, lambda: None)()
            if base is None:
                raise RuntimeError(f"the base module of {path!r} is gone (or this LoRA was loaded, not "
                                   "built on a model); pass like=<the weight> to delta_weight.")
            like = base.weight
        delta = lora_delta(self.lora_down(path), self.lora_up(path), self._scale_tensor(path))
        if delta.shape != like.shape:
            raise ValueError(f"LoRA delta for {path!r} has shape {tuple(delta.shape)} but the weight has "
                             f"{tuple(like.shape)}; the adapter was built for a different model.")
        return delta.to(device=like.device, dtype=like.dtype)

    def weight_patch(self, path: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """``f(weight) -> weight + delta`` for ``path`` (identity while disabled): the function a
        weight-patching host (ComfyUI ``add_weight_wrapper``) calls with the cast weight.

        Dropout acts on a layer's input, which a weight patch never sees: an adapter with
        ``dropout > 0`` is refused here rather than trained without it.
        """
        self._key(path)
        if self.dropout > 0.0:
            raise ValueError(f"LoRA dropout={self.dropout} needs the hook route (attach()); weight patches "
                             "cannot drop inputs. Use LoRAConfig(dropout=0.0) with weight patches.")
        net = self

        def patch(weight: torch.Tensor) -> torch.Tensor:
            if not net.enabled or net.multiplier == 0.0:
                return weight
            return weight + net.delta_weight(path, like=weight)

        return patch

    # ---- hook mode -------------------------------------------------------------------------
    def attach(self, module: nn.Module) -> RemovableHandle:
        """Add the adapter to ``module`` (the model it was built on, or one with the same paths)
        through forward hooks. Parameters, state-dict keys and requires_grad flags of ``module`` are
        untouched; ``handle.remove()`` restores it exactly."""
        if id(module) in self._attached:
            raise RuntimeError("this LoRA is already attached to that module; remove the first handle "
                               "before attaching again (it would be applied twice).")
        found = dict(module.named_modules())
        missing = [p for p in self.paths if p not in found]
        if missing:
            raise ValueError(f"cannot attach: {len(missing)} of {len(self.paths)} LoRA paths are not in "
                             f"{type(module).__name__}, e.g. {missing[:5]}; the adapter belongs to "
                             "another model.")
        hooks = []
        for path in self.paths:
            sub = found[path]
            expected = self._weight_shape(path)
            if not _is_adaptable(sub) or tuple(sub.weight.shape) != expected:
                raise ValueError(f"cannot attach: {path!r} is a {type(sub).__name__} with weight "
                                 f"{tuple(sub.weight.shape)}, the LoRA expects {expected}.")
            hooks.append(sub.register_forward_hook(self._make_hook(path), with_kwargs=True))
            self._bases[path] = weakref.ref(sub)
        key = id(module)

        def undo() -> None:
            for h in hooks:
                h.remove()
            self._attached.pop(key, None)

        handle = RemovableHandle(undo)
        self._attached[key] = handle
        return handle

    def _weight_shape(self, path: str) -> tuple[int, ...]:
        down, up = self.lora_down(path), self.lora_up(path)
        return (up.shape[0], *down.shape[1:])

    def _make_hook(self, path: str):
        net = self  # a strong reference: the hook works as long as it is attached

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
            if not net.enabled or net.multiplier == 0.0:
                return None
            x = args[0] if args else kwargs["input"]
            down, up = net.lora_down(path), net.lora_up(path)
            if net.dropout > 0.0 and net.training:
                if net.dropout_generator is None:
                    raise RuntimeError(
                        f"LoRA dropout={net.dropout} needs an explicit generator: set "
                        "net.dropout_generator = torch.Generator() (the Trainer does), or call net.eval().")
                x = _dropout(x.to(down.dtype), net.dropout, net.dropout_generator)
            return output + lora_forward(mod, x, down, up, net._scale_tensor(path)).to(output.dtype)

        return hook

    # ---- files -----------------------------------------------------------------------------
    def lora_state_dict(self, key_fn: KeyFn | None = None, dtype: torch.dtype | None = None
                        ) -> dict[str, torch.Tensor]:
        """Tensors for a LoRA file in the kohya layout, on the CPU.

        ``{k}.lora_down.weight`` (r, in) or (r, in, kh, kw), ``{k}.lora_up.weight`` (out, r) or
        (out, r, 1, 1), ``{k}.alpha`` () where ``k = key_fn(path)`` (identity by default; the node
        layer supplies kohya / ComfyUI names). dtype: of the matrices (default: as trained); alpha
        is float32. The multiplier is a runtime strength and is not baked in.
        """
        key_fn = key_fn or (lambda p: p)
        out: dict[str, torch.Tensor] = {}
        for i, path in enumerate(self.paths):
            k = key_fn(path)
            if f"{k}.alpha" in out:
                raise ValueError(f"key_fn maps two module paths to the file key {k!r}; "
                                 "it must be one-to-one.")
            pairs = (("lora_down.weight", self.lora_down(path)), ("lora_up.weight", self.lora_up(path)))
            for name, t in pairs:
                out[f"{k}.{name}"] = t.detach().to("cpu", dtype or t.dtype).contiguous().clone()
            out[f"{k}.alpha"] = self.alphas[i].detach().to("cpu", torch.float32).clone()
        return out

    def load_lora_state_dict(self, sd: Mapping[str, torch.Tensor], key_fn: KeyFn | None = None) -> None:
        """Inverse of :meth:`lora_state_dict`: copy a file's tensors into this adapter.

        A missing ``{k}.alpha`` means alpha = rank (scale 1), as ComfyUI reads such files. Raises
        ValueError listing missing and unexpected keys, or naming a tensor whose shape differs.
        """
        key_fn = key_fn or (lambda p: p)
        plan = []
        expected: set[str] = set()
        missing: list[str] = []
        for i, path in enumerate(self.paths):
            k = key_fn(path)
            names = (f"{k}.lora_down.weight", f"{k}.lora_up.weight")
            expected.update(names)
            expected.add(f"{k}.alpha")
            missing.extend(n for n in names if n not in sd)
            plan.append((i, path, *names, f"{k}.alpha"))
        unexpected = sorted(set(sd) - expected)
        if missing or unexpected:
            raise ValueError(
                f"LoRA file does not match this adapter: {len(missing)} missing keys {missing[:8]}, "
                f"{len(unexpected)} unexpected keys {unexpected[:8]}. Build the adapter with the target "
                "and key naming the file was saved with.")
        for _, path, dn, un, _ in plan:
            for name, param in ((dn, self.lora_down(path)), (un, self.lora_up(path))):
                if tuple(sd[name].shape) != tuple(param.shape):
                    raise ValueError(
                        f"LoRA tensor {name!r} has shape {tuple(sd[name].shape)}, this adapter expects "
                        f"{tuple(param.shape)}; the file has rank {sd[dn].shape[0]}: build the adapter "
                        f"with LoRAConfig(rank={sd[dn].shape[0]}).")
        with torch.no_grad():
            for i, path, dn, un, an in plan:
                self.lora_down(path).copy_(sd[dn])
                self.lora_up(path).copy_(sd[un])
                alpha = float(sd[an]) if an in sd else float(self.rank(path))
                self.alphas[i] = alpha

    def extra_repr(self) -> str:
        return (f"paths={len(self.paths)}, dropout={self.dropout}, enabled={self.enabled}, "
                f"multiplier={self.multiplier}")


# --------------------------------------------------------------------------------------------
# Gradient checkpointing
# --------------------------------------------------------------------------------------------

def frozen_denoiser(denoiser: Callable, net: LoRANetwork) -> Callable:
    """The pre-trained model (``p_pre`` of Eqs. 5-7): the same denoiser with the adapter off and
    without gradients. Never a second copy of the weights."""

    def frozen(x: torch.Tensor, sigma: torch.Tensor, cond):
        with net.disabled(), torch.no_grad():
            return denoiser(x, sigma, cond)

    return frozen


def enable_gradient_checkpointing(module: nn.Module, predicate: Callable[[str, nn.Module], bool],
                                  generators: tuple[torch.Generator, ...] = ()) -> RemovableHandle:
    """Recompute the forward of selected submodules in backward (torch.utils.checkpoint,
    ``use_reentrant=False``) to trade compute for activation memory.

    predicate(path, submodule) selects; descendants of a selected module are not wrapped again.
    generators: explicit generators drawn from inside the selected forwards (LoRA dropout); their
    state is rewound for the recomputation and restored after it, so the recomputed forward draws
    the same numbers (torch only does this for its global RNG). Wrapping sets an instance
    ``forward`` attribute; ``handle.remove()`` restores the previous one. Forward hooks still run
    (inside the recomputation for hooks of descendants). Without grad mode the plain forward runs.
    """
    selected: list[tuple[str, nn.Module]] = []
    for path, sub in module.named_modules():
        if any(path.startswith(p + ".") or p == "" for p, _ in selected):
            continue
        if predicate(path, sub):
            selected.append((path, sub))
    if not selected:
        raise ValueError("gradient checkpointing: the predicate selected no submodule of "
                         f"{type(module).__name__}.")
    saved: list[tuple[nn.Module, object]] = []
    for _, sub in selected:
        had = sub.__dict__.get("forward", None)
        saved.append((sub, had))
        sub.forward = _checkpointed(sub.forward, tuple(generators))

    def undo() -> None:
        for sub, had in saved:
            if had is None:
                del sub.forward
            else:
                sub.forward = had

    return RemovableHandle(undo)


def _checkpointed(forward: Callable, generators: tuple[torch.Generator, ...]) -> Callable:
    def wrapped(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        before = [g.get_state() for g in generators]
        calls = [0]

        def run(*a, **k):
            calls[0] += 1
            if calls[0] == 1:
                return forward(*a, **k)
            now = [g.get_state() for g in generators]
            for g, s in zip(generators, before, strict=True):
                g.set_state(s)
            try:
                return forward(*a, **k)
            finally:
                for g, s in zip(generators, now, strict=True):
                    g.set_state(s)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

    return wrapped
