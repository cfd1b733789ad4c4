"""``python -m bnrnn_experiments.figures FIGURE ...``: the figure commands on their own."""

from .cli import main_figure

raise SystemExit(main_figure())
