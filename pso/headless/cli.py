"""``python -m pso.headless.cli`` / ``accelerate launch -m pso.headless.cli``: where launch scripts
written before the headless application left the algorithm package start ``pso-train``. The command
is :mod:`pso_train.cli`; this module only forwards to it (nothing in ``pso`` imports it)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from pso_train.cli import main as pso_train_main

    return pso_train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
