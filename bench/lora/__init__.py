"""LoRA implementations side by side (issue 18 item 4): see :mod:`bench.lora.run`."""
