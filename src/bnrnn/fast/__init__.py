"""The fast path: one direction of one layer as a single operator with a hand-written
backward (``bnrnn::direction``), the recurrence in compiled C++ loops on the CPU (Python
loops elsewhere).

`fast_direction` has the contract of `bnrnn.reference.reference_direction` and computes the
same thing to float tolerance; `supports` says which cases it takes (the others use the
reference). `set_backend` chooses between the compiled and the Python loops.

Modules: `direction` (the entry: module parameters to operator arguments), `ops` (the
operators, their autograd and fake implementations), `run` (buffers, chunks of steps and
statistics around the loops), `plan` (the frozen per-call plan), `buffers` (what the loops
read and write), `loops` (the loops in PyTorch), `compiled` (building and calling the C++
loops in ``csrc/``), `placer` and `onednn` (buffer placement, the GEMMs outside the loops).

The compiled loops keep the large internal buffers they free (saved activations, gradient
buffers, weight copies) for reuse instead of faulting in fresh memory at every call:
`cache_info`, `empty_cache` and `set_cache_limit` inspect, release and bound that cache.
"""

from .compiled import BACKENDS, cache_info, empty_cache, get_backend, set_backend, set_cache_limit
from .direction import fast_direction, supports

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
