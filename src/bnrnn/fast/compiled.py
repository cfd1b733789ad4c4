"""Placeholder: compiled loops."""


def load():
    raise RuntimeError("not built")


def load_or_warn():
    return None
