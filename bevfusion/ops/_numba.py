"""How the ops import numba: the one place, so that every CPU kernel is compiled the same way.

numba is a required dependency (setup.py), so there is no fallback: a CPU path imports this module,
and with it numba, when it is first used (`import bevfusion.ops.<op>` needs torch only). Kernels are
compiled on their first call and cached on disk (`cache=True`); `nogil=True` lets the threads of
`bevfusion.ops._threads` run them in parallel on disjoint chunks.
"""
from __future__ import annotations

import numba

__all__ = ["jit", "jit_reassoc", "numba"]

jit = numba.njit(cache=True, nogil=True)

# For reductions whose order may change: lets LLVM reassociate (and so vectorise) a dot product, without
# assuming away NaN or inf.
jit_reassoc = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
