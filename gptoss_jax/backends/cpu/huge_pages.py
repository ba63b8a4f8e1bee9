"""Back the weights with 2 MiB pages (Linux transparent huge pages), where the CPU reads them.

Decoding streams every weight byte once a step, and with 4 KiB pages the hardware prefetchers stop at
each page's end and every page costs a TLB miss: 20b's unembedding (1.16 GB of bf16) in the AVX2
kernels on 2 MiB pages runs 30% faster at one row on one core (10% on two, which share the memory),
and its 16-row register tiles 28% faster on one core (5% on two). glibc's
malloc and XLA hand out 4 KiB pages unless the system's THP setting is "always" (many distributions
default to "madvise"), so after loading we ask the kernel to move each large weight onto huge pages in
place (madvise MADV_COLLAPSE, Linux 6.1+; before that MADV_HUGEPAGE lets khugepaged do it later). The
values do not change; where the kernel refuses (THP "never") nothing happens, and a page it finds no
free 2 MiB piece for stays small. GPTOSS_JAX_HUGE_PAGES=0 turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable

import jax

PAGE = 2 * 2**20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
# Weights smaller than this are left alone: at most a few of their pages could move.
MIN_BYTES = 4 * PAGE


def enabled() -> bool:
    return sys.platform == "linux" and os.environ.get("GPTOSS_JAX_HUGE_PAGES", "1") != "0"


def advise(arrays: Iterable) -> int:
    """Move the CPU buffers of `arrays` (jax arrays; others are skipped) onto huge pages, best effort.

    Returns how many bytes are on huge pages now by its doing (MADV_COLLAPSE succeeded, or found them
    there already); 0 where it is off or refused."""
    if not enabled():
        return 0
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    moved = 0
    for array in arrays:
        if not isinstance(array, jax.Array) or array.nbytes < MIN_BYTES:
            continue
        for shard in array.addressable_shards:
            buffer = shard.data
            if shard.device.platform != "cpu" or buffer.nbytes < MIN_BYTES:
                continue
            buffer.block_until_ready()  # not waited on, its buffer was refused (EINVAL)
            address = buffer.unsafe_buffer_pointer()
            start = -(-address // PAGE) * PAGE  # only the huge pages that lie wholly inside the buffer
            end = (address + buffer.nbytes) // PAGE * PAGE
            # A page at a time, tried twice: where free memory is fragmented the kernel may find no free
            # 2 MiB piece for some pages (EAGAIN) and still move the others.
            for page in range(start, end, PAGE):
                if madvise(page, PAGE, MADV_COLLAPSE) == 0 or madvise(page, PAGE, MADV_COLLAPSE) == 0:
                    moved += PAGE
                else:
                    madvise(page, PAGE, MADV_HUGEPAGE)  # khugepaged may move it later
    return moved


def resident_huge_bytes() -> int:
    """Bytes of this process's anonymous memory on huge pages now (/proc/self/smaps_rollup), or 0."""
    try:
        with open("/proc/self/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
