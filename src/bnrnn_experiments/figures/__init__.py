"""The papers' analyses as commands (``bnrnn figure ...``): each writes a PNG and the numbers
behind it (CSV and JSON) so that the claims can be checked on other data and models.

- ``gradient-flow``: Cooijmans Fig. 1(a), ||dL/dh_t|| through a BN tanh RNN per gamma.
- ``tanh-derivative``: Cooijmans Fig. 1(b), E[tanh'(x)] and its IQR vs the input's std.
- ``population-stats RUN``: Cooijmans Fig. 5, per-step population statistics of a run.
- ``length-generalization RUN...``: Cooijmans Fig. 3(b), bpc vs evaluation length.
- ``gamma-sensitivity``: Cooijmans Fig. 6, training curves for several initial gammas.
"""

from .cli import FIGURES, add_figure_parser, main_figure, run_figure

__all__ = ["FIGURES", "add_figure_parser", "main_figure", "run_figure"]
