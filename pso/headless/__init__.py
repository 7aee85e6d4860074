"""The pure parts of headless training (no accelerate, no diffusers import): which pairs each step
trains on, independent of the process count (:mod:`.data`), and the LoRA on a diffusers UNet, a
:class:`pso.lora.LoRANetwork` (:mod:`.adapter`). The application that runs them (the ``pso-train``
command, configs, model loading, accelerate) is the :mod:`pso_train` package.
"""
