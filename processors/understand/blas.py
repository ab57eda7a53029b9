"""One BLAS thread for the calling thread, while it runs small matrix products.

The intent model multiplies matrices of a few thousand rows at most. numpy's bundled OpenBLAS
splits even those over every core and its threads then spin: on the 2 cores the worker shares
with the embedder (onnxruntime has threads of its own) that doubled the model's CPU time
without making it faster (``bench/RESULTS.md``, understand core). OpenBLAS >= 0.3.27 has a
per-thread setting, ``openblas_set_num_threads_local``; where it is missing (another BLAS, an
older OpenBLAS) this is a no-op and the library's own threading stays.

>>> with one_blas_thread():
...     pass
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@functools.cache
def _set_local_threads() -> Callable[[int], int] | None:
    """OpenBLAS' per-thread thread count setter (returns the previous count), if numpy has one."""
    libs = Path(np.__file__).parent.with_name("numpy.libs")
    for path in sorted(libs.glob("libscipy_openblas*")):
        try:
            lib = ctypes.CDLL(str(path))  # already loaded by numpy: the same handle
            setter = lib.openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        setter.restype = ctypes.c_int
        setter.argtypes = [ctypes.c_int]
        return setter
    return None


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Within the block, BLAS calls from this thread run on one thread."""
    setter = _set_local_threads()
    if setter is None:
        yield
        return
    previous = setter(1)
    try:
        yield
    finally:
        setter(previous)
