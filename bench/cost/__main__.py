"""``python -m bench.cost``: see :mod:`bench.cost.run`."""

from .run import main

raise SystemExit(main())
