"""The fast path: one direction of one layer as a single autograd node with a hand-written
backward, the recurrence in compiled C++ loops on the CPU (Python loops elsewhere).

`fast_direction` has the contract of `bnrnn.reference.reference_direction` and computes the
same thing to float tolerance; `supports` says which cases it takes (the others use the
reference). `set_backend` chooses between the compiled and the Python loops.

The compiled loops keep the large internal buffers they free (saved activations, gradient
buffers, weight copies) for reuse instead of faulting in fresh memory at every call:
`cache_info`, `empty_cache` and `set_cache_limit` inspect, release and bound that cache.
"""

from .compiled import cache_info, empty_cache, set_cache_limit
from .direction import BACKENDS, fast_direction, get_backend, set_backend, supports

__all__ = [
    "BACKENDS",
    "cache_info",
    "empty_cache",
    "fast_direction",
    "get_backend",
    "set_backend",
    "set_cache_limit",
    "supports",
]
