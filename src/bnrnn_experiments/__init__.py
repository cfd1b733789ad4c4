"""Experiment harness for bnrnn: data, training, plots, CLI."""
