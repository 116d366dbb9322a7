"""Keep freed memory in the process on CPU: the host-side analogue of CUDA's caching allocator.

glibc serves every large allocation (activations, gradients: megabytes each) with a fresh
mmap and returns it with munmap when freed, so each training step pays a page fault (and a
zeroing by the kernel) for every 4 KiB of every large tensor it creates. Measured on the CPU
demo model (benchmarks/RESULTS.md), that is 10-20% of a training step. With mmap off and a high
trim threshold, freed blocks go back to malloc's heap and the next step reuses them, as
jemalloc/tcmalloc (the usual LD_PRELOAD advice for PyTorch on CPU) would. The cost: memory is
not handed back to the OS during the run, and fragmentation can raise peak RSS a little.

`train.cpu_allocator`: "caching" (default; applied when training on the CPU) or "system"
(leave malloc alone, e.g. when jemalloc or tcmalloc is preloaded).
"""
from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger("megatron_evomoe")

# mallopt parameters (glibc <malloc.h>)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
_TRIM_BYTES = 2**31 - 1  # the largest int mallopt takes: keep up to 2 GiB of free heap
# Grow and shrink the heap in 256 MiB steps: set after start-up, the trim threshold alone still
# lets glibc hand back (and later re-fault) the top of the heap; untouched padding costs no RSS.
_TOP_PAD_BYTES = 256 * 2**20


def use_caching_allocator() -> bool:
    """Make glibc keep freed memory for reuse; True if applied (glibc only, else a no-op)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.info("cpu allocator: not glibc (%s), left as is", platform.libc_ver()[0] or platform.system())
        return False
    libc = ctypes.CDLL(None)
    ok = all(libc.mallopt(param, value) == 1 for param, value in
             ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _TRIM_BYTES), (M_TOP_PAD, _TOP_PAD_BYTES)))
    log.info("cpu allocator: glibc keeps freed memory for reuse (mmap off, trim threshold 2 GiB, "
             "top pad 256 MiB)%s",
             "" if ok else " -- mallopt refused, left as is")
    return ok
