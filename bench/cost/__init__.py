"""PSO training cost against its baselines (SFT, ComfyUI's native Train LoRA node, the plain
sampler), measured as ratios in one run: ``python -m bench.cost``. See bench/README.md."""
