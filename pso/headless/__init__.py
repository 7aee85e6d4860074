"""Headless PSO training on diffusers models with Hugging Face accelerate (the ``pso-train`` command).

Same losses, methods, adapter and loop as the ComfyUI nodes (:mod:`pso.methods`,
:class:`pso.lora.LoRANetwork`, :class:`pso.trainer.Trainer`), pair datasets in the project's format
streamed shard by shard (:mod:`.data`), LoRAs saved as the files PSO Save LoRA writes
(:func:`pso.lora_format.save_lora_file`). diffusers, transformers, peft (pso-eval reads LoRAs through
diffusers) and accelerate are imported only when used.
"""
