"""``pso-train``: train a PSO LoRA from a config file, on one process or under ``accelerate launch``.

    pso-train config.toml                                   # one process (GPU if there is one)
    accelerate launch --num_processes 8 -m pso_train.cli config.toml
    pso-train config.toml --set steps=2000 --set resume_from=out/checkpoints
    pso-train online.toml        # online PSO: a config with prompts + reward_model instead of datasets

``--set key=value`` overrides a config key (the value is parsed as JSON when it can be: numbers,
true/false, lists; otherwise taken as a string).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set needs key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pso-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a .toml or .json config file (see the README's 'Headless training')")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key; repeatable")
    parser.add_argument("--log-level", default="INFO", help="Python logging level (default INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from .config import ConfigError, load_config

    try:
        cfg = load_config(args.config, _parse_overrides(args.set))
    except ConfigError as exc:
        print(f"pso-train: {exc}", file=sys.stderr)
        return 2
    if cfg.online:
        from .online import train_online as train
    else:
        from .train import train

    summary = train(cfg)
    if summary.lora_file is not None:
        print(json.dumps({"lora_file": str(summary.lora_file), "steps": summary.steps,
                          "final_loss": summary.loss_history[-1] if summary.loss_history else None,
                          "checkpoint": str(summary.checkpoint) if summary.checkpoint else None,
                          "processes": summary.world_size, "seconds": round(summary.seconds, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
