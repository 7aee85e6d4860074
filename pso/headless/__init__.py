"""Headless PSO training on diffusers models with Hugging Face accelerate (the ``pso-train`` command).

Same losses and methods as the ComfyUI nodes (:mod:`pso.methods`), pair datasets in the project's
format streamed shard by shard (:mod:`.data`), peft LoRA adapters saved as the files PSO Save LoRA
writes (:mod:`.lora_io`). diffusers, transformers, peft and accelerate are imported only when used.
"""
