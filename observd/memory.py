"""Keep freed frame-sized memory in the process instead of handing it back to the kernel.

Every light allocates a few frame-sized arrays (64 MB each at 4096 px, float32). glibc
serves allocations above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and
returns them with ``munmap`` when freed, so each such array is faulted in again, page by
page, on first touch: 16 000 page faults per 64 MB array, 100-190 ms on this kind of
virtual machine, more than the arithmetic on it. Measured with ``bench/light_path.py``
at 4096 px: the median latency from settled file to updated coadd went from 1.19 s to
0.83 s, and the p95 from 2.2 s to 1.0 s, with nothing else changed.

:func:`keep_freed_memory` tells glibc to serve large blocks from its heap and never to
trim it: the arrays of one light are reused by the next. The resident size stays at the
high-water mark of one light's working set (the frames are all the same size), which is
what the process needs anyway. It also keeps every thread on that one heap (glibc gives
each thread an arena of its own otherwise, whose large blocks are mapped afresh and
unmapped when freed whatever ``M_MMAP_MAX`` says): the products computed on the copier
thread reuse the same pages.

:func:`reserve_heap` grows that heap ahead of need. The first lights of a coadd raise the
high-water mark by its sums, its warm-up frames and a spare checkpoint set (1.8 GB at
4096 px); on a virtual machine whose free memory goes back to the host (free page
reporting), first touching fresh memory costs ~2.4 ms per MB, so those lights waited
1-2 s each for page faults. :class:`observd.pipeline.Pipeline` reserves the working
memory of a night when it first sees a frame of a new size (at dusk, a bias), where
nobody waits for it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import numpy as np
from loguru import logger

__all__ = ["heap_bytes", "heap_in_use", "keep_freed_memory", "reserve_heap"]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_BLOCK = 64 * 2**20  # reserve in frame-sized blocks: they fill the heap's free holes too
_PAGE = 4096


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip

_done = False


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and keep freed ones (glibc only; idempotent).

    Returns
    -------
    bool
        True when glibc accepted the settings (False elsewhere: nothing changes).
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # the threshold is a size_t that mallopt takes as an int: -1 is SIZE_MAX, never
    # (2**31 - 1 would give back any free top above 2 GiB, a reserve among them)
    ok = (bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
          and bool(mallopt(_M_ARENA_MAX, 1)))  # fmt: skip
    if ok:
        _done = True
    else:
        logger.debug("glibc refused the malloc settings; frame buffers are mapped per use")
    return ok


def _mallinfo() -> _Mallinfo2 | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):  # glibc < 2.33 or another libc
        return None
    mallinfo2.restype = _Mallinfo2
    return mallinfo2()


def heap_bytes() -> int | None:
    """Bytes the heap holds from the kernel (in use and kept free); None without glibc's
    ``mallinfo2``."""
    info = _mallinfo()
    return None if info is None else int(info.arena + info.hblkhd)


def heap_in_use() -> int | None:
    """Bytes of the heap's blocks in use (all of glibc's arenas): what a leak would grow,
    whatever the reserve holds resident; None without glibc's ``mallinfo2``."""
    info = _mallinfo()
    return None if info is None else int(info.uordblks + info.hblkhd)


def reserve_heap(total: int) -> int:
    """Grow the kept heap to ``total`` bytes, every page touched, so that later arrays
    up to that size are served without a page fault.

    Only with :func:`keep_freed_memory` in effect (else the blocks would go back to the
    kernel when freed): a no-op otherwise, and when the heap is that large already.

    Parameters
    ----------
    total
        The heap size wanted, in bytes.

    Returns
    -------
    int
        The bytes added to the heap.
    """
    if not _done:
        return 0
    before = heap_bytes()
    if before is None or before >= total:
        return 0
    blocks = []
    try:
        while (heap_bytes() or total) < total:
            block = np.empty(_BLOCK, np.uint8)
            block[::_PAGE] = 0  # one write per page faults it in
            blocks.append(block)
    except MemoryError:
        logger.warning("could not reserve {:.1f} GB of working memory", total / 2**30)
    del blocks  # freed into the heap, which keeps them
    return (heap_bytes() or before) - before
