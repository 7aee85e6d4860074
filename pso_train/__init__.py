"""The headless application around the ``pso`` algorithm package: the ``pso-train``, ``pso-eval`` and
``pso-import-pickapic`` commands, their config files, the diffusers / transformers model loading and the
Hugging Face accelerate runs (offline and online PSO on :class:`pso.trainer.Trainer`).

``pso`` is the algorithm (pure PyTorch; it imports neither this package, the host, nor accelerate);
this package is its second host beside ComfyUI's node layer (``nodes/``). diffusers, transformers,
peft and accelerate are imported only when used.
"""
