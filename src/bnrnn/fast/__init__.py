"""The fast path: one direction of one layer as a single autograd node with a hand-written
backward, the recurrence in compiled C++ loops on the CPU (Python loops elsewhere).

`fast_direction` has the contract of `bnrnn.reference.reference_direction` and computes the
same thing to float tolerance; `supports` says which cases it takes (the others use the
reference). `set_backend` chooses between the compiled and the Python loops.
"""

from .direction import BACKENDS, fast_direction, get_backend, set_backend, supports

__all__ = ["BACKENDS", "fast_direction", "get_backend", "set_backend", "supports"]
