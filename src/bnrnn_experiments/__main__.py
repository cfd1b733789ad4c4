"""``python -m bnrnn_experiments``: the ``bnrnn`` command line."""

from .cli import main

raise SystemExit(main())
