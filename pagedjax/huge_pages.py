"""Transparent huge pages for the KV pool on CPU (Linux).

A CPU decode step streams every sequence's KV pages, and the pages a prefix cache reuses
lie scattered over the pool: with 4 KiB pages most of those reads miss the TLB. On a
machine whose THP setting is "madvise" (the common default) XLA's buffers get no huge
pages, so a fresh pool asks for them (measured on the multi-turn prefix-caching workload:
decode steps 50 -> 45 ms, 512-token prefill steps over cached context 1.56 -> 1.40 s;
benchmarks/README.md). Only the pool's own bytes are touched; where the kernel refuses
(THP "never", another OS) the pool stays as it was.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Optional

import jax

HUGE_PAGE_BYTES = 2 << 20
_MADV_DONTNEED, _MADV_HUGEPAGE = 4, 14  # <sys/mman.h> on Linux
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def back_zeros_with_huge_pages(zeros: jax.Array) -> None:
    """For a freshly zero-filled single-CPU-device array (a new KV pool): mark the whole
    huge pages inside its bytes for THP and give their 4 KiB pages back, so they fault
    in again as zeroed 2 MiB pages on first use (private anonymous memory reads back as
    zeros once dropped, so the contents do not change)."""
    libc = _libc()
    if libc is None or zeros.nbytes < HUGE_PAGE_BYTES:
        return
    devices = zeros.devices()
    if len(devices) != 1 or next(iter(devices)).platform != "cpu":
        return
    zeros.block_until_ready()  # no zeros still being written
    pointer = zeros.unsafe_buffer_pointer()
    start = -(-pointer // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (pointer + zeros.nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if end > start and libc.madvise(start, end - start, _MADV_HUGEPAGE) == 0:
        libc.madvise(start, end - start, _MADV_DONTNEED)


@functools.cache
def _libc() -> Optional[ctypes.CDLL]:
    """The C library when this is Linux with THP not turned off, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open(_THP_SETTING) as f:
            if "[never]" in f.read():
                return None
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc
