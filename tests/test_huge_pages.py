"""The CPU's weights on 2 MiB pages (gptoss_jax/backends/cpu/huge_pages.py), read back from the kernel's
own account of this process's mappings (/proc/self/smaps)."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss_jax.backends.cpu import huge_pages
from gptoss_jax.checkpoint.load import from_tensors
from gptoss_jax.checkpoint.random_weights import random_hub_tensors
from gptoss_jax.config import GptOssConfig

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_refused() -> bool:
    """Whether this system turns transparent huge pages off (then nothing may move)."""
    return "[never]" in THP.read_text()


def collapse_failures() -> int:
    """How many times the kernel found no free 2 MiB page to collapse into (/proc/vmstat)."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("thp_collapse_alloc_failed "):
            return int(line.split()[1])
    return 0


def huge_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping that holds `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span[1], 16) <= address < int(span[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


def whole_pages(array: jax.Array) -> int:
    """Bytes of the 2 MiB pages that lie wholly inside the array's buffer."""
    first, end = array.unsafe_buffer_pointer(), array.unsafe_buffer_pointer() + array.nbytes
    page = huge_pages.PAGE
    return end // page * page - -(-first // page) * page


@pytest.mark.quick
def test_an_xla_buffer_moves_onto_huge_pages_with_its_values():
    x = jax.jit(lambda: jnp.arange(16 * 2**20, dtype=jnp.float32) * 3)()  # 64 MiB that XLA allocated
    expected = np.array(x)
    failures_before = collapse_failures()
    moved = huge_pages.advise([x, np.zeros(8), jnp.zeros(3)])  # what is not a big CPU array is skipped
    if thp_refused():
        assert moved == 0
    else:  # pages for which the kernel finds no free 2 MiB piece may stay (busy machines fragment memory)
        assert moved <= whole_pages(x) and whole_pages(x) >= 60 * 2**20
        assert huge_bytes_at(x.unsafe_buffer_pointer()) >= moved
        # None moved only where the kernel counted failures to find a 2 MiB piece meanwhile.
        assert moved > 0 or collapse_failures() > failures_before
    np.testing.assert_array_equal(np.asarray(x), expected)


@pytest.mark.quick
def test_switched_off_nothing_moves(monkeypatch):
    monkeypatch.setenv("GPTOSS_JAX_HUGE_PAGES", "0")
    x = jax.jit(lambda: jnp.ones(16 * 2**20, jnp.float32))()
    before = huge_bytes_at(x.unsafe_buffer_pointer())
    assert huge_pages.advise([x]) == 0
    assert huge_bytes_at(x.unsafe_buffer_pointer()) == before


def test_loading_hands_the_stacked_experts_to_advise(monkeypatch):
    # Whether the kernel then finds free 2 MiB pieces for them depends on the machine's memory at that
    # moment (a CI run found none for a stack on the heap), so this checks what load asks for, through
    # the real advise, and that what advise reports moved is on huge pages.
    advised = []

    def recording(arrays):
        arrays = list(arrays)
        moved = real(arrays)
        advised.append(({a.unsafe_buffer_pointer() for a in arrays if isinstance(a, jax.Array)}, moved))
        return moved

    real = huge_pages.advise
    monkeypatch.setattr(huge_pages, "advise", recording)
    # 32 experts of 1024 x 256: each layer group's packed mlp1 bytes are 8 MiB, stacked by XLA at load.
    config = GptOssConfig.preset("tiny").replace(num_experts=32, intermediate_size=1024, hidden_size=256)
    model = from_tensors(config, random_hub_tensors(config, seed=0))
    packed = max((leaf for leaf in jax.tree.leaves(nnx.state(model)) if leaf.dtype == jnp.uint8), key=lambda a: a.nbytes)
    assert packed.nbytes >= 16 * 2**20
    ((pointers, moved),) = advised
    assert packed.unsafe_buffer_pointer() in pointers
    assert huge_pages.resident_huge_bytes() >= moved
